"""The shard format: SDF grids and grasp labels in fixed-size, memory-mappable NPY shards.

Written by `ShardWriter` (pushed scenes; `build_shards` is a loop over it, `merge_parts` joins parts; both
place records through `assemble.py`), read by `ShardReader`, described by
`manifest.json` (typed as `Manifest`) and indexed by `scenes.parquet`. NumPy and pyarrow only: no torch, no DALI.
"""

from gq.common import __version__  # noqa: F401 (the tool version recorded in manifests)

from .build import BuildError, BuildOptions, build_shards  # noqa: E402
from .format import (  # noqa: E402
    FORMAT_NAME,
    FORMAT_VERSION,
    GRASP_DIM,
    LABEL_DIM,
    SCORE_COLUMN,
    SPLITS,
    FileEntry,
    Layout,
    Manifest,
    Provenance,
    ScoreStats,
    SplitInfo,
)
from .manifest import DatasetError, fingerprint, read_manifest  # noqa: E402
from .merge import merge_parts  # noqa: E402
from .reader import ShardReader  # noqa: E402
from .shard_writer import ShardWriter  # noqa: E402
from .source import SceneError, SourceError  # noqa: E402
from .splits import SplitError, part_of  # noqa: E402
from .verify import VerifyResult, verify  # noqa: E402

__all__ = [
    "BuildError",
    "BuildOptions",
    "build_shards",
    "ShardWriter",
    "merge_parts",
    "part_of",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GRASP_DIM",
    "LABEL_DIM",
    "SCORE_COLUMN",
    "SPLITS",
    "FileEntry",
    "Layout",
    "Manifest",
    "Provenance",
    "ScoreStats",
    "SplitInfo",
    "DatasetError",
    "fingerprint",
    "read_manifest",
    "ShardReader",
    "SceneError",
    "SourceError",
    "SplitError",
    "VerifyResult",
    "verify",
]
