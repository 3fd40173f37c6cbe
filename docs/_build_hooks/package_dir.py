"""A griffe extension for the docs build: the repository's top-level ``policies/`` and
``caches/`` folders install as ``dlm_decode.policies`` and ``dlm_decode.caches`` (setuptools'
``package-dir`` mapping), which griffe's static finder cannot see. When ``dlm_decode`` is
loaded, this loads each mapped folder and attaches it under its installed name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import griffe

ROOT = Path(__file__).resolve().parents[2]
#: Installed submodule name → folder of the repository (as in pyproject.toml).
MAPPED = {"policies": ROOT / "policies", "caches": ROOT / "caches"}


class PackageDirMapping(griffe.Extension):
    """Attach the mapped folders to the ``dlm_decode`` package."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "dlm_decode":
            return
        for name, folder in MAPPED.items():
            sub = griffe.GriffeLoader(
                search_paths=[str(folder.parent)], docstring_parser=loader.docstring_parser
            ).load(folder.name)
            sub.name = name
            sub.parent = pkg
            pkg.set_member(name, sub)
