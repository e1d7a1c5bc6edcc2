#!/usr/bin/env python
"""Build a shard dataset from the seed's processed layout: SOURCE/<name>/scene.npz -> --out DIR."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import click

from gq.common.options import click_options, one_line_errors, ray_option
from gq.common.table import format_table
from gq.shards import BuildOptions, build_shards
from gq.shards.publish import staged
from gq.shards.remote import is_remote


def summary_text(s: dict, wall_s: float) -> str:
    """What `gq shards build` and `gq shards merge` print: counts per split, shards, bytes, scores, time."""
    st = s["score_stats"]
    lines = [f"dataset   {s['out']}"]
    rows = [(split, f"{c['scenes']:,} scenes", f"{c['grasps']:,} grasps") for split, c in s["splits"].items()]
    lines += format_table([("", "<6"), ("", ">15"), ("", ">18")], rows, sep="  ", header=False)
    per_shard = s["records"] // s["shards"] if s["shards"] else 0  # an empty part has no shards
    lines.append(f"shards    {s['shards']} x {per_shard} records ({s['records'] - s['scenes']} padding)")
    per_scene = f"{s['bytes_on_disk'] / s['scenes'] / 1e3:,.1f} kB/scene; " if s["scenes"] else ""
    lines.append(
        f"on disk   {s['bytes_on_disk'] / 1e6:,.1f} MB ({per_scene}apparent size {s['bytes_apparent'] / 1e6:,.1f} MB)"
    )
    if st["count"]:
        lines.append(
            f"scores    train: mean {st['mean']:.4f}  std {st['std']:.4f}  min {st['min']:.4f}  max {st['max']:.4f}"
        )
    lines.append(f"sdf       {s['sdf_dtype']}, max conversion error {s['sdf_max_conversion_error']:.3g}")
    if s["skipped"]:
        lines.append(f"skipped   {s['skipped']} bad scenes (see skipped.jsonl)")
    lines.append(f"wall      {wall_s:.2f} s ({s['considered'] / wall_s:,.0f} scenes/s)")
    return "\n".join(lines)


def _part(value: str | None) -> tuple[int, int] | None:
    """`--part I/N` as (I, N)."""
    if value is None:
        return None
    index, _, count = value.partition("/")
    if not (index.isdigit() and count.isdigit()) or not 0 <= int(index) < int(count):
        raise click.BadParameter(f"{value}: expected I/N with 0 <= I < N, e.g. 3/64", param_hint="--part")
    return int(index), int(count)


out_option = click.option(
    "--out",
    "out",
    required=True,
    metavar="DIR|URL",
    help="Dataset directory to write, or a URL (s3://bucket/prefix) to publish it at (built locally, then uploaded).",
)
stage_option = click.option(
    "--stage",
    type=click.Path(path_type=Path),
    default=None,
    help="With --out URL: build the dataset in this local folder (kept, a dataset like any other) and upload it "
    "from there [default: a temporary folder in TMPDIR, removed afterwards].",
)


@contextlib.contextmanager
def output(out: str, *, stage: Path | None, overwrite: bool) -> Iterator[Path]:
    """The local folder a build or merge writes: `out` itself, or, for a URL, a staging folder whose dataset is
    uploaded to `out` when the block ends without an error (`gq.shards.publish.staged`)."""
    if not is_remote(out):
        if stage is not None:
            raise click.BadParameter("only with --out URL", param_hint="--stage")
        yield Path(out)
        return
    with staged(out, stage=stage, overwrite=overwrite, progress=sys.stderr.isatty()) as local:
        yield local


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", type=click.Path(path_type=Path))
@out_option
@stage_option
@click_options(BuildOptions)  # what shapes the bytes: every field of BuildOptions, help text beside it
@click.option("--workers", type=int, default=None, help="Decoding processes [default: all cores].")
@ray_option("the per-scene work (decode, checks, conversion, checksums)")
@click.option("--resume", is_flag=True, help="Continue an interrupted build, keeping complete shards that verify.")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset in --out.")
@click.option(
    "--allow-missing-scenes",
    is_flag=True,
    help="Build even though --splits names scenes that are not in SOURCE (a partial copy).",
)
@click.option(
    "--part",
    callback=lambda ctx, param, value: _part(value),
    metavar="I/N",
    help="Build part I of N (0 <= I < N): the scenes a hash of the name gives to I; join all N with gq shards merge.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(
    source: Path,
    out: str,
    stage: Path | None,
    workers: int | None,
    ray: str | None,
    resume: bool,
    overwrite: bool,
    allow_missing_scenes: bool,
    part: tuple[int, int] | None,
    quiet: bool,
    **options,
) -> None:
    """Write SOURCE/<name>/scene.npz scenes into fixed-size shards in --out (format 2).

    Each split fills its own shards, its scenes in a seeded order; scene ids are name-sorted positions.
    Stops at the first bad scene (exit 2, nothing left behind) unless --skip-bad. The build is made
    beside --out and replaces it only when complete; --overwrite and --resume touch only a directory
    that is a dataset (or unfinished build) of this format, and a second build into --out is refused.
    """
    if workers is not None and workers < 1:
        raise click.BadParameter(f"{workers}: must be at least 1", param_hint="--workers")
    if options["splits"]:  # recorded in the manifest: an absolute path says which file it was
        options["splits"] = str(Path(options["splits"]).resolve())
    opts = BuildOptions(**options)
    interrupted = (
        f"--out is as it was and the complete new shards are kept beside it: rerun with --resume to finish {out}"
        if not is_remote(out) or stage is not None
        else f"nothing was published at {out}; give --stage DIR to keep a build that --resume can finish"
    )
    with one_line_errors(interrupted=interrupted), output(out, stage=stage, overwrite=overwrite) as local:
        summary = build_shards(
            source,
            local,
            opts,
            workers=workers,
            ray=ray,
            resume=resume,
            overwrite=overwrite,
            progress=not quiet,
            allow_missing_scenes=allow_missing_scenes,
            part=part,
        )
    if is_remote(out):
        summary["out"] = out  # where it is published; the local folder is gone or is --stage
    click.echo(summary_text(summary, summary["wall_s"]))


if __name__ == "__main__":
    main()
