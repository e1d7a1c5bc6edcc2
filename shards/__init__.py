"""The shard format: SDF grids and grasp labels in fixed-size, memory-mappable NPY shards.

Written by `build_shards` (through `ShardWriter`), read by `ShardReader`, described by
`manifest.json` and indexed by `scenes.parquet`. NumPy and pyarrow only: no torch, no DALI.
"""

__version__ = "0.1.0"

from .build import BuildError, BuildOptions, build_shards  # noqa: E402
from .format import FORMAT_NAME, FORMAT_VERSION, GRASP_DIM, LABEL_DIM, SCORE_COLUMN  # noqa: E402
from .manifest import DatasetError, fingerprint, read_manifest  # noqa: E402
from .reader import SPLITS, ShardReader  # noqa: E402
from .source import SceneError, SourceError  # noqa: E402
from .splits import SplitError  # noqa: E402
from .verify import verify  # noqa: E402
from .writer import Layout  # noqa: E402

__all__ = [
    "BuildError",
    "BuildOptions",
    "build_shards",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GRASP_DIM",
    "LABEL_DIM",
    "SCORE_COLUMN",
    "DatasetError",
    "fingerprint",
    "read_manifest",
    "SPLITS",
    "ShardReader",
    "SceneError",
    "SourceError",
    "SplitError",
    "verify",
    "Layout",
]
