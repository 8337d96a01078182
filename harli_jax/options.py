"""Config fields that are also command-line options: each field's default and help are written once, on the
dataclass, and the `harli` commands read both from there."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any


def option(default: Any, help: str) -> Any:
    """A dataclass field with its help line."""
    return dataclasses.field(default=default, metadata={"help": help})


def field_of(cls: type, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def help_of(cls: type, name: str, default: Any = dataclasses.MISSING) -> str:
    """The field's help line with its default (or with `default`, where a command sets its own)."""
    f = field_of(cls, name)
    if default is dataclasses.MISSING:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    text = f.metadata.get("help", name.replace("_", " "))
    if default is None:
        return text  # the help says what unset means
    return f"{text} (default {','.join(map(str, default)) if isinstance(default, tuple) else default})"


def add_option(parser: argparse.ArgumentParser, flag: str, cls: type, name: str,
               shown_default: Any = dataclasses.MISSING, **kwargs) -> None:
    """`--flag` for `cls.name`: its help and default come from the field (or the command's own default,
    `shown_default`); the parsed value is None unless given, so that the layers below it apply (see `given`)."""
    if "action" not in kwargs and "choices" not in kwargs:
        kwargs.setdefault("metavar", name.upper())
    kwargs.setdefault("help", help_of(cls, name, shown_default))
    parser.add_argument(flag, dest=f"{cls.__name__}.{name}", default=None, **kwargs)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options for `cls` that the command line set."""
    prefix = f"{cls.__name__}."
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


def default_of(fn: Callable, name: str) -> Any:
    """The default of a keyword parameter of `fn`."""
    return inspect.signature(fn).parameters[name].default
