"""Command-line flags derived from pydantic models: `loop serve` from Settings, `loop scheduler config` from the
scheduler's tunables. A field `max_model_len` is the flag `--max-model-len`; its type, choices and help (the
field's description, its LOOP_* variable and its default) come from the field, so a new setting is a new flag with
no CLI code. Booleans get `--x` / `--no-x`; lists take one string (comma-separated where the setting splits commas
itself, else shell words: `--vllm-args "--seed 1"`). A flag that is not given leaves the value to the environment
and the defaults. Tests: tests/unit/config/test_cli_flags.py.
"""

from __future__ import annotations

import argparse
import shlex
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import NoDecode

# Flags older than the generated ones, kept working: field -> (flag, the value it sets, help).
ALIASES: dict[str, tuple[str, Any, str]] = {
    "worker_enabled": ("--no-worker", False, "do not start the training worker (= --no-worker-enabled)"),
    "json_logs": ("--text-logs", False, "plain-text logs instead of JSON (= --no-json-logs)"),
}


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def _plain_type(annotation: Any) -> Any:
    """`Annotated[X, ...] | None` -> X; other annotations unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            annotation = args[0]
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _converter(field: FieldInfo) -> dict[str, Any]:
    """argparse's type/choices/action for one field."""
    kind = _plain_type(field.annotation)
    if typing.get_origin(kind) is typing.Literal:
        return {"choices": list(typing.get_args(kind))}
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(kind) is list:
        # A NoDecode list has a validator that splits commas itself; any other list is shell words.
        return {"type": str if NoDecode in field.metadata else shlex.split, "metavar": "LIST"}
    if kind in (int, float, str, Path):
        return {"type": kind, "metavar": {int: "N", float: "X", str: "TEXT", Path: "PATH"}[kind]}
    raise TypeError(f"no command-line form for {field.annotation!r}: teach loop/cli/flags.py one")


def _help(name: str, field: FieldInfo, env_prefix: str | None, show_default: bool) -> str:
    text = (field.description or "").rstrip(".")
    notes = []
    if env_prefix is not None:
        notes.append(f"{env_prefix}{name.upper()}")
    if show_default and field.default_factory is None and field.default not in (None, PydanticUndefined):
        default = field.default  # an unset (None) default is explained by the description
        notes.append(f"default: {str(default).lower() if isinstance(default, bool) else default}")
    if notes:
        text += f" ({'; '.join(notes)})"
    return text.replace("%", "%%")  # argparse %-formats help


def add_model_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, model: type[BaseModel],  # noqa: SLF001
                    names: Iterable[str] | None = None, *, skip: Iterable[str] = (),
                    env_prefix: str | None = None, show_default: bool = True) -> list[str]:
    """Add `--<field>` for the model's fields (all, or `names`), each storing under the field's name and None when
    not given. Returns the field names added."""
    fields = model.model_fields
    chosen = [n for n in (fields if names is None else names) if n not in set(skip)]
    for name in chosen:
        field = fields[name]
        parser.add_argument(flag_of(name), dest=name, default=None,
                            help=_help(name, field, env_prefix, show_default), **_converter(field))
        if name in ALIASES:
            flag, value, text = ALIASES[name]
            parser.add_argument(flag, dest=name, action="store_const", const=value, help=text)
    return chosen


def given(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The values of the flags that were given on the command line."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Every long option of `parser` -> the field (dest) it sets; for tests and for error messages."""
    return {opt: action.dest for action in parser._actions for opt in action.option_strings  # noqa: SLF001
            if opt.startswith("--")}
