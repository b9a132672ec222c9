"""The `vlforge` console script: one subcommand per stage, each registered by its own module."""

from __future__ import annotations

import argparse
import contextlib
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
    "vlforge.report.cli",
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


def entry() -> None:
    """The console script. After the command has finished and every stream is flushed, the
    process ends with os._exit: with torch 2.14 and pyarrow 25 both loaded, the normal
    interpreter teardown aborts ("terminate called without an active exception", SIGABRT) in
    most runs, which would turn a clean exit code into -6. Nothing is left to run by then."""
    code = 1
    try:
        code = main()
    except SystemExit as exc:  # argparse --help / usage errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


if __name__ == "__main__":
    entry()
