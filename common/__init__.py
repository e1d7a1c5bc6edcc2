"""What every package of `gq` uses: atomic writes, click options from dataclass fields, text tables, errors.

The ground floor beside `gq.shards`: NumPy-free, torch-free, DALI-free, so any package may import it.
"""

__version__ = "0.2.0"

from .errors import GQError, UsageError  # noqa: E402
from .files import swap_in_dir, write_atomically  # noqa: E402
from .grasps import GRASP_DIM, SEED_MAX_GRASPS  # noqa: E402
from .options import click_options, flag, one_line_errors, option  # noqa: E402
from .table import format_table  # noqa: E402

__all__ = [
    "GRASP_DIM",
    "SEED_MAX_GRASPS",
    "GQError",
    "UsageError",
    "click_options",
    "flag",
    "format_table",
    "one_line_errors",
    "option",
    "swap_in_dir",
    "write_atomically",
]
