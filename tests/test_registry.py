"""The plugin registry: load-time validation, versioned names, params errors, env filter.

Every test builds its own registry (``Registry.build``) from the built-ins plus plugins
defined in the test; tests that go through the process-wide registry restore it after.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
import torch

import dlm_decode
from dlm_decode import registry as registry_module
from dlm_decode.hookspecs import hookimpl
from dlm_decode.interfaces import CommitPolicy, StepState
from dlm_decode.policies.rules import FrechetPolicy
from dlm_decode.registry import BUILTIN_PLUGINS, Registry, UnknownPluginError

BUILTIN_POLICY_NAMES = [
    "credit",
    "eb",
    "factor",
    "fixed",
    "frechet",
    "frechet_robust",
    "joint_threshold",
    "klass",
    "margin",
    "threshold",
    "wino",
]


def builtin_plugins() -> list[tuple[str, Any]]:
    """The built-in plugin modules, as the entry points name them."""
    return [(name, importlib.import_module(mod)) for name, mod in BUILTIN_PLUGINS.items()]


def make_plugin(name: str, **hooks: Callable[..., None]) -> types.ModuleType:
    """A plugin module whose attributes are the given hook implementations."""
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        fn.__name__ = hook_name
        setattr(module, hook_name, hookimpl(fn))
    return module


def policy_plugin(name: str, *classes: type) -> types.ModuleType:
    """A plugin module registering ``classes`` as commit policies."""

    def register_commit_policies(register: Callable[[type], None]) -> None:
        for cls in classes:
            register(cls)

    return make_plugin(name, register_commit_policies=register_commit_policies)


class FrechetV2(FrechetPolicy):
    """A newer ``frechet``: same rule, version 2 (a test plugin)."""

    version: ClassVar[int] = 2


@pytest.fixture
def restore_global_registry() -> Iterator[None]:
    """Put the process-wide registry back as it was (built-ins only) after the test."""
    yield
    registry_module.reset_registry([])


# --------------------------------------------------------------------------------------
# Built-ins are plugins
# --------------------------------------------------------------------------------------


def test_builtins_register_through_the_same_hooks_as_plugins() -> None:
    reg = Registry.build(builtin_plugins())
    assert reg.names("policy") == BUILTIN_POLICY_NAMES
    assert reg.names("cache") == [
        "block",
        "dkv",
        "drift",
        "dual",
        "none",
        "prefix",
        "subblock",
        "vicinity",
    ]
    for name in BUILTIN_POLICY_NAMES:
        assert reg.sources[("policy", name, 1)] == "dlm_decode.policies"


def test_registry_from_one_plugin_holds_only_that_plugin() -> None:
    reg = Registry.build([("dlm_decode.policies", importlib.import_module("dlm_decode.policies"))])
    assert reg.names("policy") == BUILTIN_POLICY_NAMES
    assert reg.names("cache") == []


def test_listing_describes_every_policy_with_params_and_source() -> None:
    rows = {r["key"]: r for r in Registry.build(builtin_plugins()).listing()}
    assert rows["frechet.v1"]["params"] == {"margin": 0.25}
    assert rows["fixed.v1"]["requires"] == ["steps"]
    assert rows["threshold.v1"]["source"] == "dlm_decode.policies"


# --------------------------------------------------------------------------------------
# Bad plugins are rejected at load time
# --------------------------------------------------------------------------------------


def test_misspelled_hook_is_rejected_at_load_naming_the_hook() -> None:
    def register_comit_policies(register: Callable[[type], None]) -> None:
        register(FrechetV2)

    typo = make_plugin("typo_plugin", register_comit_policies=register_comit_policies)
    with pytest.raises(TypeError, match="register_comit_policies") as info:
        Registry.build([*builtin_plugins(), ("typo", typo)])
    assert "register_commit_policies" in str(info.value)  # lists the real hooks


class NotAPolicy:
    name: ClassVar[str] = "not_a_policy"


@pytest.mark.parametrize("thing", [NotAPolicy, FrechetPolicy()], ids=["class", "instance"])
def test_registering_a_non_subclass_raises_type_error(thing: Any) -> None:
    with pytest.raises(TypeError, match=r"not a subclass of dlm_decode\.interfaces\.CommitPolicy"):
        Registry.build([("bad", policy_plugin("bad_plugin", thing))])


def test_policy_with_params_that_allow_extra_fields_is_rejected() -> None:
    from pydantic import BaseModel

    class LooseParams(BaseModel):
        k: int = 1

    class Loose(FrechetPolicy):
        name: ClassVar[str] = "loose"
        Params: ClassVar[type[BaseModel]] = LooseParams

    with pytest.raises(TypeError, match="extra='forbid'"):
        Registry.build([("loose", policy_plugin("loose_plugin", Loose))])


def test_duplicate_name_and_version_raises_value_error_naming_both_sources() -> None:
    dup = policy_plugin("dup_plugin", FrechetPolicy)
    with pytest.raises(ValueError, match=r"duplicate policy 'frechet\.v1'") as info:
        Registry.build([*builtin_plugins(), ("dup", dup)])
    assert "'dlm_decode.policies'" in str(info.value)
    assert "'dup'" in str(info.value)


# --------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------


def test_unknown_name_suggests_close_matches() -> None:
    reg = Registry.build(builtin_plugins())
    with pytest.raises(UnknownPluginError, match="Did you mean 'frechet'"):
        reg.resolve("policy", "frechett")
    with pytest.raises(UnknownPluginError, match="Registered: credit, eb, factor, fixed"):
        reg.resolve("policy", "zzz")


class OwnRule(FrechetPolicy):
    """A plugin's own policy, version 1 (a test plugin)."""

    name: ClassVar[str] = "own_rule"


class OwnRuleV2(OwnRule):
    """The same plugin's newer ``own_rule``."""

    version: ClassVar[int] = 2


def test_bare_name_resolves_to_the_owners_newest_version() -> None:
    reg = Registry.build(
        [*builtin_plugins(), ("own", policy_plugin("own_plugin", OwnRule, OwnRuleV2))]
    )
    assert reg.resolve("policy", "own_rule") is OwnRuleV2
    assert reg.resolve("policy", "own_rule.v2") is OwnRuleV2
    assert reg.resolve("policy", "own_rule.v1") is OwnRule
    assert reg.owner("policy", "own_rule") == "own"
    with pytest.raises(UnknownPluginError, match=r"available: own_rule\.v1, own_rule\.v2"):
        reg.resolve("policy", "own_rule.v3")


def test_another_plugins_version_of_a_builtin_name_is_reachable_only_by_its_key() -> None:
    with pytest.warns(registry_module.PluginNameWarning) as caught:
        reg = Registry.build([*builtin_plugins(), ("v2", policy_plugin("v2_plugin", FrechetV2))])
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "\n" not in msg
    assert "'v2'" in msg and "'frechet.v2'" in msg and "belongs to the built-ins" in msg
    assert "still means 'frechet.v1'" in msg
    assert reg.resolve("policy", "frechet") is FrechetPolicy  # the CLI default is unchanged
    assert reg.resolve_key("policy", "frechet") == "frechet.v1"
    assert reg.resolve("policy", "frechet.v2") is FrechetV2
    assert reg.resolve("policy", "frechet.v1") is FrechetPolicy
    assert reg.owner("policy", "frechet") == registry_module.BUILTIN_OWNER
    rows = {r["key"]: r for r in reg.listing()}
    assert rows["frechet.v1"]["default"] and not rows["frechet.v2"]["default"]
    with pytest.raises(UnknownPluginError, match=r"available: frechet\.v1, frechet\.v2"):
        reg.resolve("policy", "frechet.v3")


def test_public_api_sees_a_plugin_version_after_reset(restore_global_registry: None) -> None:
    with pytest.warns(registry_module.PluginNameWarning):
        registry_module.reset_registry([("v2", policy_plugin("v2_plugin", FrechetV2))])
    assert dlm_decode.get_policy("frechet").key == "frechet.v1"
    assert dlm_decode.get_policy("frechet.v2").key == "frechet.v2"
    assert dlm_decode.get_policy("frechet.v1").key == "frechet.v1"
    keys = {r["key"] for r in dlm_decode.list_plugins("policy")}
    assert {"frechet.v1", "frechet.v2"} <= keys
    with pytest.raises(UnknownPluginError, match="Did you mean"):
        dlm_decode.get_policy("frechett")


# --------------------------------------------------------------------------------------
# Params validation names the field
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("threshold", {"threshold": 1.5}, "threshold"),
        ("threshold", {"threshold": 0.0}, "threshold"),
        ("factor", {"factor": 0}, "factor"),
        ("frechet", {"margin": -1}, "margin"),
        ("frechet_robust", {"eta": 1.0}, "eta"),
        ("frechet_robust", {"eta": -0.1}, "eta"),
        ("frechet", {"margin": "wide"}, "margin"),
    ],
)
def test_invalid_param_value_error_names_the_field(
    name: str, params: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValueError, match=rf"invalid parameters for {name}\.v1: {field}:"):
        dlm_decode.get_policy(name, **params)


def test_unknown_param_error_names_it_and_lists_the_allowed_ones() -> None:
    with pytest.raises(
        ValueError, match=r"marign: unknown parameter of frechet \(allowed: margin\)"
    ):
        dlm_decode.get_policy("frechet", marign=0.3)
    with pytest.raises(ValueError, match=r"margin: unknown parameter of fixed \(allowed: score\)"):
        dlm_decode.get_policy("fixed", margin=0.3)


def test_valid_params_reach_the_policy() -> None:
    policy = dlm_decode.get_policy("frechet_robust", margin=0.1, eta=0.02)
    assert (policy.params.margin, policy.params.eta) == (0.1, 0.02)
    conf = torch.tensor([[0.99, 0.5]])
    state = StepState(0, 0, 1, None, torch.tensor([2]))
    assert policy.select(conf, torch.ones_like(conf, dtype=torch.bool), state).sum() == 1


# --------------------------------------------------------------------------------------
# DLM_DECODE_PLUGINS filters external entry points
# --------------------------------------------------------------------------------------


class _Named(CommitPolicy):
    """Commits every masked position (a stand-in for an external plugin)."""

    def select(
        self, confidence: torch.Tensor, masked: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        return masked.clone()


def _external(name: str) -> type:
    return type(f"Ext_{name}", (_Named,), {"name": name})


@pytest.fixture
def fake_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entry points: the four built-ins plus ``alpha``, ``beta`` and a ``broken`` one whose
    module does not exist (loading it raises, so a filter must skip it before loading)."""
    for ext in ("alpha", "beta"):
        module = policy_plugin(f"dlm_fake_{ext}", _external(f"ext_{ext}"))
        monkeypatch.setitem(sys.modules, f"dlm_fake_{ext}", module)
    eps = [
        importlib.metadata.EntryPoint(name=n, value=v, group="dlm_decode")
        for n, v in BUILTIN_PLUGINS.items()
    ]
    eps += [
        importlib.metadata.EntryPoint(name="alpha", value="dlm_fake_alpha", group="dlm_decode"),
        importlib.metadata.EntryPoint(name="beta", value="dlm_fake_beta", group="dlm_decode"),
        importlib.metadata.EntryPoint(
            name="broken", value="dlm_fake_missing_module", group="dlm_decode"
        ),
    ]

    def entry_points(**kwargs: Any) -> list[importlib.metadata.EntryPoint]:
        assert kwargs == {"group": "dlm_decode"}
        return eps

    monkeypatch.setattr(registry_module.importlib.metadata, "entry_points", entry_points)


def _loaded_policy_names(monkeypatch: pytest.MonkeyPatch, env: str | None) -> list[str]:
    if env is None:
        monkeypatch.delenv(registry_module.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(registry_module.ENV_VAR, env)
    reg = Registry.build(registry_module.entry_point_plugins())
    return reg.names("policy")


@pytest.mark.parametrize(
    ("env", "external"),
    [
        ("", []),
        ("alpha", ["ext_alpha"]),
        ("alpha, beta", ["ext_alpha", "ext_beta"]),
    ],
)
def test_env_var_loads_only_the_named_external_plugins(
    monkeypatch: pytest.MonkeyPatch,
    fake_entry_points: None,
    env: str,
    external: list[str],
) -> None:
    names = _loaded_policy_names(monkeypatch, env)
    assert names == sorted([*BUILTIN_POLICY_NAMES, *external])
    monkeypatch.setenv(registry_module.ENV_VAR, env)
    assert Registry.from_entry_points().names("policy") == names  # the lazy registry agrees


def test_env_var_naming_a_plugin_that_is_not_installed_warns_in_one_line(
    monkeypatch: pytest.MonkeyPatch, fake_entry_points: None
) -> None:
    with pytest.warns(registry_module.PluginLoadWarning) as caught:
        names = _loaded_policy_names(monkeypatch, "beta,nonexistent")
    assert names == sorted([*BUILTIN_POLICY_NAMES, "ext_beta"])
    (msg,) = [str(w.message) for w in caught]
    assert "\n" not in msg
    assert "names 'nonexistent'" in msg and "installed: alpha, beta, broken" in msg


def test_env_var_unset_loads_every_entry_point_and_skips_a_broken_one_naming_it(
    monkeypatch: pytest.MonkeyPatch, fake_entry_points: None
) -> None:
    with pytest.warns(registry_module.PluginLoadWarning) as caught:
        names = _loaded_policy_names(monkeypatch, None)
    assert names == sorted([*BUILTIN_POLICY_NAMES, "ext_alpha", "ext_beta"])
    (msg,) = [str(w.message) for w in caught]
    assert "\n" not in msg
    assert "skipped dlm_decode plugin 'broken'" in msg
    assert "ModuleNotFoundError" in msg and "dlm_fake_missing_module" in msg
    assert "uninstall it or fix it; DLM_DECODE_PLUGINS=alpha,beta limits" in msg


def test_env_var_naming_a_broken_plugin_is_an_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, fake_entry_points: None
) -> None:
    with pytest.raises(registry_module.PluginLoadError) as info:
        _loaded_policy_names(monkeypatch, "alpha,broken")
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in msg
    assert "plugin 'broken', named in DLM_DECODE_PLUGINS, failed to load" in msg
    assert "remove it from DLM_DECODE_PLUGINS" in msg


def test_builtins_load_even_without_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module.importlib.metadata, "entry_points", lambda **kwargs: [])
    assert _loaded_policy_names(monkeypatch, None) == BUILTIN_POLICY_NAMES


def test_conftest_keeps_installed_plugins_out_of_the_test_session() -> None:
    import os

    assert os.environ[registry_module.ENV_VAR] == ""
    sources = {row["source"] for row in dlm_decode.list_plugins()}
    assert sources <= set(BUILTIN_PLUGINS)
