#!/usr/bin/env python
"""Verify a shard dataset: exit 0 with a one-line summary, or 1 with one line per problem."""

import sys
from pathlib import Path

import click

from gq.common.options import one_line_errors
from gq.shards import verify
from gq.shards.remote import is_remote
from gq.shards.verify_remote import verify_remote


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("directory", metavar="DIRECTORY|URL")
@click.option("--quick", is_flag=True, help="Check sizes, headers and the index only; skip reading the records.")
def cli(directory: str, quick: bool) -> None:
    """Verify the dataset in DIRECTORY or at URL: exit 0 with a summary, or 1 with one line per problem.

    A URL (s3://, gs://, https://) is checked as a local dataset is: its manifest, the sizes and headers of its
    objects and its index; without --quick each shard is downloaded in turn (into TMPDIR, one at a time) and
    every record checked.
    """
    progress = sys.stderr.isatty()
    if is_remote(directory):
        with one_line_errors():
            result = verify_remote(directory, quick=quick, progress=progress)
    else:
        result = verify(Path(directory), quick=quick, progress=progress)
    if not result.ok:
        for line in result.problems:
            click.echo(line)
        sys.exit(1)
    click.echo(result.summary)


if __name__ == "__main__":
    cli()
