#!/usr/bin/env python
"""Copy a shard dataset to object storage (`gq shards upload`) or from it (`gq shards download`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from gq.common.options import one_line_errors
from gq.shards.publish import download as download_dataset
from gq.shards.publish import upload as upload_dataset

CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.command(context_settings=CONTEXT)
@click.argument("dataset", type=click.Path(path_type=Path))
@click.argument("url")
@click.option("--overwrite", is_flag=True, help="Replace a dataset published at URL before.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def upload(dataset: Path, url: str, overwrite: bool, quiet: bool) -> None:
    """Publish the local DATASET at URL (s3://bucket/prefix, gs://..., any fsspec URL).

    The manifest is written last, so a reader sees no dataset or the whole one. URL must be empty, hold an
    unfinished upload, or hold a dataset (replaced with --overwrite); objects that gq did not publish there are
    never deleted: such a URL is refused. Credentials come from the environment, profile files or instance
    roles, as the storage's own tools read them (AWS_ENDPOINT_URL for MinIO or Ceph). Needs the s3 extra.
    """
    with one_line_errors():
        done = upload_dataset(dataset, url, overwrite=overwrite, progress=not quiet and sys.stderr.isatty())
    click.echo(f"published {done['url']}: {done['files']} objects, {done['bytes'] / 1e6:,.1f} MB")


@click.command(context_settings=CONTEXT)
@click.argument("url")
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset in DATASET.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def download(url: str, dataset: Path, overwrite: bool, quiet: bool) -> None:
    """Copy the dataset at URL into the local folder DATASET, every file checked against the manifest.

    The copy is made beside DATASET and put in place when complete; an existing dataset there is replaced only
    with --overwrite, and a folder that is not a dataset never. Needs the s3 extra.
    """
    with one_line_errors():
        done = download_dataset(url, dataset, overwrite=overwrite, progress=not quiet and sys.stderr.isatty())
    click.echo(f"downloaded {done['url']} into {done['out']}: {done['files']} files, {done['bytes'] / 1e6:,.1f} MB")


if __name__ == "__main__":
    click.group(commands=[upload, download], context_settings=CONTEXT)()
