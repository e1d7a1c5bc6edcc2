#!/usr/bin/env python
"""Join the parts of one build (gq shards build --part I/N) into one dataset: PART... -> --out DIR."""

from __future__ import annotations

import time
from pathlib import Path

import click

from gq.common.options import one_line_errors
from gq.shards import merge_parts
from gq.shards.remote import is_remote
from gq.tools.make_shards import out_option, output, stage_option, summary_text


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("parts", nargs=-1, required=True, type=click.Path(path_type=Path))
@out_option
@stage_option
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset in --out.")
def main(parts: tuple[Path, ...], out: str, stage: Path | None, overwrite: bool) -> None:
    """Merge the N parts of one build, in any order, into --out: the bytes of a single build of all their scenes.

    Refuses (one line, nothing written) parts built with other options or another splits file, a part
    missing or given twice, a scene in two parts, and a part that fails its checks. Each record is
    read once, checked against its checksum, and written once.
    """
    start = time.perf_counter()
    with one_line_errors(), output(out, stage=stage, overwrite=overwrite) as local:
        summary = merge_parts(parts, local, overwrite=overwrite)
    if is_remote(out):
        summary["out"] = out  # where it is published; the local folder is gone or is --stage
    click.echo(summary_text(summary, time.perf_counter() - start))


if __name__ == "__main__":
    main()
