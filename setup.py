"""Packaging beside pyproject.toml: the package from src/, plus the repository's datasets/ and
results/ shipped inside it as ``edgellm._data.datasets`` / ``edgellm._data.results`` (what
``edgellm.paths`` reads outside a checkout).  pyproject.toml's declarative ``packages.find`` cannot
add packages that live outside ``src/``, hence this file."""

from setuptools import find_namespace_packages, setup

DATA = {"edgellm._data.datasets": "datasets", "edgellm._data.results": "results"}

setup(packages=find_namespace_packages("src", include=["edgellm", "edgellm.*"]) + list(DATA),
      package_dir={"": "src", **DATA})
