"""`gq`: one command for everything a user runs; each subcommand is the click command of its module.

Subcommands are imported when they run (or when their help is asked for), so `gq --help` and `gq shards
verify` start without torch or DALI. `tools/*.py` and `train/run.py` remain entry points to the same commands.
"""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.util
import logging
from pathlib import Path

import click

from gq.common import __version__

# name -> "module:command", or a nested group of the same shape
COMMANDS: dict = {
    "scenes": "gq.tools.make_scenes:main",
    "import-meshes": "gq.tools.import_meshes:main",
    "pybullet-objects": "gq.tools.pybullet_objects:main",
    "shards": {
        "_help": "Build, merge, verify, upload and download shard datasets; their statistics and differences.",
        "build": "gq.tools.make_shards:main",
        "verify": "gq.tools.verify_shards:cli",
        "merge": "gq.tools.merge_shards:main",
        "upload": "gq.tools.remote_shards:upload",
        "download": "gq.tools.remote_shards:download",
        "stats": "gq.tools.look:stats_cmd",
        "diff": "gq.tools.look:diff_cmd",
    },
    "show": "gq.tools.look:show_cmd",
    "fit": "gq.tools.training:fit_cmd",
    "compare": "gq.tools.training:compare_cmd",
    "eval": "gq.tools.training:eval_cmd",
    "predict": "gq.tools.training:predict_cmd",
    "gpu-check": "gq.benchmarks.gpu_check:main",
    "bench": {
        "_help": "Benchmarks: each prints its figures against a baseline measured in the same run.",
        "loaders": "gq.benchmarks.bench_loaders:main",
        "train": "gq.benchmarks.bench_train:main",
        "shards": "gq.benchmarks.bench_shards:main",
        "scenes": "gq.benchmarks.bench_scenes:main",
        "import": "gq.benchmarks.bench_import:main",
        "generalisation": "gq.benchmarks.bench_generalisation:main",
        "scale": "gq.benchmarks.bench_scale:main",
        "cluster": "gq.benchmarks.bench_cluster:main",
        "stats": "gq.benchmarks.bench_stats:main",
        "remote": "gq.benchmarks.bench_remote:main",
    },
}
CONTEXT = {"help_option_names": ["-h", "--help"]}
# Libraries whose INFO lines ("Found credentials in environment variables.") would drown gq's own.
QUIET_LOGGERS = ("botocore", "aiobotocore", "s3fs", "fsspec")


def with_version(command: click.Command) -> click.Command:
    """Give `command` a --version option (once), so every level of `gq` answers it."""
    if not any(p.name == "version" for p in command.params):
        click.version_option(__version__, "--version", package_name="gq-pipeline", prog_name="gq")(command)
    return command


class LazyGroup(click.Group):
    """A group whose commands are imported on first use from "module:attribute" specs."""

    def __init__(self, *args, specs: dict, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.specs = {k: v for k, v in specs.items() if not k.startswith("_")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.specs)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        spec = self.specs.get(name)
        if spec is None:
            return None
        if isinstance(spec, dict):
            return with_version(LazyGroup(name, specs=spec, help=spec.get("_help"), context_settings=CONTEXT))
        module, attr = spec.split(":")
        command = getattr(importlib.import_module(module), attr)
        if command.name != name:  # the module's own name for it (main, cli): under gq it is called `name`
            command = copy.copy(command)
            command.name = name
        return with_version(command)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help without importing the commands' modules (torch, DALI: seconds): their docstrings, read as text.
        rows = [
            (name, spec.get("_help", "") if isinstance(spec, dict) else _summary(spec))
            for name, spec in self.specs.items()
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _summary(spec: str) -> str:
    """The first line of the docstring of the function behind "module:command", from its source."""
    module, attr = spec.split(":")
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == attr)
    return (ast.get_docstring(node) or "").split("\n")[0]


@click.group(cls=LazyGroup, specs=COMMANDS, context_settings=CONTEXT)
@click.version_option(__version__, "--version", package_name="gq-pipeline", prog_name="gq")
def main() -> None:
    """Grasp-quality estimation on signed distance fields: data, training, evaluation, prediction.

    gq scenes / import-meshes make scenes; gq shards build / verify make datasets, gq shards stats / diff and
    gq show look at them; gq fit trains;
    gq eval and gq predict use a checkpoint; gq compare and gq bench measure; gq gpu-check checks a GPU machine.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for chatty in QUIET_LOGGERS:
        logging.getLogger(chatty).setLevel(logging.WARNING)


if __name__ == "__main__":
    main()
