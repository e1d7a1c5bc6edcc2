"""The options that shape a dataset's bytes (`BuildOptions`), shared by `gq shards build`, `ShardWriter` and merge."""

from __future__ import annotations

from dataclasses import dataclass

from gq.common.grasps import SEED_MAX_GRASPS
from gq.common.options import option

from .format import SDF_DTYPES, Layout
from .outdir import BuildError

MAX_RECORD_BYTES = 1 << 28  # 256 MiB: a 256^3 float32 grid is 64 MiB; the seed's 480 grasps take 38 kB
MAX_SHARD_BYTES = 1 << 36  # 64 GiB per shard file


@dataclass(frozen=True)
class BuildOptions:
    """Everything that shapes the bytes of a dataset (recorded in the manifest); each field is a make_shards option."""

    grid: int = option(48, help="SDF grid size D (every scene must be D^3).")
    dtype: str = option("float16", choices=SDF_DTYPES, help="Stored SDF dtype.")
    records_per_shard: int = option(256, help="Records R in every shard file.")
    max_grasps: int = option(SEED_MAX_GRASPS, help="Grasp slots per record.")
    splits: str | None = option(
        None, help="The seed's splits.json; every scene must be in it. Default: split by a hash of the name."
    )
    val_fraction: float = option(0.1, help="Hash split: share of scenes in val.")
    test_fraction: float = option(0.1, help="Hash split: share of scenes in test.")
    limit: int | None = option(None, help="Use only the first N scenes by name.")
    skip_bad: bool = option(False, help="Skip bad scenes (listed in DIR/skipped.jsonl) instead of stopping.")
    shuffle_seed: int = option(0, help="Seed of the stored order of each split's scenes (a hash of seed and name).")

    def check(self) -> None:
        if self.dtype not in SDF_DTYPES:
            raise BuildError(f"--dtype {self.dtype}: choose one of {', '.join(SDF_DTYPES)}")
        for flag, value in (
            ("--grid", self.grid),
            ("--records-per-shard", self.records_per_shard),
            ("--max-grasps", self.max_grasps),
        ):
            if value < 1:
                raise BuildError(f"{flag} {value}: must be at least 1")
        if self.grid % 2:
            raise BuildError(f"--grid {self.grid}: must be even (records are whole 32-bit words)")
        layout = self.layout()
        record = layout.sdf_record_bytes + layout.labels_record_bytes
        if record > MAX_RECORD_BYTES:
            raise BuildError(
                f"--grid {self.grid} --max-grasps {self.max_grasps}: one record would take "
                f"{record:,} bytes (SDF {layout.sdf_record_bytes:,} + labels "
                f"{layout.labels_record_bytes:,}), over the {MAX_RECORD_BYTES >> 20} MiB limit; "
                f"the seed's scenes have 48^3 grids and at most {SEED_MAX_GRASPS} grasps"
            )
        if record * self.records_per_shard > MAX_SHARD_BYTES:
            raise BuildError(
                f"--records-per-shard {self.records_per_shard}: a shard would take "
                f"{record * self.records_per_shard:,} bytes ({record:,} per record), over the "
                f"{MAX_SHARD_BYTES >> 30} GiB limit; use fewer records per shard"
            )
        if self.shuffle_seed < 0:
            raise BuildError(f"--shuffle-seed {self.shuffle_seed}: must be >= 0")
        if self.limit is not None and self.limit < 1:
            raise BuildError(f"--limit {self.limit}: must be at least 1")
        if not (self.val_fraction >= 0 and self.test_fraction >= 0 and self.val_fraction + self.test_fraction < 1):
            raise BuildError(
                f"--val-fraction {self.val_fraction} --test-fraction {self.test_fraction}: "
                "each must be >= 0 and together < 1"
            )

    def layout(self) -> Layout:
        return Layout(self.grid, self.dtype, self.max_grasps, self.records_per_shard)
