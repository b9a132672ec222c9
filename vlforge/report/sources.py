"""Where the report's inputs are: the crawl corpus, the shards to browse, the training run.

A corpus directory is what `vlforge corpus` writes (manifest.json with stage "corpus",
stats.parquet, shards). Featurize and mine write shard directories with their own manifest whose
`config.in` names the directory they read; following those links both ways lets the report start
from any of the three and find the others:
  - `--corpus` may name the crawl output or a featurized/mined directory (its chain back to the
    crawl output is followed);
  - without `--shards`, the latest stage found next to the corpus (mined, else featurized, else the
    corpus itself) is the one whose samples are browsed.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand

from vlforge.errors import UserError

# Stage manifests the chain walk understands, in pipeline order.
STAGE_ORDER = ("corpus", "featurize", "mine")


@dataclass
class Sources:
    corpus: Path  # the crawl output: manifest.json + stats.parquet
    manifest: dict
    shards: list[Path]  # the .tar files whose samples are browsed and counted
    shard_origin: str  # how the shards were chosen, shown on the page
    stages: dict[str, dict] = field(default_factory=dict)  # stage name → its manifest
    stage_dirs: dict[str, Path] = field(default_factory=dict)
    run: Path | None = None


def read_manifest(directory: Path) -> dict | None:
    path = directory / "manifest.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not readable JSON ({err})") from None
    return data if isinstance(data, dict) else None


def _input_of(manifest: dict) -> str | None:
    source = (manifest.get("config") or {}).get("in")
    return source if isinstance(source, str) else None


def _same_dir(recorded: str, target: Path, seen_from: Path) -> bool:
    """A manifest records `config.in` as typed (often relative to the cwd of that run); accept
    it when it resolves to the target from here, or names a sibling with the target's name."""
    candidate = Path(recorded)
    if candidate.exists() and candidate.resolve() == target.resolve():
        return True
    return (
        candidate.name == target.name
        and seen_from.resolve().parent == target.resolve().parent
        and not candidate.is_absolute()
    )


def _resolve_input(recorded: str, seen_from: Path) -> Path | None:
    """The directory a stage read, from here or as a sibling of the stage's own directory."""
    for candidate in (Path(recorded), seen_from.parent / Path(recorded).name):
        if (candidate / "manifest.json").is_file():
            return candidate
    return None


def find_corpus(path: Path) -> tuple[Path, dict, dict[str, Path]]:
    """The crawl output for `path`, its manifest, and the later stage dirs met on the way."""
    if not path.exists():
        raise UserError(f"--corpus {path}: no such directory")
    if not path.is_dir():
        raise UserError(f"--corpus {path}: not a directory")
    met: dict[str, Path] = {}
    here = path
    for _ in range(len(STAGE_ORDER)):
        manifest = read_manifest(here)
        stage = (manifest or {}).get("stage")
        if stage == "corpus" or (manifest is not None and (here / "stats.parquet").exists()):
            return here, manifest or {}, met
        if stage in STAGE_ORDER:
            met[stage] = here
            recorded = _input_of(manifest or {})
            upstream = _resolve_input(recorded, here) if recorded else None
            if upstream is None:
                break
            here = upstream
            continue
        break
    raise UserError(
        f"--corpus {path}: not a corpus directory (expected manifest.json and stats.parquet "
        "written by `vlforge corpus`)"
    )


def find_later_stages(corpus: Path, met: dict[str, Path]) -> dict[str, Path]:
    """Featurized and mined directories next to the corpus that (transitively) read it."""
    found = dict(met)
    parent = corpus.resolve().parent
    siblings = sorted(p for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
    manifests = {p: read_manifest(p) for p in siblings if (p / "manifest.json").is_file()}
    upstream = corpus
    for stage in STAGE_ORDER[1:]:
        if stage not in found:
            for directory, manifest in manifests.items():
                recorded = _input_of(manifest or {})
                if (
                    (manifest or {}).get("stage") == stage
                    and recorded
                    and _same_dir(recorded, upstream, directory)
                ):
                    found[stage] = directory
                    break
        if stage in found:  # a missing stage is skipped: the next may have read the one before
            upstream = found[stage]
    return found


def expand_shards(pattern: str) -> list[Path]:
    """Local shard patterns: brace ranges, globs, directories (their *.tar), `::`-separated."""
    out: list[Path] = []
    for one in (s.strip() for s in pattern.split("::")):
        for item in braceexpand.braceexpand(one) if one else ():
            if os.path.isdir(item):
                out.extend(Path(p) for p in sorted(glob.glob(os.path.join(item, "*.tar"))))
            elif any(c in item for c in "*?["):
                out.extend(Path(p) for p in sorted(glob.glob(item)))
            elif os.path.isfile(item):
                out.append(Path(item))
            else:
                raise UserError(f"--shards: shard not found: {item}")
    if not out:
        raise UserError(f"--shards {pattern!r}: no .tar shards found")
    return out


def locate(corpus: Path, run: Path | None = None, shards: str | None = None) -> Sources:
    """Check every input and decide which shards the page browses; bad input is a UserError."""
    root, manifest, met = find_corpus(Path(corpus))
    stage_dirs = find_later_stages(root, met)
    stages = {name: read_manifest(d) or {} for name, d in stage_dirs.items()}
    if shards:
        shard_paths, origin = expand_shards(shards), f"--shards {shards}"
    else:
        latest = next((s for s in reversed(STAGE_ORDER[1:]) if s in stage_dirs), None)
        directory = stage_dirs[latest] if latest else root
        shard_paths = sorted(directory.glob("*.tar"))
        origin = f"{latest or 'corpus'} stage at {directory}"
    if run is not None:
        run = Path(run)
        if not (run / "metrics.jsonl").is_file():
            raise UserError(f"--run {run}: no metrics.jsonl (not a training run directory)")
    return Sources(
        corpus=root,
        manifest=manifest,
        shards=shard_paths,
        shard_origin=origin,
        stages=stages,
        stage_dirs=stage_dirs,
        run=run,
    )
