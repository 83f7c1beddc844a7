"""Argument parsing shared by the subcommands: one-line errors, ``KEY=VALUE`` arguments, sizes
(``N`` or ``HxW``) and defaults shown in ``--help``."""

from __future__ import annotations

import argparse
import ast
from typing import Any, NoReturn, Sequence


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``PROG: error: MESSAGE``, and exit code 2
    (argparse's own print the whole usage first), whose help shows every default, and which takes
    options by their full names only (no abbreviations: ``--out`` is not ``--output``)."""

    def __init__(self, *args: Any, formatter_class: type = None, **kwargs: Any) -> None:  # type: ignore[assignment]
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, formatter_class=formatter_class or HelpFormatter, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Appends each option's default to its help, unless the help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text.lower() or default is None or default is False or default == argparse.SUPPRESS
            or isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._StoreTrueAction,
                                   argparse._StoreFalseAction))
        ):
            return text
        return f"{text} (default: {show(default)})" if text else f"default: {show(default)}"


def show(value: Any) -> str:
    """A default as ``--help`` shows it: lists and tuples space-separated, as they are typed."""
    if isinstance(value, (list, tuple)):
        return " ".join(show(v) for v in value) or "none"
    if isinstance(value, dict):
        return " ".join(f"{k}={v!r}" for k, v in value.items()) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    if value is True:
        return "on"
    if value is False:
        return "off"
    if value is None:
        return "auto"
    return str(value)


def parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """``["dims=(16,32,64,128)", "pattern=paper"]`` -> ``{"dims": (16, 32, 64, 128), "pattern": "paper"}``.

    Values are Python literals; a bare word is a string. Raises ValueError naming the bad item.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"{item!r} is not KEY=VALUE")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            if not text or not (text[0].isalpha() or text[0] == "_") or any(c in text for c in "()[]{}'\""):
                raise ValueError(
                    f"{key}={text}: {text!r} is not a Python literal (e.g. 3, 0.5, (16, 32), 'name')"
                ) from None
            value = text  # a bare word, e.g. pattern=paper
        out[key] = value
    return out


class KwargsAction(argparse.Action):
    """``--model-kwargs KEY=VALUE ...`` -> a dict (see :func:`parse_kwargs`)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        try:
            parsed = parse_kwargs(values or [])
        except ValueError as err:
            parser.error(f"argument {option_string}: {err}")
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest, None) or {}), **parsed})


def parse_size(text: str) -> tuple[int, int]:
    """``"512"`` -> (512, 512); ``"512x1024"`` -> (512, 1024) (height x width)."""
    parts = str(text).lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values, default=0) < 1:
        raise argparse.ArgumentTypeError(f"an input size is N or HxW with positive integers, got {text!r}")
    return values[0], values[-1]


def square_size(text: str) -> int:
    """An argparse type: ``N`` (or ``NxN``) for commands whose input is square."""
    height, width = parse_size(text)
    if height != width:
        raise argparse.ArgumentTypeError(f"this command takes a square input size, got {text!r}")
    return height


def parse_weights(pairs: list[str]) -> dict[str, str]:
    """``["model=path", ...]`` -> ``{model: path}``."""
    weights = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--weights takes MODEL=FILE, got {pair!r}")
        weights[name] = path
    return weights


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def apply_threads(threads: int | None) -> None:
    """``--threads N``: the CPU threads torch uses from now on (None: leave torch's default)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
