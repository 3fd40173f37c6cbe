"""One home for a decode's settings: typed references, one resolve function, and the same
API for ``generate``, ``Decoder`` and ``DecodeConfig``."""

from __future__ import annotations

import pytest
import torch

import dlm_decode
from dlm_decode.config import CacheRef, DecodeConfig, PolicyRef, format_value, parse_args
from dlm_decode.models import build_model
from dlm_decode.settings import resolve, resolve_plugin


@pytest.fixture(scope="module")
def model():
    m = build_model("llada-tiny", dtype=torch.float64, seed=2)
    m.module.head.weight.mul_(12.0)  # confident, varied profiles
    return m


PROMPT = [[5, 9, 11, 3, 7]]


def test_a_config_naming_only_a_policy_uses_its_own_defaults() -> None:
    cfg = DecodeConfig(policy="threshold")
    assert cfg.policy_args == {}
    st = resolve(cfg)
    assert st.config.policy == "threshold.v1" and st.config.policy_args == {"threshold": 0.9}
    assert st.policy_ref.label == "threshold(threshold=0.9)"
    assert DecodeConfig().policy_args == {}  # no frechet parameter in the core's default
    assert resolve().policy_ref.args == {"margin": 0.25}  # it comes from frechet's Params


@pytest.mark.parametrize(
    "spec",
    [
        "threshold",
        "threshold.v1",
        "threshold:threshold=0.9",
        PolicyRef(name="threshold"),
        {"name": "threshold", "args": {"threshold": 0.9}},
        "object",
    ],
    ids=["name", "key", "inline", "ref", "dict", "object"],
)
def test_generate_and_decoder_take_every_form_of_a_policy_the_same_way(model, spec) -> None:
    if spec == "object":
        spec = dlm_decode.get_policy("threshold")
    kw = dict(gen_length=16, block_length=8)
    ref = dlm_decode.generate(model, PROMPT, policy=dlm_decode.get_policy("threshold"), **kw)
    got = dlm_decode.generate(model, PROMPT, policy=spec, **kw)
    dec = dlm_decode.Decoder(model, policy=spec, **kw)
    assert torch.equal(got.sequences, ref.sequences) and got.nfe == ref.nfe
    assert torch.equal(dec.generate(PROMPT).sequences, ref.sequences)
    assert got.config.policy == dec.config.policy == "threshold.v1"
    assert got.config.policy_args == {"threshold": 0.9}


def test_a_named_policy_takes_its_args_and_a_config_its_fields(model) -> None:
    a = dlm_decode.generate(
        model,
        PROMPT,
        policy="threshold",
        policy_args={"threshold": 0.5},
        gen_length=16,
        block_length=8,
    )
    cfg = DecodeConfig(policy="threshold:threshold=0.5", gen_length=16, block_length=8)
    b = dlm_decode.generate(model, PROMPT, config=cfg)
    c = dlm_decode.Decoder(model, cfg).generate(PROMPT)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.sequences, c.sequences)
    # Keyword fields override the config's.
    d = dlm_decode.generate(model, PROMPT, config=cfg, gen_length=8)
    assert d.config.gen_length == 8 and d.config.policy_args == {"threshold": 0.5}


def test_a_ready_object_with_args_is_an_error() -> None:
    with pytest.raises(ValueError, match="ready policy object"):
        resolve(policy=dlm_decode.get_policy("threshold"), policy_args={"threshold": 0.5})


def test_config_refs_carry_their_args_and_refuse_a_second_copy() -> None:
    cfg = DecodeConfig(policy=PolicyRef(name="frechet", args={"margin": 0.3}), cache="dual")
    assert (cfg.policy, cfg.policy_args) == ("frechet", {"margin": 0.3})
    assert cfg.policy_ref == PolicyRef(name="frechet", args={"margin": 0.3})
    with pytest.raises(ValueError, match="carries its arguments"):
        DecodeConfig(policy="frechet:margin=0.3", policy_args={"margin": 0.2})


def test_labels_name_every_argument_and_differ_when_they_do() -> None:
    a, _ = resolve_plugin("frechet_robust:margin=0.2", "policy")
    b, _ = resolve_plugin("frechet_robust:margin=0.2,eta=0.1", "policy")
    assert a.label == "frechet_robust(eta=0.05, margin=0.2)"
    assert b.label == "frechet_robust(eta=0.1, margin=0.2)"
    assert a.key == b.key == "frechet_robust.v1"
    c, _ = resolve_plugin(CacheRef(name="dual"), "cache")
    assert c.label == "dual" and c.key == "dual.v1"
    assert format_value(1 - 0.75) == "0.25" and format_value(0.1 + 0.2) == "0.3"


def test_policy_requirements_are_checked_in_one_place() -> None:
    with pytest.raises(ValueError, match=r"policy 'fixed\.v2' needs 'steps'"):
        resolve(policy="fixed")
    assert resolve(policy="fixed", steps=256).config.steps == 256


def test_parse_args_reads_json_values_and_rejects_items_without_equals() -> None:
    assert parse_args(["a=1", "b=0.5", "c=true", "d=[1,2]", "e=word"]) == {
        "a": 1,
        "b": 0.5,
        "c": True,
        "d": [1, 2],
        "e": "word",
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_args(["margin"])
    with pytest.raises(ValueError, match="key=value"):
        PolicyRef.parse("frechet:margin")


def test_unknown_names_and_params_fail_with_one_line_naming_the_fix() -> None:
    with pytest.raises(KeyError, match="Did you mean 'frechet'"):
        resolve(policy="frechett")
    with pytest.raises(ValueError, match=r"unknown parameter of dual \(allowed: refresh_every\)"):
        resolve(cache="dual", cache_args={"size": 1})
