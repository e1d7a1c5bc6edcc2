"""MkDocs hook: a search path where the API page's reader (griffe) finds the `gq` packages.

The installed package maps gq.<name> to the repository's folders (setup.cfg, `package_dir`), and an editable
install serves that mapping through an import hook that griffe does not follow. So before the pages are read,
build/docs-path/gq/<name> becomes a link to each mapped folder (as benchmarks/gpu_check.sh does), and
mkdocs.yml lists build/docs-path as the handler's search path.
"""

from __future__ import annotations

import configparser
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SEARCH_PATH = REPO / "build" / "docs-path"


def package_dirs(setup_cfg: Path) -> dict[str, str]:
    """setup.cfg's package_dir: {"gq.shards": "shards", ...}."""
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    lines = cfg["options"]["package_dir"].strip().splitlines()
    return dict((part.strip() for part in line.split("=", 1)) for line in lines if "=" in line)


def on_startup(**kwargs) -> None:
    """Make build/docs-path/gq/<name> -> <repo>/<folder> for every mapped package (links replaced each build).

    At startup, not on_config: mkdocstrings reads its search paths in its own on_config, which runs first.
    """
    root = SEARCH_PATH / "gq"
    root.mkdir(parents=True, exist_ok=True)
    for package, folder in package_dirs(REPO / "setup.cfg").items():
        link = root / package.removeprefix("gq.")
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(REPO / folder, target_is_directory=True)
