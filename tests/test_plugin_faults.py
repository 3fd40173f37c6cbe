"""Broken third-party plugins never break the built-ins, and names have owners.

Each test installs fake distributions into a fresh folder: a ``*.dist-info`` with an
``entry_points.txt`` in the group ``dlm_decode`` beside the plugin's module file, so
``importlib.metadata`` finds them exactly as it finds a pip-installed plugin (with a
distribution name and version). Covered: an import that raises or hangs, a hook that
raises, a bad class, a duplicate key or entry-point name (each skipped with one
one-line ``PluginLoadWarning``); the same plugin named in ``DLM_DECODE_PLUGINS`` (an
error); lazy import (a built-in's name never imports third-party code); and name
ownership (another plugin's ``frechet.v2`` never takes over the bare name ``frechet``).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
import time
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest

import dlm_decode
from dlm_decode import registry as registry_module
from dlm_decode.cli import _settings_line
from dlm_decode.hookspecs import hookimpl
from dlm_decode.policies.rules import FrechetPolicy
from dlm_decode.registry import (
    PluginLoadError,
    PluginLoadWarning,
    PluginNameWarning,
    Registry,
    UnknownPluginError,
)
from dlm_decode.settings import resolve

#: A module that registers policies ``(name, version)`` and then runs ``after``.
POLICY_MODULE = """
from typing import ClassVar

from dlm_decode.hookspecs import hookimpl
from dlm_decode.interfaces import CommitPolicy


def _policy(name, version):
    def select(self, confidence, masked, state):
        return masked.clone()

    attrs = {{"name": name, "version": version, "select": select, "__doc__": "a fake"}}
    return type(f"Fake_{{name}}_v{{version}}", (CommitPolicy,), attrs)


CLASSES = [_policy(n, v) for n, v in {specs!r}]


@hookimpl
def register_commit_policies(register):
    for cls in CLASSES:
        register(cls)
{after}
"""


def policy_module(*specs: tuple[str, int], after: str = "") -> str:
    """Source of a plugin module registering fake policies ``(name, version)``; ``after``
    is indented into the hook after the registrations (e.g. a ``raise``)."""
    body = textwrap.indent(textwrap.dedent(after).strip(), "    ") if after else ""
    return POLICY_MODULE.format(specs=list(specs), after=body)


FRECHET_V2 = """
from dlm_decode.hookspecs import hookimpl
from dlm_decode.policies.rules import FrechetPolicy


class FrechetV2(FrechetPolicy):
    \"\"\"Another distribution's frechet, version 2.\"\"\"

    version = 2


@hookimpl
def register_commit_policies(register):
    register(FrechetV2)
"""


class Site:
    """A folder of fake installed distributions, on ``sys.path`` for one test."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def install(self, dist: str, entry_points: dict[str, str], **modules: str) -> None:
        """Write distribution ``dist`` (version 0.3.0) declaring ``entry_points``
        (name → module) and the module files ``modules`` (name → source)."""
        info = self.root / f"{dist.replace('-', '_')}-0.3.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3.0\n")
        eps = "".join(f"{n} = {v}\n" for n, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[dlm_decode]\n{eps}")
        for name, source in modules.items():
            (self.root / f"{name}.py").write_text(source)
        importlib.invalidate_caches()


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    """An empty fake site on ``sys.path``; every plugin allowed, default timeout. The
    fake modules and the process-wide registry are put back afterwards."""
    root = tmp_path / "site"
    root.mkdir()
    before = set(sys.modules)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv(registry_module.ENV_VAR, raising=False)
    monkeypatch.delenv(registry_module.TIMEOUT_ENV_VAR, raising=False)
    yield Site(root)
    for name in set(sys.modules) - before:
        if name.startswith("dlm_fake_"):
            del sys.modules[name]
    monkeypatch.setenv(registry_module.ENV_VAR, "")
    registry_module.reset_registry([])


def one_warning(caught: list[warnings.WarningMessage], category: type[Warning]) -> str:
    """The one warning of ``category`` in ``caught``, checked to be one line."""
    msgs = [str(w.message) for w in caught if issubclass(w.category, category)]
    assert len(msgs) == 1, msgs
    assert "\n" not in msgs[0]
    return msgs[0]


def load_all(reg: Registry) -> tuple[list[str], list[warnings.WarningMessage]]:
    """The registry's policy names (which loads every plugin) and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = reg.names("policy")
    return names, caught


# --------------------------------------------------------------------------------------
# A. A broken plugin is skipped with one warning; the built-ins and healthy plugins work
# --------------------------------------------------------------------------------------

BROKEN_MODULES: dict[str, tuple[str, str]] = {
    # case → (module source, text the warning must contain)
    "import_raises": (
        "import dlm_fake_dependency_that_is_not_installed\n",
        "ModuleNotFoundError: No module named 'dlm_fake_dependency_that_is_not_installed'",
    ),
    "hook_raises": (
        policy_module(("lost_rule", 1), after="raise RuntimeError('the GPU is on fire')"),
        "RuntimeError: the GPU is on fire",
    ),
    "not_a_subclass": (
        "from dlm_decode.hookspecs import hookimpl\n\n"
        "class NotAPolicy:\n    name = 'not_a_policy'\n\n"
        "@hookimpl\ndef register_commit_policies(register):\n    register(NotAPolicy)\n",
        "TypeError: plugin 'broken' registered",
    ),
    "bad_name": (
        policy_module(("Bad Name", 1)),
        "TypeError: plugin 'broken': Fake_Bad Name_v1.name must be a lower-case identifier",
    ),
    "misspelled_hook": (
        "from dlm_decode.hookspecs import hookimpl\n\n"
        "@hookimpl\ndef register_comit_policies(register):\n    pass\n",
        "TypeError: unknown hook 'register_comit_policies'",
    ),
    "duplicate_of_a_builtin": (
        "from dlm_decode.hookspecs import hookimpl\n"
        "from dlm_decode.policies.rules import FrechetPolicy\n\n"
        "@hookimpl\ndef register_commit_policies(register):\n    register(FrechetPolicy)\n",
        "ValueError: duplicate policy 'frechet.v1': registered by 'dlm_decode.policies' "
        "and again by 'broken'",
    ),
    "exits_on_import": ("raise SystemExit(3)\n", "SystemExit: 3"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_MODULES))
def test_a_broken_plugin_is_skipped_with_one_warning_naming_it_and_the_fix(
    site: Site, case: str
) -> None:
    source, expected = BROKEN_MODULES[case]
    site.install("dlm-fake-broken", {"broken": "dlm_fake_broken"}, dlm_fake_broken=source)
    site.install(
        "dlm-fake-healthy",
        {"healthy": "dlm_fake_healthy"},
        dlm_fake_healthy=policy_module(("healthy_rule", 1)),
    )
    reg = Registry.from_entry_points()
    names, caught = load_all(reg)
    msg = one_warning(caught, PluginLoadWarning)
    assert msg.startswith(
        "skipped dlm_decode plugin 'broken' (distribution dlm-fake-broken 0.3.0): "
    )
    assert expected in msg
    assert msg.endswith(
        "uninstall it or fix it; DLM_DECODE_PLUGINS=healthy limits which plugins load"
    )
    assert {"frechet", "threshold", "healthy_rule"} <= set(names)
    assert "lost_rule" not in names and "not_a_policy" not in names
    assert reg.resolve("policy", "frechet") is FrechetPolicy
    assert reg.resolve("cache", "dual").name == "dual"
    assert [f.plugin for f in reg.failures] == ["broken"]
    assert reg.sources[("policy", "healthy_rule", 1)] == "healthy"
    assert reg.sources[("policy", "frechet", 1)] == "dlm_decode.policies"
    # one warning per registry: looking again does not warn again
    again, caught = load_all(reg)
    assert again == names and not [w for w in caught if w.category is PluginLoadWarning]


def test_the_public_api_and_every_lookup_keep_working_beside_a_broken_plugin(site: Site) -> None:
    site.install(
        "dlm-fake-broken",
        {"broken": "dlm_fake_broken"},
        dlm_fake_broken=policy_module(("lost_rule", 1), after="raise RuntimeError('boom')"),
    )
    registry_module.reset_registry()
    assert dlm_decode.get_policy("frechet").key == "frechet.v1"
    assert resolve(policy="threshold").policy_ref.key == "threshold.v1"
    with pytest.warns(PluginLoadWarning, match="skipped dlm_decode plugin 'broken'"):
        rows = dlm_decode.list_plugins("policy")
    assert "frechet.v1" in {r["key"] for r in rows}
    assert "dlm_decode.models" in set(registry_module.get_registry().sources.values())


def test_asking_for_a_name_only_the_broken_plugin_registers_names_it_and_its_error(
    site: Site,
) -> None:
    site.install(
        "dlm-fake-halfway",
        {"halfway": "dlm_fake_halfway"},
        dlm_fake_halfway=policy_module(("lost_rule", 1), after="raise RuntimeError('boom')"),
    )
    reg = Registry.from_entry_points()
    with pytest.warns(PluginLoadWarning), pytest.raises(UnknownPluginError) as info:
        reg.resolve("policy", "lost_rule")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(
        "policy 'lost_rule' comes from dlm_decode plugin 'halfway' "
        "(distribution dlm-fake-halfway 0.3.0), which failed to load: RuntimeError: boom;"
    )
    assert "uninstall it or fix it" in msg
    with pytest.raises(UnknownPluginError, match="comes from dlm_decode plugin 'halfway'"):
        reg.resolve("policy", "lost_rule.v1")


def test_a_name_an_unimportable_plugin_might_provide_names_it(site: Site) -> None:
    site.install(
        "dlm-fake-topk",
        {"topk": "dlm_fake_topk"},
        dlm_fake_topk="import dlm_fake_dependency_that_is_not_installed\n",
    )
    reg = Registry.from_entry_points()
    with pytest.warns(PluginLoadWarning), pytest.raises(UnknownPluginError) as info:
        reg.resolve("policy", "topk")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("policy 'topk' would come from dlm_decode plugin 'topk'")
    assert "ModuleNotFoundError" in msg
    with pytest.raises(UnknownPluginError) as info:
        reg.resolve("policy", "frechett")
    msg = str(info.value)
    assert "\n" not in msg and "Did you mean 'frechet'" in msg
    assert "Plugins that failed to load and may provide it: 'topk' (ModuleNotFoundError" in msg


def test_a_broken_plugin_named_in_the_env_var_is_an_error_naming_it(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    site.install(
        "dlm-fake-broken",
        {"broken": "dlm_fake_broken"},
        dlm_fake_broken=policy_module(("lost_rule", 1), after="raise RuntimeError('boom')"),
    )
    monkeypatch.setenv(registry_module.ENV_VAR, "broken")
    reg = Registry.from_entry_points()
    assert reg.resolve("policy", "frechet") is FrechetPolicy  # built-ins need no plugin
    expected = (
        "dlm_decode plugin 'broken' (distribution dlm-fake-broken 0.3.0), named in "
        "DLM_DECODE_PLUGINS, failed to load: RuntimeError: boom; fix it or uninstall it, "
        "or remove it from DLM_DECODE_PLUGINS"
    )
    for ask in (reg.listing, lambda: reg.names("policy"), lambda: reg.resolve("policy", "x")):
        with pytest.raises(PluginLoadError) as info:
            ask()
        assert str(info.value) == expected
        assert isinstance(info.value, ValueError)  # the CLI prints it as one error line
    with pytest.raises(PluginLoadError, match="named in DLM_DECODE_PLUGINS"):
        Registry.build(registry_module.entry_point_plugins())


def test_an_unimportable_plugin_named_in_the_env_var_fails_eager_loading(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    site.install("dlm-fake-gone", {"gone": "dlm_fake_gone"}, dlm_fake_gone="import nope_zz\n")
    monkeypatch.setenv(registry_module.ENV_VAR, "gone")
    with pytest.raises(PluginLoadError, match=r"plugin 'gone' .*ModuleNotFoundError"):
        registry_module.entry_point_plugins()


def test_entry_point_plugins_skips_a_broken_plugin_and_build_remembers_it(site: Site) -> None:
    """The eager path (``Registry.build(entry_point_plugins())``, used by sweeps)."""
    site.install("dlm-fake-gone", {"gone": "dlm_fake_gone"}, dlm_fake_gone="import nope_zz\n")
    site.install(
        "dlm-fake-hook",
        {"hook": "dlm_fake_hook"},
        dlm_fake_hook=policy_module(("hook_rule", 1), after="raise RuntimeError('boom')"),
    )
    with pytest.warns(PluginLoadWarning) as caught:
        reg = Registry.build(registry_module.entry_point_plugins())
    msgs = sorted(str(w.message) for w in caught)
    assert len(msgs) == 2 and all("\n" not in m for m in msgs)
    assert "plugin 'gone'" in msgs[0] and "plugin 'hook'" in msgs[1]
    assert reg.resolve("policy", "frechet") is FrechetPolicy
    with pytest.raises(UnknownPluginError, match="comes from dlm_decode plugin 'hook'"):
        reg.resolve("policy", "hook_rule")
    with pytest.raises(UnknownPluginError, match="would come from dlm_decode plugin 'gone'"):
        reg.resolve("policy", "gone")


def test_a_failing_builtin_is_still_a_hard_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def register_commit_policies(register: Callable[[type], None]) -> None:
        raise RuntimeError("built-in bug")

    fake = types.ModuleType("dlm_decode.policies")
    fake.register_commit_policies = hookimpl(register_commit_policies)  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="built-in bug"):
        Registry.build([("dlm_decode.policies", fake)])
    monkeypatch.setitem(registry_module.BUILTIN_PLUGINS, "dlm_decode.gone", "dlm_fake_no_such")
    with pytest.raises(ModuleNotFoundError, match="dlm_fake_no_such"):
        Registry.from_entry_points()


def test_plugins_command_lists_the_builtins_beside_a_broken_plugin(site: Site) -> None:
    site.install(
        "dlm-fake-broken",
        {"broken": "dlm_fake_broken"},
        dlm_fake_broken=policy_module(("lost_rule", 1), after="raise RuntimeError('boom')"),
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site.root), *sys.path])}
    env.pop(registry_module.ENV_VAR, None)
    done = subprocess.run(
        [sys.executable, "-m", "dlm_decode", "plugins", "--kind", "policy"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "frechet.v1" in done.stdout and "lost_rule" not in done.stdout
    lines = [ln for ln in done.stderr.splitlines() if "dlm-decode: warning:" in ln]
    assert len(lines) == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "skipped dlm_decode plugin 'broken' (distribution dlm-fake-broken 0.3.0)" in lines[0]
    assert "RuntimeError: boom; uninstall it or fix it" in lines[0]


# --------------------------------------------------------------------------------------
# B. Third-party plugins are imported only when needed, each within a time limit
# --------------------------------------------------------------------------------------


def test_a_builtins_name_never_imports_a_third_party_plugin(site: Site) -> None:
    site.install(
        "dlm-fake-spy",
        {"spy": "dlm_fake_spy"},
        dlm_fake_spy=policy_module(("spy_rule", 1)),
    )
    registry_module.reset_registry()
    reg = registry_module.get_registry()
    for kind, key in [("policy", "frechet"), ("policy", "frechet.v1"), ("cache", "dual")]:
        reg.resolve(kind, key)
    resolve(policy="frechet", cache="dual")
    dlm_decode.get_policy("threshold", threshold=0.8)
    assert "dlm_fake_spy" not in sys.modules
    assert reg.resolve("policy", "spy_rule").name == "spy_rule"  # a miss imports it
    assert "dlm_fake_spy" in sys.modules


def test_listing_imports_every_allowed_plugin(site: Site) -> None:
    site.install(
        "dlm-fake-spy", {"spy": "dlm_fake_spy"}, dlm_fake_spy=policy_module(("spy_rule", 1))
    )
    reg = Registry.from_entry_points()
    assert "dlm_fake_spy" not in sys.modules
    rows = {r["key"]: r for r in reg.listing()}
    assert "dlm_fake_spy" in sys.modules
    assert rows["spy_rule.v1"]["source"] == "spy" and rows["spy_rule.v1"]["default"]


def test_a_plugin_whose_import_hangs_is_skipped_after_the_timeout(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    site.install(
        "dlm-fake-sleepy",
        {"sleepy": "dlm_fake_sleepy"},
        dlm_fake_sleepy="import time\ntime.sleep(60)\n",
    )
    site.install(
        "dlm-fake-healthy",
        {"healthy": "dlm_fake_healthy"},
        dlm_fake_healthy=policy_module(("healthy_rule", 1)),
    )
    monkeypatch.setenv(registry_module.TIMEOUT_ENV_VAR, "0.5")
    start = time.monotonic()
    reg = Registry.from_entry_points()
    assert reg.resolve("policy", "frechet") is FrechetPolicy
    assert time.monotonic() - start < 5  # the hang is never waited for here
    names, caught = load_all(reg)
    assert time.monotonic() - start < 10
    msg = one_warning(caught, PluginLoadWarning)
    assert msg.startswith("skipped dlm_decode plugin 'sleepy' (distribution dlm-fake-sleepy")
    assert "importing it took longer than 0.5 s (DLM_DECODE_PLUGIN_TIMEOUT; raise it" in msg
    assert "DLM_DECODE_PLUGINS=healthy limits which plugins load" in msg
    assert "healthy_rule" in names and "frechet" in names


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf"])
def test_an_invalid_timeout_is_a_one_line_error(
    site: Site, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    site.install("dlm-fake-any", {"any": "dlm_fake_any"}, dlm_fake_any=policy_module(("a", 1)))
    monkeypatch.setenv(registry_module.TIMEOUT_ENV_VAR, value)
    with pytest.raises(ValueError) as info:
        Registry.from_entry_points()
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"DLM_DECODE_PLUGIN_TIMEOUT={value!r} is not a number of seconds > 0")


def test_the_timeout_defaults_to_30_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(registry_module.TIMEOUT_ENV_VAR, raising=False)
    assert registry_module._timeout_from_env() == registry_module.DEFAULT_TIMEOUT_S == 30
    monkeypatch.setenv(registry_module.TIMEOUT_ENV_VAR, "2.5")
    assert registry_module._timeout_from_env() == 2.5


# --------------------------------------------------------------------------------------
# C. Names have owners
# --------------------------------------------------------------------------------------


def test_an_installed_frechet_v2_does_not_take_over_the_bare_name(site: Site) -> None:
    site.install(
        "dlm-fake-frechet2", {"frechet2": "dlm_fake_frechet2"}, dlm_fake_frechet2=FRECHET_V2
    )
    registry_module.reset_registry()
    reg = registry_module.get_registry()
    assert reg.resolve("policy", "frechet") is FrechetPolicy
    assert "dlm_fake_frechet2" not in sys.modules  # the built-in answered
    with pytest.warns(PluginNameWarning) as caught:
        v2 = reg.resolve("policy", "frechet.v2")
    msg = one_warning(list(caught), PluginNameWarning)
    assert msg == (
        "plugin 'frechet2' (distribution dlm-fake-frechet2 0.3.0) registers policy "
        "'frechet.v2' under the name 'frechet', which belongs to the built-ins: the bare "
        "name 'frechet' still means 'frechet.v1'; ask for 'frechet.v2' to use this one, or "
        "give the class a name of its own"
    )
    assert v2.__module__ == "dlm_fake_frechet2" and v2.version == 2
    assert reg.resolve("policy", "frechet") is FrechetPolicy  # still, after loading it
    assert reg.resolve_key("policy", "frechet") == "frechet.v1"
    assert reg.resolve_key("policy", "frechet.v2") == "frechet.v2"


def test_what_a_run_reports_is_the_resolved_versioned_key(site: Site) -> None:
    site.install(
        "dlm-fake-frechet2", {"frechet2": "dlm_fake_frechet2"}, dlm_fake_frechet2=FRECHET_V2
    )
    registry_module.reset_registry()
    default = resolve()  # the CLI's default policy is the bare name
    assert default.config.policy == "frechet.v1" and default.policy_ref.key == "frechet.v1"
    assert default.describe()["policy"] == "frechet.v1"
    assert "[frechet.v1]" in _settings_line(default)
    with pytest.warns(PluginNameWarning):
        named = resolve(policy="frechet.v2")
    assert named.config.policy == "frechet.v2" and named.describe()["policy"] == "frechet.v2"
    assert "[frechet.v2]" in _settings_line(named)
    assert resolve(policy="frechet").config.policy == "frechet.v1"


class Shared(FrechetPolicy):
    """``shared`` version 1 (a test plugin)."""

    name: ClassVar[str] = "shared"


class SharedV2(Shared):
    """``shared`` version 2."""

    version: ClassVar[int] = 2


class SharedV3(Shared):
    """``shared`` version 3."""

    version: ClassVar[int] = 3


def _policies(name: str, *classes: type) -> types.ModuleType:
    def register_commit_policies(register: Callable[[type], None]) -> None:
        for cls in classes:
            register(cls)

    module = types.ModuleType(name)
    module.register_commit_policies = hookimpl(register_commit_policies)  # type: ignore[attr-defined]
    return module


def test_the_first_registrant_owns_a_name_and_its_own_new_versions_move_it() -> None:
    first = _policies("first_plugin", Shared, SharedV2)
    with pytest.warns(PluginNameWarning) as caught:
        reg = Registry.build([("first", first), ("second", _policies("second_plugin", SharedV3))])
    msg = one_warning(list(caught), PluginNameWarning)
    assert "plugin 'second' registers policy 'shared.v3'" in msg
    assert "which belongs to 'first'" in msg and "still means 'shared.v2'" in msg
    assert reg.resolve("policy", "shared") is SharedV2
    assert reg.resolve("policy", "shared.v3") is SharedV3
    assert reg.owner("policy", "shared") == "first"
    rows = {r["key"]: r["default"] for r in reg.listing()}
    assert rows == {"shared.v1": False, "shared.v2": True, "shared.v3": False}


def test_two_entry_points_of_one_distribution_share_its_names(site: Site) -> None:
    site.install(
        "dlm-fake-family",
        {"family_a": "dlm_fake_family_a", "family_b": "dlm_fake_family_b"},
        dlm_fake_family_a=policy_module(("family_rule", 1)),
        dlm_fake_family_b=policy_module(("family_rule", 2)),
    )
    reg = Registry.from_entry_points()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ownership warning within one distribution
        assert reg.resolve("policy", "family_rule").version == 2
    assert reg.owner("policy", "family_rule") == "dlm-fake-family"


# --------------------------------------------------------------------------------------
# D. Duplicates are one-line errors
# --------------------------------------------------------------------------------------


def test_two_installed_plugins_with_one_entry_point_name_skip_the_second(site: Site) -> None:
    site.install(
        "dlm-fake-twin-a", {"twin": "dlm_fake_twin_a"}, dlm_fake_twin_a=policy_module(("ta", 1))
    )
    site.install(
        "dlm-fake-twin-b", {"twin": "dlm_fake_twin_b"}, dlm_fake_twin_b=policy_module(("tb", 1))
    )
    names, caught = load_all(Registry.from_entry_points())
    msg = one_warning(caught, PluginLoadWarning)
    assert "ValueError: two plugins share the entry-point name 'twin'" in msg
    assert "rename one of them" in msg
    assert len({"ta", "tb"} & set(names)) == 1 and "frechet" in names


def test_explicit_plugins_sharing_a_name_or_registering_a_class_twice_raise_one_line() -> None:
    with pytest.raises(ValueError, match="two plugins share the entry-point name 'x'") as info:
        Registry.build([("x", _policies("a", Shared)), ("x", _policies("b", SharedV2))])
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError) as info:
        Registry.build([("twice", _policies("twice_plugin", Shared, Shared))])
    assert str(info.value) == (
        "plugin 'twice' registers policy 'shared.v1' twice; register each class once, or "
        "bump the version of one of them"
    )


def test_an_installed_plugin_registering_a_class_twice_is_skipped(site: Site) -> None:
    site.install(
        "dlm-fake-twice",
        {"twice": "dlm_fake_twice"},
        dlm_fake_twice=policy_module(("twice_rule", 1), ("twice_rule", 1)),
    )
    names, caught = load_all(Registry.from_entry_points())
    msg = one_warning(caught, PluginLoadWarning)
    assert "ValueError: plugin 'twice' registers policy 'twice_rule.v1' twice" in msg
    assert "twice_rule" not in names and "frechet" in names


def test_a_plugin_claiming_a_builtin_model_type_does_not_break_builtin_loading() -> None:
    """Built-ins own the model types they load: a plugin's class that also claims
    ``llada`` neither breaks nor takes over loading a LLaDA checkpoint."""
    from dlm_decode.models.llada import LLaDAModel
    from dlm_decode.models.loading import find_model_class

    class Impostor(LLaDAModel):
        name: ClassVar[str] = "impostor_llada"

    plugin = types.ModuleType("impostor_plugin")

    @hookimpl
    def register_models(register: Callable[[type], None]) -> None:
        register(Impostor)

    plugin.register_models = register_models  # type: ignore[attr-defined]
    try:
        registry_module.reset_registry([("impostor_plugin", plugin)])
        assert "llada" in Impostor.config_model_types
        assert find_model_class("llada") is LLaDAModel
    finally:
        registry_module.reset_registry([])
