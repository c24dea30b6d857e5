"""The `fosc` command line: one sub-command per verb, each a thin layer over library functions.

Every verb lives in fosctrain.commands.<verb> with `add_arguments(parser)` and `run(args)`.
Bad input (a UserError, an unknown option) prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from fosctrain import __version__
from fosctrain.errors import UserError

VERBS = {
    "train": "train a model (DAT, Madry, CAT, FAT, TRADES, Fast-AT, natural)",
    "attack": "attack a model on a few examples and show the FOSC of every PGD step",
    "eval": "robust accuracy of a checkpoint or run under a suite of attacks",
    "measure": "FOSC, loss and accuracy against PGD steps (the paper's convergence analysis)",
    "plot": "figures from one or more runs' metrics",
    "reproduce": "run one of the paper's experiments over seeds; tables and figures",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line and exit status 2 (no usage dump)."""

    def error(self, message: str) -> None:
        raise UserError(f"{self.prog}: {message}")


def _load(verb: str):
    return importlib.import_module(f"fosctrain.commands.{verb}")


def build_parser(verbs: list[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="fosc", description="Adversarial training with FOSC convergence control.")
    parser.add_argument("--version", action="version", version=f"fosc {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for verb in verbs or list(VERBS):
        p = sub.add_parser(verb, help=VERBS[verb], description=VERBS[verb])
        _load(verb).add_arguments(p)
    return parser


def _one_line(text: str) -> str:
    """Line breaks (an argument echoed back may hold one) shown escaped, as in repr()."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        verb = next((a for a in argv if not a.startswith("-")), None)
        parser = build_parser([verb] if verb in VERBS else None)
        args = parser.parse_args(argv)
        if args.verb is None:
            parser.print_help()
            return 0
        return int(_load(args.verb).run(args) or 0)
    except UserError as e:
        print(f"fosc: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"fosc: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fosc: interrupted", file=sys.stderr)
        return 130


def entry() -> NoReturn:
    """The `fosc` console script and `python -m fosctrain`: main(), exit with its status. A rank
    of a data-parallel run (torchrun set WORLD_SIZE) exits through distributed.leave."""
    status = main()
    if "WORLD_SIZE" in os.environ:  # lazy: only torchrun's ranks load torch.distributed here
        from fosctrain import distributed

        if distributed.under_launcher():
            distributed.leave(status)
    raise SystemExit(status)
