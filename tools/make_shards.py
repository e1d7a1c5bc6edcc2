#!/usr/bin/env python
"""Build a shard dataset from the seed's processed layout: SOURCE/<name>/scene.npz -> --out DIR."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from shards import BuildError, BuildOptions, SceneError, SourceError, SplitError, build_shards, format_table


def _summary(s: dict, wall_s: float) -> str:
    st = s["score_stats"]
    lines = [f"dataset   {s['out']}"]
    rows = [(split, f"{c['scenes']:,} scenes", f"{c['grasps']:,} grasps") for split, c in s["splits"].items()]
    lines += format_table([("", "<6"), ("", ">15"), ("", ">18")], rows, sep="  ", header=False)
    lines.append(
        f"shards    {s['shards']} x {s['records'] // s['shards']} records ({s['records'] - s['scenes']} padding)"
    )
    lines.append(
        f"on disk   {s['bytes_on_disk'] / 1e6:,.1f} MB ({s['bytes_on_disk'] / s['scenes'] / 1e3:,.1f} kB/scene; "
        f"apparent size {s['bytes_apparent'] / 1e6:,.1f} MB)"
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


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Dataset directory to write.")
@click.option("--grid", default=48, show_default=True, help="SDF grid size D (every scene must be D^3).")
@click.option("--records-per-shard", default=256, show_default=True, help="Records R in every shard file.")
@click.option(
    "--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True, help="Stored SDF dtype."
)
@click.option("--max-grasps", default=480, show_default=True, help="Grasp slots per record.")
@click.option(
    "--splits",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The seed's splits.json; every scene must be in it. Default: split by a hash of the name.",
)
@click.option("--val-fraction", default=0.1, show_default=True, help="Hash split: share of scenes in val.")
@click.option("--test-fraction", default=0.1, show_default=True, help="Hash split: share of scenes in test.")
@click.option(
    "--shuffle-seed",
    default=0,
    show_default=True,
    help="Seed of the stored order of each split's scenes (a hash of seed and name).",
)
@click.option("--workers", type=int, default=None, help="Decoding processes [default: all cores].")
@click.option("--limit", type=int, default=None, help="Use only the first N scenes by name.")
@click.option("--resume", is_flag=True, help="Continue an interrupted build, keeping complete shards that verify.")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset in --out.")
@click.option(
    "--allow-missing-scenes",
    is_flag=True,
    help="Build even though --splits names scenes that are not in SOURCE (a partial copy).",
)
@click.option("--skip-bad", is_flag=True, help="Skip bad scenes (listed in DIR/skipped.jsonl) instead of stopping.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(
    source: Path,
    out: Path,
    grid: int,
    records_per_shard: int,
    dtype: str,
    max_grasps: int,
    splits: Path | None,
    val_fraction: float,
    test_fraction: float,
    shuffle_seed: int,
    workers: int | None,
    limit: int | None,
    resume: bool,
    overwrite: bool,
    allow_missing_scenes: bool,
    skip_bad: bool,
    quiet: bool,
) -> None:
    """Write SOURCE/<name>/scene.npz scenes into fixed-size shards in --out (format 2).

    Each split fills its own shards, its scenes in a seeded order; scene ids are name-sorted positions.
    Stops at the first bad scene (exit 2, nothing left behind) unless --skip-bad. The build is made
    beside --out and replaces it only when complete; --overwrite and --resume touch only a directory
    that is a dataset (or unfinished build) of this format, and a second build into --out is refused.
    """
    if workers is not None and workers < 1:
        raise click.BadParameter(f"{workers}: must be at least 1", param_hint="--workers")
    opts = BuildOptions(
        grid=grid,
        dtype=dtype,
        records_per_shard=records_per_shard,
        max_grasps=max_grasps,
        splits=str(splits.resolve()) if splits else None,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        limit=limit,
        skip_bad=skip_bad,
        shuffle_seed=shuffle_seed,
    )
    try:
        summary = build_shards(
            source,
            out,
            opts,
            workers=workers,
            resume=resume,
            overwrite=overwrite,
            progress=not quiet,
            allow_missing_scenes=allow_missing_scenes,
        )
    except (SceneError, BuildError, SplitError, SourceError) as err:
        click.echo(f"make_shards: error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo(
            f"make_shards: interrupted; --out is as it was and the complete new shards are kept "
            f"beside it: rerun with --resume to finish {out}",
            err=True,
        )
        sys.exit(130)
    click.echo(_summary(summary, summary["wall_s"]))


if __name__ == "__main__":
    main()
