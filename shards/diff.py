"""What changed between two versions of a dataset, from their manifests and indexes alone (no record is read).

Scenes are matched by name. A scene is `changed` when its record checksum (scenes.parquet's XXH3-64 of its
SDF and labels bytes) differs, `moved` when its split does; the build options that differ come from the
manifests' `made_by.args` and layouts. Records hold `max_grasps` label slots, so datasets built with other
`--max-grasps` or `--dtype` differ in every record's checksum: the options say why.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .format import INDEX, DatasetError
from .index import read_index
from .manifest import read_manifest


def _open(root: Path) -> tuple[dict, dict]:
    """(build options with the layout, index columns) of a dataset."""
    manifest = read_manifest(root)
    if not (root / INDEX).exists():
        raise DatasetError(f"{root / INDEX}: missing index; rebuild the dataset")
    try:
        index = read_index(root / INDEX)
    except ValueError as err:
        raise DatasetError(f"{root / INDEX}: unreadable index ({err}); rebuild the dataset") from None
    # the layout under BuildOptions' names, then the options as given (the same values, and the rest)
    layout = {"grid": manifest.grid[0], "dtype": manifest.sdf_dtype, "max_grasps": manifest.max_grasps,
              "records_per_shard": manifest.records_per_shard}  # fmt: skip
    return layout | dict(manifest.made_by.args), index


def diff_datasets(a: str | Path, b: str | Path) -> dict:
    """The differences from dataset `a` to dataset `b`.

    Returns a JSON-ready dict: `identical` (no difference of any kind), `added` and `removed` (scene names),
    `changed` (names whose record checksum differs), `moved` ({scene, from, to} for names whose split
    differs) and `options` ({option: [value in a, value in b]} for the build options and layout that differ).

    Raises:
        DatasetError: Either directory is not a readable dataset.
    """
    options_a, index_a = _open(Path(a))
    options_b, index_b = _open(Path(b))
    row_a = {name: i for i, name in enumerate(index_a["name"])}
    row_b = {name: i for i, name in enumerate(index_b["name"])}
    common = sorted(set(row_a) & set(row_b))
    ia, ib = np.array([row_a[n] for n in common], np.int64), np.array([row_b[n] for n in common], np.int64)
    changed = np.array(common)[index_a["checksum"][ia] != index_b["checksum"][ib]] if common else []
    moved = [
        {"scene": name, "from": str(index_a["split"][i]), "to": str(index_b["split"][j])}
        for name, i, j in zip(common, ia, ib)
        if index_a["split"][i] != index_b["split"][j]
    ]
    options = {
        key: [options_a.get(key), options_b.get(key)]
        for key in sorted(set(options_a) | set(options_b))
        if options_a.get(key) != options_b.get(key)
    }
    out = {
        "a": str(a),
        "b": str(b),
        "added": sorted(set(row_b) - set(row_a)),
        "removed": sorted(set(row_a) - set(row_b)),
        "changed": [str(n) for n in changed],
        "moved": moved,
        "options": options,
    }
    out["identical"] = not any(out[k] for k in ("added", "removed", "changed", "moved", "options"))
    return out


def diff_lines(diff: dict) -> list[str]:
    """The differences as `diff` prints them: one line per scene or option, a summary line last."""
    lines = [f"+ {name} (added)" for name in diff["added"]]
    lines += [f"- {name} (removed)" for name in diff["removed"]]
    lines += [f"~ {name} (changed: record checksum differs)" for name in diff["changed"]]
    lines += [f"> {m['scene']} (moved: {m['from']} -> {m['to']})" for m in diff["moved"]]
    lines += [f"! option {key}: {va!r} -> {vb!r}" for key, (va, vb) in diff["options"].items()]
    if diff["identical"]:
        return [f"{diff['a']} and {diff['b']}: the same scenes, records, splits and build options"]
    counts = {k: len(diff[k]) for k in ("added", "removed", "changed", "moved", "options")}
    return lines + [f"{diff['a']} -> {diff['b']}: " + ", ".join(f"{v} {k}" for k, v in counts.items())]
