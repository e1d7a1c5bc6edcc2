"""Command-line options derived from dataclass fields: the help text lives next to the field.

A field made with `option(...)` is an option of every command built with `click_options(cls)`;
its flag is `--field-name` unless given, its type and default come from the field, its choices
from the same constant the config checks against. So a config class is the one source of truth
for its options, and `flag(cls, name)` spells an option the same way in error messages.
`one_line_errors` ends a command on a known failure with one line on stderr and an exit code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from .errors import GQError

_SIMPLE = (int, float, str)


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | None = None,
    short: str | None = None,
    choices: Sequence[str] | None = None,
) -> Any:
    """A dataclass field that is also a command-line option (`flag` "--on/--off" for a boolean pair)."""
    meta = {"help": help, "flag": flag, "short": short, "choices": tuple(choices) if choices else None}
    return dataclasses.field(default=default, metadata=meta)


def flag(cls: type, name: str) -> str:
    """How the command line spells field `name` of `cls`, e.g. "--plateau-factor" ("--quiet" for a pair's off)."""
    meta = next(f.metadata for f in dataclasses.fields(cls) if f.name == name)
    spelled = meta.get("flag") or "--" + name.replace("_", "-")
    return spelled.split("/")[-1] if "/" in spelled else spelled


def _click_type(hint: Any, choices: tuple[str, ...] | None) -> Any:
    """int, float or str (or X | None of them) as themselves; anything else (tuples, unions) as text the
    config's __post_init__ parses."""
    if choices:
        return click.Choice(choices)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else str
    return hint if hint in _SIMPLE else str


def click_options(
    cls: type,
    *,
    exclude: Sequence[str] = (),
    only: Sequence[str] | None = None,
    defaults: dict[str, Any] | None = None,
    help: dict[str, str] | None = None,
) -> Callable[[Callable], Callable]:
    """A decorator adding one click option per `option(...)` field of `cls` (in field order), less `exclude`
    (or only those in `only`: a few of a config's options on another command).

    `defaults` and `help` override a field's default and help text for this command only.
    """
    defaults, help = defaults or {}, help or {}
    hints = typing.get_type_hints(cls)
    decorators = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata or f.name in exclude or (only is not None and f.name not in only):
            continue
        meta = f.metadata
        default = defaults.get(f.name, f.default)
        decls = [meta["flag"] or "--" + f.name.replace("_", "-")] + ([meta["short"]] if meta["short"] else [])
        kwargs: dict[str, Any] = {"help": help.get(f.name, meta["help"])}
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs.update(default=default, show_default=default is not None and default is not False)
        if hints[f.name] is bool:
            kwargs["is_flag"] = True
        else:
            kwargs["type"] = _click_type(hints[f.name], meta["choices"])
        decorators.append(click.option(*decls, f.name, **kwargs))

    def apply(fn: Callable) -> Callable:
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


def ray_option(work: str) -> Callable[[Callable], Callable]:
    """`--ray [ADDRESS]` of the commands whose `work` can run as Ray tasks (`common.executor`): the address,
    `local` when given alone, None when absent."""
    return click.option(
        "--ray",
        "ray",
        is_flag=False,
        flag_value="local",
        default=None,
        metavar="[ADDRESS]",
        help=f"Run {work} as Ray tasks on the Ray cluster at ADDRESS (auto: the one `ray start` made here); "
        "alone: on a private one on this machine. Needs pip install 'gq-pipeline[ray]'; the input and --out on a "
        "file system every node sees.",
    )


@contextlib.contextmanager
def one_line_errors(*errors: tuple, prog: str | None = None, interrupted: str | None = None) -> Iterator[None]:
    """Known failures end a command with one line on stderr and an exit code, not a traceback.

    A `GQError` ends with its own `exit_code`; each of `errors` adds (exception type or types, exit code[, text
    after the message]) for other types, the first that matches wins: `PROG: error: MESSAGE[TEXT]`. PROG is the
    command as the user typed it (`gq fit`, `run.py fit`: click's command path) unless given. With `interrupted`,
    Ctrl-C ends it with `PROG: interrupted; INTERRUPTED` and exit code 130. A `with` block, or a decorator.
    """
    errors = ((GQError, None), *errors)
    caught = tuple(t for e in errors for t in (e[0] if isinstance(e[0], tuple) else (e[0],)))
    try:
        yield
    except caught as err:
        _, code, *text = next(e for e in errors if isinstance(err, e[0]))
        click.echo(f"{prog or _command_path()}: error: {err}{''.join(text)}", err=True)
        sys.exit(err.exit_code if code is None else code)
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        click.echo(f"{prog or _command_path()}: interrupted; {interrupted}", err=True)
        sys.exit(130)


def _command_path() -> str:
    ctx = click.get_current_context(silent=True)
    return ctx.command_path if ctx else Path(sys.argv[0]).name
