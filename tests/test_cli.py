"""The command line's decode options: ``--policy-arg`` and ``--cache-arg`` on every command
that decodes, resolved before any model loads, and the resolved keys printed."""

from __future__ import annotations

import json
import types
from collections.abc import Callable, Iterator

import pytest
from plugin_support import TaggedDual

from dlm_decode import cli
from dlm_decode.hookspecs import hookimpl
from dlm_decode.registry import reset_registry


@pytest.fixture
def tagged() -> Iterator[None]:
    plugin = types.ModuleType("tagged_plugin")

    @hookimpl
    def register_caches(register: Callable[[type], None]) -> None:
        register(TaggedDual)

    plugin.register_caches = register_caches  # type: ignore[attr-defined]
    reset_registry([("tagged_plugin", plugin)])
    yield
    reset_registry([])


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--cache-arg", "size=3", "x"],
        ["eval", "--cache-arg", "size=3", "--limit", "2"],
        ["quickstart", "--cache-arg", "size=3", "--limit", "2"],
        ["bench", "--cache-arg", "size=3", "--caches", "dual"],
    ],
    ids=["generate", "eval", "quickstart", "bench"],
)
def test_cache_arg_exists_and_is_validated_before_the_model_loads(
    argv: list[str], no_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "size: unknown parameter of dual (allowed: refresh_every)" in err


def test_cache_arg_reaches_the_cache_and_its_label(
    tagged: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--cache", "tagged_dual", "--cache-arg", "tag=3", "--policy", "threshold"]
    assert cli.main([*argv, "--gen-length", "16", "copy: jigiuroujgttdoky\n"]) == 0
    err = capsys.readouterr().err
    assert "cache tagged_dual(tag=3) [tagged_dual.v1]" in err
    assert "policy threshold(threshold=0.9) [threshold.v1]" in err


def test_eval_json_reports_the_resolved_settings(
    tagged: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "--task", "synthetic", "--limit", "2", "--json", "--policy", "factor"]
    assert cli.main([*argv, "--cache", "tagged_dual", "--cache-arg", "tag=2"]) == 0
    out = json.loads(capsys.readouterr().out)
    st = out["settings"]
    assert st["policy"] == "factor.v1" and st["policy_args"] == {"factor": 0.75}
    assert st["cache"] == "tagged_dual.v1" and st["cache_args"] == {"tag": 2}
    assert st["cache_label"] == "tagged_dual(tag=2)"


def test_quickstart_rows_come_from_each_policy_s_own_defaults() -> None:
    args = cli.build_parser().parse_args(["quickstart", "--cache", "prefix"])
    rows = cli.quickstart_settings(args)
    labels = [label for label, _ in rows]
    assert labels == ["one token per step", "threshold 0.9", "factor 0.75", "frechet 0.25"]
    assert rows[0][1].config.steps == args.gen_length
    assert {st.cache_ref.key for _, st in rows} == {"prefix.v1"}


def test_policy_needing_steps_names_the_option(
    no_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["generate", "--policy", "fixed", "x"]) == 2
    assert "needs --steps" in capsys.readouterr().err


def test_a_model_s_preferred_cache_applies_only_without_cache() -> None:
    class BlockModel:
        preferred_cache = "block"

    args = types.SimpleNamespace(cache=None, cache_arg=[])
    assert cli._cache_ref(args).name == "dual"  # before the model is known
    assert cli.adopt_preferred_cache(args, BlockModel()) and args.cache == "block"
    assert cli._cache_ref(args).name == "block"
    named = types.SimpleNamespace(cache="prefix", cache_arg=[])
    assert not cli.adopt_preferred_cache(named, BlockModel()) and named.cache == "prefix"
    plain = types.SimpleNamespace(cache=None, cache_arg=[])
    assert not cli.adopt_preferred_cache(plain, object()) and plain.cache is None
