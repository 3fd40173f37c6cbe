"""Test plugins shared by several test modules (and by plugin files the tests write)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from dlm_decode.caches import DualCache

__all__ = ["TagParams", "TaggedDual", "install_example", "plugin_env", "run_example_tests"]


class TagParams(BaseModel):
    """Params of ``tagged_dual``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tag: int = 0


class TaggedDual(DualCache):
    """``dual`` with an argument that changes nothing but its label (a test plugin)."""

    name: ClassVar[str] = "tagged_dual"
    Params: ClassVar[type[BaseModel]] = TagParams


def install_example(example: Path, tmp_path_factory: Any) -> Path:
    """pip-install a copy of an example plugin package into a fresh folder (returned), so
    that no build files land in the repository."""
    src = tmp_path_factory.mktemp("src") / example.name
    shutil.copytree(example, src, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = tmp_path_factory.mktemp("site")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
    cmd += ["--no-index", "--quiet", "--disable-pip-version-check", "--target", str(site)]
    done = subprocess.run([*cmd, str(src)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"pip install of {example.name} failed:\n{done.stderr}"
    return site


def plugin_env(site: Path, plugin: str) -> dict[str, str]:
    """The environment of a subprocess that loads ``plugin`` from ``site`` only."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    env.update(DLM_DECODE_PLUGINS=plugin, WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    return env


def run_example_tests(example: Path, module: str, site: Path, plugin: str, tmp: Path) -> str:
    """Run a copy of an example package's own tests against its installed copy (the source
    module is removed from the copy); returns pytest's output."""
    work = tmp / example.name
    shutil.copytree(example, work, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    (work / f"{module}.py").unlink()  # the tests must import the installed copy
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(work / "tests")],
        cwd=work,
        env=plugin_env(site, plugin),
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    return done.stdout
