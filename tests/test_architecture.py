"""The package's shape: no import cycles, imports where they belong, no built-in plugin's
knowledge in the core, and an install that puts nothing generic at the top of
site-packages.

The import graph is built from the source with ``ast`` (module-level imports only, the
ones that run when a module is imported), over the modules as they install: the folders
``policies/`` and ``caches/`` are ``dlm_decode.policies`` and ``dlm_decode.caches``.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomllib

import dlm_decode
from dlm_decode.registry import BUILTIN_PLUGINS

ROOT = Path(__file__).resolve().parents[1]
#: Installed package name → source folder (``[tool.setuptools.package-dir]``).
FOLDERS = {"dlm_decode": ROOT / "dlm_decode"}
FOLDERS.update(
    {
        name: ROOT / folder
        for name, folder in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"][
            "setuptools"
        ]["package-dir"].items()
    }
)

#: Third-party modules a function may import lazily: optional extras and heavy imports that
#: only some commands need (so ``import dlm_decode`` stays lean). Anything first-party, or
#: light, belongs at the top of the module.
LAZY_ALLOWED = {
    "accelerate",
    "datasets",
    "huggingface_hub",
    "lm_eval",
    "math_verify",
    "matplotlib",
    "PIL",  # image prompts (the vision extra)
    "psutil",
    "transformers",
    "wandb",
    "resource",  # Unix only
    "tokenizers",  # built with transformers' tokenizer classes
}


def _modules() -> dict[str, Path]:
    """Installed module name → source file, for every module of the package."""
    out: dict[str, Path] = {}
    for pkg, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve_from(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The modules an import statement imports (first-party or not)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    base = _resolve_from(module, node)
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        yield sub if sub in MODULES else base


def _module_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run at import time: top level, including inside ``if``/``try`` blocks,
    but not ``if TYPE_CHECKING:`` blocks or function and class bodies' functions."""
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if "TYPE_CHECKING" not in test:
                stack += node.body + node.orelse
        elif isinstance(node, ast.Try):
            stack += node.body + node.orelse + node.finalbody
            for h in node.handlers:
                stack += h.body
        elif isinstance(node, ast.ClassDef):
            stack += [n for n in node.body if not isinstance(n, ast.FunctionDef)]


def import_graph() -> dict[str, set[str]]:
    """First-party module → first-party modules it imports at module level."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        deps = set()
        for node in _module_level_imports(tree):
            deps |= {t for t in _targets(name, node) if t in MODULES and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first = last), or ``None``."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_every_module_is_seen() -> None:
    assert "dlm_decode.policies.rules" in MODULES and "dlm_decode.caches" in MODULES
    assert "dlm_decode.models.native" in MODULES and "dlm_decode.settings" in MODULES
    assert len(MODULES) > 40


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert graph["dlm_decode.ablate.runner"] >= {"dlm_decode.ablate.report"}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_function_level_imports_only_defer_optional_heavy_dependencies() -> None:
    bad = []
    for _name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = set(map(id, _module_level_imports(tree)))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
                continue
            if isinstance(node, ast.ImportFrom) and node.level:
                roots = {"dlm_decode"}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                roots = {a.name.split(".")[0] for a in node.names}
            if not roots <= LAZY_ALLOWED:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    # The sandbox's child-process programs are source text, not imports of this process.
    assert not bad, "imports inside functions:\n" + "\n".join(bad)


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    names = sorted(n for n in MODULES if not n.endswith("__main__"))
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    done = subprocess.run(
        [sys.executable, "-c", code, *names], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]


# --------------------------------------------------------------------------------------
# No plugin's knowledge in the core
# --------------------------------------------------------------------------------------


def _builtin_param_names() -> set[str]:
    names: set[str] = set()
    for kind in ("policy", "cache"):
        for row in dlm_decode.list_plugins(kind):
            if row["source"] in BUILTIN_PLUGINS:
                names |= set(row["params"])
    return names


def _core_files() -> list[Path]:
    core = FOLDERS["dlm_decode"]
    return [p for p in sorted(core.rglob("*.py"))]


def _docstring_nodes(tree: ast.Module) -> set[int]:
    """Strings that document rather than run: docstrings (of modules, classes, functions
    and attributes) and argparse ``help=`` texts."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            out.add(id(node.value))
        if isinstance(node, ast.keyword) and node.arg == "help":
            out |= {id(n) for n in ast.walk(node.value)}
    return out


def test_no_builtin_plugin_parameter_appears_in_the_core() -> None:
    """The core (``dlm_decode/`` outside the built-in policies and caches) never names a
    built-in plugin's parameter: no ``{"margin": …}``, ``margin=…``, ``.margin`` or
    ``["margin"]``. Defaults come from the plugins' own ``Params``."""
    params = _builtin_param_names()
    assert {"margin", "threshold", "factor", "eta"} <= params
    found = []
    for path in _core_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = _docstring_nodes(tree)
        for node in ast.walk(tree):
            hit = None
            if isinstance(node, ast.Dict):
                hit = next(
                    (
                        k.value
                        for k in node.keys
                        if isinstance(k, ast.Constant) and k.value in params
                    ),
                    None,
                )
            elif isinstance(node, ast.keyword) and node.arg in params:
                hit = node.arg
            elif isinstance(node, ast.Attribute) and node.attr in params:
                owner = node.value  # only `…params.margin`: a method named `score` is fine
                name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
                if name == "params":
                    hit = node.attr
            elif (
                isinstance(node, ast.Subscript)
                and isinstance(node.slice, ast.Constant)
                and node.slice.value in params
            ):
                hit = node.slice.value
            elif (
                isinstance(node, ast.Constant)
                and id(node) not in docs
                and isinstance(node.value, str)
                and any(re.search(rf"(?<![\w.]){re.escape(p)}=", node.value) for p in params)
            ):
                hit = node.value
            if hit is not None:
                found.append(f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}: {hit}")
    assert not found, "built-in plugin parameters in the core:\n" + "\n".join(found)


def test_capabilities_are_declared_not_listed() -> None:
    fast = (FOLDERS["dlm_decode"] / "fast.py").read_text()
    assert "dlm_decode.policies" not in fast and "dlm_decode.caches" not in fast
    from dlm_decode.caches import DualCache, NoCache, PrefixCache
    from dlm_decode.policies.rules import FixedPolicy, FrechetPolicy, ThresholdPolicy

    assert all(c.capturable for c in (NoCache, PrefixCache, DualCache))
    assert ThresholdPolicy.capturable and FrechetPolicy.capturable
    assert not FixedPolicy.capturable  # it reads the step index


# --------------------------------------------------------------------------------------
# Packaging
# --------------------------------------------------------------------------------------


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    packages = {n for n in MODULES if _is_package(n)}
    assert packages == listed


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "--disable-pip-version-check",
            "-w",
            str(out),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("dlm_decode-*.whl")
    return path


def test_the_wheel_installs_everything_under_dlm_decode(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"dlm_decode"}, tops
    assert "dlm_decode/policies/rules.py" in names and "dlm_decode/caches/__init__.py" in names
    assert "dlm_decode/assets/tiny/config.json" in names
    (ep,) = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(ep).decode()
    assert '"dlm_decode.policies" = dlm_decode.policies' in text or (
        "dlm_decode.policies = dlm_decode.policies" in text
    )


def test_a_stray_policies_module_on_the_path_changes_nothing(tmp_path: Path) -> None:
    for name in ("policies", "caches"):
        (tmp_path / f"{name}.py").write_text("raise RuntimeError('shadowed the built-ins')\n")
    done = subprocess.run(
        [sys.executable, "-m", "dlm_decode", "plugins", "--json"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "DLM_DECODE_PLUGINS": ""},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"frechet.v1"' in done.stdout and '"dual.v1"' in done.stdout


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dlm_decode", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and "quickstart" in done.stdout


def test_a_third_party_entry_point_named_like_a_folder_is_a_plugin_like_any_other() -> None:
    from dlm_decode.registry import Registry

    plugin = importlib.import_module("dlm_decode.policies")
    third = type(sys)("third_party_policies")
    reg = Registry.build(
        [(n, importlib.import_module(m)) for n, m in BUILTIN_PLUGINS.items()]
        + [("policies", third)]
    )
    assert reg.names("policy") and plugin is not third
