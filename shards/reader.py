"""Memory-mapped reader: O(1) access to any scene's SDF and labels, or to a whole shard."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gq.common.inputs import check_regular, open_input

from .format import GRASP_DIM, HEADER_BYTES, INDEX, SCORE_COLUMN, SPLITS, DatasetError, Layout, labels_name, sdf_name
from .index import read_index
from .manifest import Manifest, read_manifest


class ShardReader:
    """A finished dataset directory, opened read-only; shard files are mapped on first use.

    Scenes are addressed by id (`scenes.parquet`'s `scene` column); the index gives each its
    record (shard, slot). Index rows are in storage order, so a split's rows are its shards' records.
    NumPy and pyarrow only: usable without torch or DALI.

    Args:
        root: A dataset directory written by `build_shards`.

    Raises:
        DatasetError: No readable manifest (or another format version), or no index. The reader does not
            check contents: `verify` (`gq shards verify`) does, and `open_dataset` runs its quick form.

    Example:
        ```python
        from gq.shards import ShardReader

        reader = ShardReader("data/shards")
        scene = int(reader.index["scene"][0])
        sdf = reader.sdf(scene)  # (D, D, D), float16 as stored
        labels = reader.labels(scene)  # (num_grasps, 20): 19 grasp values, then the score
        grasps, scores = labels[:, :19], labels[:, 19]
        ```
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest: Manifest = read_manifest(self.root)
        self.layout = Layout.from_manifest(self.manifest)
        if not (self.root / INDEX).exists():
            raise DatasetError(f"{self.root / INDEX}: missing index; rebuild the dataset")
        self.index = read_index(self.root / INDEX)
        # Scene ids are sorted source positions; with skipped scenes they have gaps.
        self._row = np.full(self.manifest.source_scenes, -1, dtype=np.int64)
        self._row[self.index["scene"]] = np.arange(len(self.index["scene"]))
        self._maps: dict[str, np.ndarray] = {}

    @property
    def num_scenes(self) -> int:
        return len(self.index["scene"])

    @property
    def num_shards(self) -> int:
        return self.manifest.num_shards

    def sdf_path(self, shard: int) -> Path:
        return self.root / sdf_name(shard)

    def labels_path(self, shard: int) -> Path:
        return self.root / labels_name(shard)

    def _map(self, path: Path) -> np.ndarray:
        if path.name not in self._maps:
            check_regular(path, "shard")  # a FIFO in a shard's place would block the map's open
            self._maps[path.name] = np.load(path, mmap_mode="r")
        return self._maps[path.name]

    def sdf_shard(self, shard: int) -> np.ndarray:
        """The whole shard's SDFs, (R, D, D, D) in the stored dtype, memory-mapped."""
        return self._map(self.sdf_path(shard))

    def labels_shard(self, shard: int) -> np.ndarray:
        """The whole shard's labels, (R, max_grasps, 20) float32, memory-mapped."""
        return self._map(self.labels_path(shard))

    def rows(self, scenes) -> np.ndarray:
        """Index rows of scene ids (KeyError for an id that is not in the dataset)."""
        scenes = np.asarray(scenes, dtype=np.int64)
        inside = (scenes >= 0) & (scenes < len(self._row))
        rows = np.where(inside, self._row[np.where(inside, scenes, 0)], -1)
        if (rows < 0).any():
            raise KeyError(f"scene id {int(scenes[rows < 0].flat[0])} is not in {self.root}")
        return rows

    def column(self, name: str, scenes) -> np.ndarray:
        """One index column (name, split, num_grasps, ...) for the given scene ids."""
        return self.index[name][self.rows(scenes)]

    def read_records(self, kind: str, shard: int, slots: np.ndarray, out: np.ndarray) -> None:
        """Read records `slots` (ascending) of a shard's "sdf" or "labels" file into `out` (one per slot).

        Positional reads straight into the caller's buffer, one per run of consecutive slots: no
        mapping, so no page faults on the source and a single copy (used for bulk loads).
        """
        path = self.sdf_path(shard) if kind == "sdf" else self.labels_path(shard)
        record = self.layout.sdf_record_bytes if kind == "sdf" else self.layout.labels_record_bytes
        slots = np.asarray(slots, dtype=np.int64)
        if out.shape[0] != len(slots) or out.nbytes != len(slots) * record or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous with {len(slots)} records of {record} bytes")
        buffer = memoryview(out.reshape(-1).view(np.uint8))
        breaks = np.flatnonzero(np.diff(slots) != 1) + 1
        with open_input(path, "shard") as f:
            for first, last in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(slots)]])):
                view = buffer[first * record : last * record]
                offset = HEADER_BYTES + int(slots[first]) * record
                while len(view):
                    n = os.preadv(f.fileno(), [view], offset)
                    if n == 0:
                        raise DatasetError(f"{path}: ends before record {int(slots[first])}; rebuild the dataset")
                    view, offset = view[n:], offset + n

    def locate(self, scene: int) -> tuple[int, int]:
        """(shard, slot) of a scene's record."""
        row = self.rows([scene])[0]
        return int(self.index["shard"][row]), int(self.index["slot"][row])

    def sdf(self, scene: int) -> np.ndarray:
        """One scene's SDF, (D, D, D) in the stored dtype (a view into the map)."""
        shard, slot = self.locate(scene)
        return self.sdf_shard(shard)[slot]

    def labels(self, scene: int) -> np.ndarray:
        """One scene's used label rows, (num_grasps, 20): 19 grasp values, then the score."""
        shard, slot = self.locate(scene)
        return self.labels_shard(shard)[slot, : int(self.column("num_grasps", [scene])[0])]

    def grasps(self, scene: int) -> np.ndarray:
        return self.labels(scene)[:, :GRASP_DIM]

    def scores(self, scene: int) -> np.ndarray:
        return self.labels(scene)[:, SCORE_COLUMN]

    def split_scenes(self, split: str) -> np.ndarray:
        """Global ids of a split's scenes, in storage order (shard, then slot)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        return self.index["scene"][self.index["split"] == split]

    def split_shards(self, split: str) -> np.ndarray:
        """The shard numbers that hold a split (consecutive: splits never share a shard)."""
        entry = self.manifest.splits[split]
        return np.arange(entry.first_shard, entry.first_shard + entry.num_shards, dtype=np.int64)
