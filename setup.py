"""For Beam's `--setup_file ./setup.py` (Dataflow and other remote runners): Beam builds an sdist
of this project with it and every worker pip-installs that sdist, dependencies included. All the
metadata is in pyproject.toml; this file only lets `python setup.py sdist` find it where the
`build` package is not installed (Beam falls back to that command)."""

from setuptools import setup

setup()
