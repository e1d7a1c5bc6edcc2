"""Optional extras (setup.cfg's extras_require): their packages are imported only where a command uses them.

So every `--help` works on a plain install, and a command that needs a missing extra ends with one line
naming the install command, not a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import UsageError


class MissingExtraError(UsageError):
    """A package of an optional extra that is not installed; `str()` names the pip command that installs it."""


def _missing(module: str, extra: str) -> str:
    return f"{module} is not installed; it comes with the {extra} extra: pip install 'gq-pipeline[{extra}]'"


def import_extra(module: str, extra: str) -> ModuleType:
    """`import module`, or MissingExtraError: "MODULE is not installed; ...: pip install 'gq-pipeline[EXTRA]'"."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(_missing(module, extra)) from None


def missing_extra(module: str, extra: str) -> str | None:
    """What `import_extra` would say, or None when `module` is installed: found without importing it, for a check
    before any work of a package that is slow to import (TensorBoard, wandb)."""
    return None if importlib.util.find_spec(module) else _missing(module, extra)
