#!/usr/bin/env python
"""Verify a shard dataset: exit 0 with a one-line summary, or 1 with one line per problem."""

import sys
from pathlib import Path

import click

from gq.shards import verify


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--quick", is_flag=True, help="Check sizes, headers and the index only; skip reading the records.")
def cli(directory: Path, quick: bool) -> None:
    """Verify the dataset in DIRECTORY: exit 0 with a summary, or 1 with one line per problem."""
    result = verify(directory, quick=quick, progress=sys.stderr.isatty())
    if not result.ok:
        for line in result.problems:
            click.echo(line)
        sys.exit(1)
    click.echo(result.summary)


if __name__ == "__main__":
    cli()
