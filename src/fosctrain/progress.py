"""Progress for long-running verbs: a live bar when stderr is a terminal, and otherwise (CI
logs, nohup, files) nothing but the one line per unit of work the verb reports with `line`,
instead of thousands of carriage-return updates."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm


def interactive(stream: TextIO | None = None) -> bool:
    """Whether `stream` (default stderr) is a terminal, where a live bar can redraw itself."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def bar(iterable: Iterable, *, enabled: bool = True, **options: Any) -> tqdm:
    """A tqdm bar on stderr, drawn only when `enabled` and stderr is a terminal."""
    return tqdm(iterable, disable=not (enabled and interactive()), file=sys.stderr, **options)


def line(text: str) -> None:
    """One line on stderr, printed above a live bar if one is drawn."""
    tqdm.write(text, file=sys.stderr)
