"""Beam pipeline options from the CLI: our --workers for DirectRunner, Beam's own flags passed through."""

from __future__ import annotations

import argparse
import contextlib

from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    StandardOptions,
)

from vlforge.errors import UserError

DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"


def _beam_parser(beam_args: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    # DaskOptions is declared by the Dask runner's module, which imports dask (~0.4 s): only when
    # the dask extra is installed are its flags (--dask_client_address, ...) known, and only a
    # command line that names the runner or one of its flags pays for the import.
    if any("dask" in arg.lower() for arg in beam_args):
        with contextlib.suppress(ImportError):
            import apache_beam.runners.dask.dask_runner  # noqa: F401
    seen: set[type] = set()
    stack = list(PipelineOptions.__subclasses__())
    while stack:  # every options class Beam knows (Dataflow, Flink, Spark, portable, ...)
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        stack.extend(cls.__subclasses__())
        with contextlib.suppress(argparse.ArgumentError):  # a flag two classes both declare
            cls._add_argparse_args(parser)
    return parser


def build_options(beam_args: list[str], workers: int) -> PipelineOptions:
    """Reject flags Beam does not know (Beam itself would silently drop them)."""
    _known, unknown = _beam_parser(beam_args).parse_known_args(beam_args)
    if unknown:
        raise UserError(f"unrecognized arguments: {' '.join(unknown)}")
    options = PipelineOptions(beam_args)
    runner = options.view_as(StandardOptions).runner
    if runner in ("DaskRunner", "dask"):
        # Beam knows the Dask runner only by its module path; say so if the extra is missing.
        if "DaskOptions" not in {c.__name__ for c in PipelineOptions.__subclasses__()}:
            raise UserError("--runner DaskRunner needs dask: pip install 'vlforge[dask]'")
        options.view_as(StandardOptions).runner = DASK_RUNNER
        from vlforge.pipeline import dask_fixes

        dask_fixes.install()
    if runner in (None, "DirectRunner", "direct"):
        direct = options.view_as(DirectOptions)
        direct.direct_num_workers = max(1, workers)
        direct.direct_running_mode = "multi_processing" if workers > 1 else "in_memory"
    return options


def is_local(options: PipelineOptions) -> bool:
    """True when DoFns run inside this process, so they can drive our progress bar."""
    runner = options.view_as(StandardOptions).runner
    mode = options.view_as(DirectOptions).direct_running_mode
    return runner in (None, "DirectRunner", "direct") and mode in ("in_memory", "multi_threading")


def assemble_options(options: PipelineOptions) -> PipelineOptions:
    """Options for the global steps: in this process on DirectRunner, unchanged elsewhere."""
    if options.view_as(StandardOptions).runner not in (None, "DirectRunner", "direct"):
        return options
    local = PipelineOptions.from_dictionary(options.get_all_options(drop_default=True))
    direct = local.view_as(DirectOptions)
    direct.direct_num_workers = 1
    direct.direct_running_mode = "in_memory"
    return local
