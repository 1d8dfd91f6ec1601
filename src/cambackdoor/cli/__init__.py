"""``cambackdoor`` command line: train, evaluate, implant, run, sweep, figures, audit.

The top floor: it imports the library and nothing imports it. Each command lives in its own module
(``register`` adds its parser, ``cmd_*`` runs it). User mistakes (CamBackdoorError) print one line
``error: ...`` and exit 2; Ctrl-C exits 130 with a hint to ``--resume``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Sequence

from cambackdoor.cli import audit, evaluate, implant, pipeline, train
from cambackdoor.cli.common import (DEFAULT_DATA, add_attack_args, add_data_args, add_device_arg, default_data,
                                    load_data, parse_sets)
from cambackdoor.errors import CamBackdoorError
from cambackdoor.version import __version__

__all__ = ["main", "build_parser", "DEFAULT_DATA", "add_attack_args", "add_data_args", "add_device_arg",
           "default_data", "load_data", "parse_sets"]
COMMANDS = (train, evaluate, implant, pipeline, audit)  # the order of `cambackdoor --help`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cambackdoor", description="Implant and measure Grad-CAM explanation backdoors.")
    parser.add_argument("--version", action="version", version=f"cambackdoor {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # a warning is one line naming what to do, not a source listing
            warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
            return int(args.func(args) or 0)
    except CamBackdoorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command with --resume (train, implant) or as is (run) to continue", file=sys.stderr)
        return 130
