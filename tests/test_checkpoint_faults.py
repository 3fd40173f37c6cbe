"""Broken checkpoints, invalid configs, non-finite weights and decodes too big for memory:
each is one line naming the problem and the fix, raised before any work or allocation."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dlm_decode
from dlm_decode.models import (
    CheckpointError,
    ConfigError,
    DecodeMemoryError,
    available_memory_bytes,
    build_model,
    check_memory,
    decode_memory_bytes,
    load_model,
)
from dlm_decode.models import memory as memory_mod
from dlm_decode.models import native as native_mod
from dlm_decode.models.checkpoint import check_finite, read_weights
from dlm_decode.models.loading import TINY_FOLDER
from dlm_decode.models.testing import tiny_config, write_random_checkpoint

GIB = 1024**3


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A valid tiny LLaDA checkpoint (copied by each test that damages it)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("good"), "llada")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- 1. damaged files ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cut", "state"),
    [
        (lambda n: 0, "empty (0 bytes)"),
        (lambda n: 7, "truncated or corrupt (7 bytes)"),
        (lambda n: 40, "truncated or corrupt (40 bytes)"),
        (lambda n: n // 2, "truncated or corrupt"),
        (lambda n: n - 1, "truncated or corrupt"),
    ],
    ids=["empty", "in-length-prefix", "in-header", "half", "last-byte"],
)
def test_truncated_or_empty_safetensors_is_one_line_checkpoint_error(tmp_path, good, cut, state):
    folder = _copy(good, tmp_path / "ckpt")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: cut(len(data))])
    with pytest.raises(CheckpointError) as exc:
        load_model(folder)
    msg = _one_line(exc)
    assert str(weights) in msg and state in msg and "re-download or re-save" in msg
    assert type(exc.value) is CheckpointError  # not a raw SafetensorError


def test_truncated_shard_names_the_shard(tmp_path):
    folder = write_random_checkpoint(tmp_path / "sharded", "dream", shards=3)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError) as exc:
        load_model(folder)
    assert str(shard) in _one_line(exc)


def test_corrupt_header_bytes(tmp_path, good):
    folder = _copy(good, tmp_path / "ckpt")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"\xff" * 12  # garbage inside the JSON header
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as exc:
        load_model(folder)
    assert str(weights) in _one_line(exc)


@pytest.mark.parametrize(
    ("text", "what"),
    [
        (b"", "is not valid JSON"),
        (b'{"model_type": "llada",', "is not valid JSON"),
        (b"[1, 2, 3]", "holds an array"),
        (b'"llada"', "holds a string"),
        (b"null", "holds null"),
        (b"\xff\xfe\x00binary", "is not UTF-8"),
    ],
    ids=["empty", "cut", "list", "string", "null", "binary"],
)
def test_bad_config_json_is_one_line_checkpoint_error(tmp_path, good, text, what):
    folder = _copy(good, tmp_path / "ckpt")
    (folder / "config.json").write_bytes(text)
    with pytest.raises(CheckpointError) as exc:
        load_model(folder)
    msg = _one_line(exc)
    assert str(folder / "config.json") in msg and what in msg and "fix config.json" in msg


def test_bad_safetensors_index(tmp_path):
    folder = write_random_checkpoint(tmp_path / "sharded", "llada", shards=2)
    index = folder / "model.safetensors.index.json"
    index.write_text("[]")
    with pytest.raises(CheckpointError) as exc:
        load_model(folder)
    assert str(index) in _one_line(exc)


# --- 2. config values -------------------------------------------------------------------

BAD_CONFIGS = [
    # (arch, overrides, key named, text in the message)
    ("llada", {"n_heads": "4"}, "n_heads", "is a string, not an integer"),
    ("llada", {"n_heads": True}, "n_heads", "is a boolean, not an integer"),
    ("llada", {"n_layers": 2.5}, "n_layers", "is a fraction, not an integer"),
    ("llada", {"d_model": 0}, "d_model", "must be ≥ 1"),
    ("llada", {"n_layers": -1}, "n_layers", "must be ≥ 1"),
    ("llada", {"vocab_size": 0, "mask_token_id": 1}, "vocab_size", "must be ≥ 1"),
    ("llada", {"max_length": 0}, "max_sequence_length", "must be ≥ 1"),
    ("llada", {"max_length": "4096"}, "max_sequence_length", "is a string"),
    ("llada", {"mlp_hidden_size": None, "mlp_ratio": "4"}, "mlp_ratio", "is a string"),
    ("llada", {"d_model": 30}, "d_model", "is not divisible by n_heads=4"),
    ("llada", {"n_kv_heads": 3}, "n_kv_heads", "n_heads=4 is not a multiple of n_kv_heads=3"),
    ("llada", {"n_kv_heads": 8}, "n_kv_heads", "n_heads=4 is not a multiple of n_kv_heads=8"),
    ("llada", {"d_model": 20}, "head dim", "= 5 is odd"),
    ("llada", {"mask_token_id": 128}, "mask_token_id", "outside the vocabulary [0, 128)"),
    ("llada", {"mask_token_id": "127"}, "mask_token_id", "is a string, not a token id"),
    ("llada", {"eos_token_id": [1, 999]}, "eos_token_id", "outside the vocabulary"),
    ("llada", {"pad_token_id": -1}, "pad_token_id", "outside the vocabulary"),
    ("llada", {"rope_theta": "1e4"}, "rope_theta", "is a string, not a number"),
    ("llada", {"rms_norm_eps": 0}, "rms_norm_eps", "must be a positive finite number"),
    ("dream", {"hidden_size": 30}, "hidden_size", "is not divisible by num_attention_heads=4"),
    ("dream", {"num_key_value_heads": 3}, "num_key_value_heads", "is not a multiple of"),
    ("dream", {"num_attention_heads": 0}, "num_attention_heads", "must be ≥ 1"),
    ("dream", {"intermediate_size": "64"}, "intermediate_size", "is a string"),
    ("dream", {"vocab_size": "128", "mask_token_id": 127}, "vocab_size", "is a string"),
    ("dream", {"max_position_embeddings": False}, "max_position_embeddings", "is a boolean"),
    ("dream", {"mask_token_id": 200}, "mask_token_id", "outside the vocabulary [0, 128)"),
    ("dream", {"bos_token_id": 128}, "bos_token_id", "outside the vocabulary"),
    ("dream", {"eos_token_id": None, "pad_token_id": 4096}, "pad_token_id", "outside"),
]


def _check_config_message(msg: str, arch: str, key: str, text: str) -> None:
    assert "config.json" in msg and key in msg and text in msg, msg
    assert msg.startswith("LLaDA" if arch == "llada" else "Dream"), msg
    assert "fix" in msg or "set" in msg or "write" in msg, msg  # the fix


@pytest.mark.parametrize(("arch", "dims", "key", "text"), BAD_CONFIGS)
def test_invalid_config_values_fail_before_allocation(monkeypatch, arch, dims, key, text):
    def no_allocation(*args, **kwargs):
        raise AssertionError("a module was built from an invalid config")

    monkeypatch.setattr(native_mod, "_meta_module", no_allocation)
    with pytest.raises(ConfigError) as exc:
        build_model(tiny_config(arch, **dims))
    _check_config_message(_one_line(exc), arch, key, text)


@pytest.mark.parametrize(("arch", "dims", "key", "text"), BAD_CONFIGS[::3])
def test_invalid_config_values_fail_on_load(tmp_path, arch, dims, key, text):
    folder = write_random_checkpoint(tmp_path / arch, arch)
    config = json.loads((folder / "config.json").read_text())
    for k, v in tiny_config(arch, **dims).items():
        if config.get(k) != v:
            config[k] = v
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as exc:  # before the weight headers disagree
        load_model(folder)
    _check_config_message(_one_line(exc), arch, key, text)


def test_config_errors_are_value_errors_and_checkpoint_errors():
    with pytest.raises(ValueError, match="n_heads"):
        build_model(tiny_config("llada", n_heads="4"))
    assert issubclass(ConfigError, CheckpointError) and issubclass(CheckpointError, ValueError)


def test_valid_configs_still_build_and_accept_integral_floats_and_huge_lengths():
    for preset in ("llada-tiny", "dream-tiny"):
        assert build_model(preset).vocab_size == 128
    model = build_model(tiny_config("llada", d_model=32.0, max_length=2**40))
    assert model.spec.d_model == 32 and model.max_length == 2**40
    assert build_model(tiny_config("dream", max_length=2**40)).max_length == 2**40
    # grouped-query LLaDA and multi-query attention
    assert build_model(tiny_config("llada", n_kv_heads=2)).spec.n_kv_heads == 2
    assert build_model({**tiny_config("llada"), "multi_query_attention": True}).spec.n_kv_heads == 1
    assert build_model(tiny_config("llada", eos_token_id=[1, 2])).eos_token_ids == (1, 2)


def test_tiny_preset_config_is_validated(tmp_path):
    assert load_model("tiny").vocab_size > 0
    folder = _copy(TINY_FOLDER, tmp_path / "tiny")
    config = json.loads((folder / "config.json").read_text())
    config["mask_token_id"] = config["vocab_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as exc:
        load_model(folder)
    _check_config_message(_one_line(exc), "llada", "mask_token_id", "outside the vocabulary")


def test_missing_required_key_is_one_line():
    config = tiny_config("dream")
    del config["num_hidden_layers"]
    with pytest.raises(ConfigError) as exc:
        build_model(config)
    assert "missing the required key 'num_hidden_layers'" in _one_line(exc)


# --- 3. NaN / inf weights ---------------------------------------------------------------


def _poison(folder: Path, value: float) -> str:
    """Write ``value`` into one entry of one tensor of the single-file checkpoint."""
    path = folder / "model.safetensors"
    weights = load_file(path)
    name = sorted(weights)[len(weights) // 2]
    weights[name].view(-1)[3] = value
    save_file(weights, str(path), metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_fails_load_and_check_weights_false_skips(tmp_path, good, value):
    folder = _copy(good, tmp_path / "ckpt")
    name = _poison(folder, value)
    with pytest.raises(CheckpointError) as exc:
        load_model(folder)
    msg = _one_line(exc)
    assert msg.startswith(f"{name} has 1 NaN/inf values") and "check_weights=False" in msg
    model = dlm_decode.load_model(folder, check_weights=False)  # the public front door
    param = dict(model.named_parameters())[name]
    assert not bool(torch.isfinite(param).all())


def test_non_finite_weight_in_a_shard_counts_the_others(tmp_path):
    folder = write_random_checkpoint(tmp_path / "sharded", "dream", shards=2)
    bad = []
    for shard in sorted(folder.glob("model-*.safetensors")):
        weights = load_file(shard)
        name = sorted(weights)[0]
        weights[name].view(-1)[0] = float("nan")
        save_file(weights, str(shard), metadata={"format": "pt"})
        bad.append(name)
    with pytest.raises(CheckpointError) as exc:
        load_model(folder)
    msg = _one_line(exc)
    assert any(msg.startswith(n) for n in bad) and "(and 1 more tensors)" in msg
    load_model(folder, check_weights=False)


def test_read_weights_and_check_finite_directly(tmp_path, good):
    folder = _copy(good, tmp_path / "ckpt")
    name = _poison(folder, float("nan"))
    shapes = {k: tuple(v.shape) for k, v in load_file(folder / "model.safetensors").items()}
    with pytest.raises(CheckpointError, match=name):
        read_weights(folder, shapes)
    assert torch.isnan(read_weights(folder, shapes, check_weights=False)[name]).any()
    check_finite({"a": torch.ones(3), "ids": torch.arange(3), "empty": torch.empty(0)})
    with pytest.raises(CheckpointError, match="overflows float16"):
        check_finite({"h": torch.tensor([7e4]).half()})


def test_plugin_without_check_weights_is_checked_by_load_model(tmp_path, good):
    from dlm_decode.hookspecs import hookimpl
    from dlm_decode.models import LLaDAModel
    from dlm_decode.registry import reset_registry

    class OldLLaDA(LLaDAModel):
        """A plugin written before ``check_weights`` existed."""

        name = "old_llada"
        config_model_types = ("old_llada",)

        @classmethod
        def from_pretrained(cls, path, *, device="cpu", dtype=None, config=None):
            return super().from_pretrained(
                path, device=device, dtype=dtype, config=config, check_weights=False
            )

    class Plugin:
        @staticmethod
        @hookimpl
        def register_models(register):
            register(OldLLaDA)

    folder = _copy(good, tmp_path / "ckpt")
    name = _poison(folder, float("nan"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "old_llada"}))
    try:
        reset_registry([("old_plugin", Plugin())])
        with pytest.raises(CheckpointError, match=name):
            load_model(folder)
        assert isinstance(load_model(folder, check_weights=False), OldLLaDA)
    finally:
        reset_registry()


# --- 4. memory --------------------------------------------------------------------------


def _fake_memory(monkeypatch, available: int | None) -> list[torch.device]:
    seen: list[torch.device] = []

    def fake(device):
        seen.append(torch.device(device))
        return available

    monkeypatch.setattr(memory_mod, "available_memory_bytes", fake)
    return seen


def test_decode_memory_bytes_counts_the_kv_cache_of_every_layer():
    model = build_model("dream-tiny", dtype=torch.float32)
    s, b, t = model.spec, 3, 100
    kv = 2 * b * (t + 1) * s.n_layers * s.n_kv_heads * s.head_dim * 4
    assert decode_memory_bytes(model, b, t, "dual") - decode_memory_bytes(model, b, t) == kv
    assert decode_memory_bytes(model, b, t, "none") == decode_memory_bytes(model, b, t, None)
    cache = dlm_decode.get_cache("prefix")
    assert decode_memory_bytes(model, b, t, cache) == decode_memory_bytes(model, b, t, "dual")
    # logits: the model dtype plus two float32 working copies, per row asked for
    per_row = b * s.vocab_size * (4 + 8)
    assert (
        decode_memory_bytes(model, b, t, logits_length=10)
        == decode_memory_bytes(model, b, t, logits_length=11) - per_row
    )
    # linear in the batch and roughly in the length
    assert decode_memory_bytes(model, 2 * b, t, "dual") == 2 * decode_memory_bytes(
        model, b, t, "dual"
    )
    half = build_model("dream-tiny", dtype=torch.bfloat16)
    assert decode_memory_bytes(half, b, t, "dual") < decode_memory_bytes(model, b, t, "dual")


def test_check_memory_message(monkeypatch):
    model = build_model("llada-tiny")
    seen = _fake_memory(monkeypatch, 2 * GIB)
    with pytest.raises(DecodeMemoryError) as exc:
        check_memory(model, 4, 2**36, "dual", logits_length=33)
    msg = _one_line(exc)
    assert msg.startswith("this decode needs ≈ ") and "GiB (batch 4 × length 68719476736" in msg
    assert "KV cache" in msg and "but cpu has 2 GiB available" in msg
    assert "lower --batch-size or --gen-length" in msg
    assert isinstance(exc.value, MemoryError) and isinstance(exc.value, ValueError)
    assert seen == [torch.device("cpu")]
    assert check_memory(model, 1, 64, "dual") == decode_memory_bytes(model, 1, 64, "dual")
    _fake_memory(monkeypatch, None)  # unknown: the check passes
    assert check_memory(model, 4, 2**36, "dual") > 2 * GIB


def test_huge_decode_fails_fast_before_any_buffer(monkeypatch):
    model = build_model(tiny_config("llada", max_length=2**40))
    _fake_memory(monkeypatch, 16 * GIB)

    def no_buffers(*args, **kwargs):
        raise AssertionError("the decode allocated its buffers before the memory check")

    monkeypatch.setattr(dlm_decode.Decoder, "_begin", no_buffers)
    decoder = dlm_decode.Decoder(model, gen_length=2**39, block_length=32, cache="dual")
    t0 = time.perf_counter()
    with pytest.raises(DecodeMemoryError) as exc:
        decoder.generate(torch.tensor([[5, 6, 7, 8]]))
    assert time.perf_counter() - t0 < 5
    msg = _one_line(exc)
    assert f"length {4 + 2**39}" in msg and "but cpu has 16 GiB available" in msg
    assert "--gen-length" in msg


def test_normal_tiny_decode_passes_the_check(monkeypatch):
    model = load_model("tiny")
    _fake_memory(monkeypatch, 16 * GIB)
    out = dlm_decode.generate(model, [[5, 6, 7]], gen_length=32, block_length=16, cache="dual")
    assert out.sequences.shape == (1, 35)
    # the check is live for normal sizes too: no memory at all fails the same decode
    _fake_memory(monkeypatch, 1024)
    with pytest.raises(DecodeMemoryError, match="but cpu has 1 KiB available"):
        dlm_decode.generate(model, [[5, 6, 7]], gen_length=32, block_length=16, cache="dual")


def test_longer_than_max_length_is_one_line():
    model = build_model("llada-tiny")  # max length 512
    with pytest.raises(ValueError) as exc:
        dlm_decode.generate(model, [[5, 6, 7]], gen_length=512, block_length=32)
    msg = _one_line(exc)
    assert "= 515 exceeds the model's max length 512" in msg and "shorten" in msg


def test_available_memory_bytes(monkeypatch):
    cpu = available_memory_bytes("cpu")
    assert isinstance(cpu, int) and cpu > 0
    assert available_memory_bytes("meta") is None
    monkeypatch.setitem(__import__("sys").modules, "psutil", None)  # psutil missing
    without = available_memory_bytes("cpu")
    assert isinstance(without, int) and without > 0
    # CUDA: the driver's free memory plus what the allocator holds unused, on that device
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: calls.append(d) or (5 * GIB, 80))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 3 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 2 * GIB)
    assert available_memory_bytes("cuda:1") == 6 * GIB
    assert calls == [torch.device("cuda:1")]
