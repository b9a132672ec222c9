"""The `vlforge` console script: one subcommand per stage, each registered by its own module."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from vlforge.errors import UserError

# Each stage registers its own subcommand; adding a stage is one line here.
STAGE_CLIS = (
    "vlforge.world.cli",
    "vlforge.pipeline.cli",
    "vlforge.featurize.cli",
    "vlforge.pipeline.mine_cli",
    "vlforge.train.cli",
    "vlforge.demo",
)


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; a user asked for one clear line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"vlforge: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="vlforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    for module in STAGE_CLIS:
        importlib.import_module(module).add_parser(sub)
    return parser


def _quiet_libraries() -> None:
    # Beam and albumentations print import-time warnings that drown the one line a user needs.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    logging.basicConfig(level=logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra_args", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_args = extra
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        sys.stderr.write(f"vlforge: error: {err}\n")
        return 2
    except BrokenPipeError:  # `vlforge ... | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        sys.stderr.write("vlforge: interrupted; finished chunks are kept, rerun to resume\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
