#!/usr/bin/env python
"""Lay out pybullet's example objects as the seed's raw layout (RAW/<name>/mesh.obj), for import_meshes.

python tools/pybullet_objects.py --out data/raw_pybullet --limit 300
"""

from __future__ import annotations

from pathlib import Path

import click

from gq.common.options import one_line_errors
from gq.meshes.pybullet import write_raw


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Raw directory to fill.")
@click.option(
    "--which",
    type=click.Choice(["random", "named"]),
    default="random",
    show_default=True,
    help="random: the 1,000 random_urdfs objects; named: bunny, duck, teddy, mug, ... (other units).",
)
@click.option("--limit", type=int, default=None, help="Only the first N objects by name.")
def main(out: Path, which: str, limit: int | None) -> None:
    """Copy pybullet_data meshes into OUT/<name>/mesh.obj."""
    with one_line_errors():
        names = write_raw(out, which, limit)
    click.echo(f"wrote {len(names)} objects to {out}")


if __name__ == "__main__":
    main()
