"""Native LLaDA / Dream models and the loader, on tiny random checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dlm_decode
from dlm_decode.interfaces import Model, positions_from_mask
from dlm_decode.models import DreamModel, LLaDAModel, build_model, load_model
from dlm_decode.models import loading as loading_mod
from dlm_decode.models.checkpoint import resolve_dtype
from dlm_decode.models.testing import tiny_config, write_random_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared"
CONFIGS = SHARED / "data" / "model_configs"
ARCHS = ["llada", "dream"]
CLASSES = {"llada": LLaDAModel, "dream": DreamModel}
DREAM_TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "added_tokens.json",
    "special_tokens_map.json",
)
needs_shared = pytest.mark.skipif(
    not CONFIGS.is_dir(), reason=f"shared model configs not found at {CONFIGS}"
)


@pytest.fixture(scope="module", params=ARCHS)
def model64(request, tmp_path_factory) -> Model:
    path = write_random_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=1)
    return load_model(path, dtype=torch.float64)


def _ids(model: Model, b: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.mask_token_id, (b, t), generator=g)


# --- loading ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("shards", "dtype"), [(1, torch.float32), (3, torch.bfloat16)])
def test_load_single_and_sharded(tmp_path, arch, shards, dtype):
    path = write_random_checkpoint(tmp_path, arch, shards=shards, dtype=dtype)
    assert (path / "model.safetensors.index.json").is_file() == (shards > 1)
    model = load_model(str(path))
    assert isinstance(model, CLASSES[arch])
    assert model.dtype == dtype  # default: the config's torch_dtype
    assert model.device == torch.device("cpu")
    assert model.vocab_size == 128 and model.mask_token_id == 127
    assert model.eos_token_ids == (1,) and model.pad_token_id == 1
    assert model.logits_shift == (1 if arch == "dream" else 0)
    # every stored tensor arrived unchanged (bf16 → fp64 is exact)
    m64 = load_model(path, dtype="float64")
    stored = {}
    for f in path.glob("*.safetensors"):
        stored.update(load_file(f))
    params = dict(m64.named_parameters())
    assert set(params) == set(stored)
    for name, t in stored.items():
        assert torch.equal(params[name], t.double()), name
    assert not any(p.requires_grad for p in m64.parameters())


def test_dtype_resolution():
    rd = resolve_dtype
    assert rd("bf16") is torch.bfloat16 and rd("torch.float16") is torch.float16
    assert rd(None, {"torch_dtype": "bfloat16"}) is torch.bfloat16
    assert rd(None, {}, "cpu") is torch.float32 and rd(None, {}, "cuda") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        rd("float8")
    with pytest.raises(ValueError, match="unsupported"):
        rd(torch.int8)


def _rewrite(path: Path, edit) -> None:
    file = path / "model.safetensors"
    weights = load_file(file)
    edit(weights)
    save_file(weights, file)


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_mismatch_errors_list_names(tmp_path, arch):
    path = write_random_checkpoint(tmp_path, arch)
    head = "lm_head.weight" if arch == "dream" else "model.transformer.ff_out.weight"

    def edit(w):
        del w[head]
        w["extra.weight"] = torch.zeros(2)
        norm = next(k for k in w if k.endswith("norm.weight"))
        w[norm] = torch.zeros(3)

    _rewrite(path, edit)
    with pytest.raises(ValueError) as exc:
        load_model(path)
    msg = str(exc.value)
    assert f"1 missing weights: {head}" in msg
    assert "1 unexpected weights: extra.weight" in msg
    assert "1 wrong-shaped weights" in msg and "(3,) (expected (32,))" in msg


def test_many_missing_weights_are_truncated(tmp_path):
    path = write_random_checkpoint(tmp_path, "llada", n_layers=3)
    _rewrite(path, lambda w: [w.pop(k) for k in list(w) if ".blocks." in k])
    with pytest.raises(ValueError, match=r"27 missing weights: .*\(17 more\)"):
        load_model(path)


def test_missing_files_and_unknown_model_type(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_model(tmp_path)
    path = write_random_checkpoint(tmp_path / "a", "dream")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt9"}))
    with pytest.raises(ValueError, match=r"unknown model_type 'gpt9'.*Dream.*llada"):
        load_model(path)
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        load_model(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        load_model(str(tmp_path / "nope" / "deeper"))


def test_tiny_and_hub_errors(monkeypatch):
    if not (loading_mod.TINY_FOLDER / "config.json").is_file():
        with pytest.raises(FileNotFoundError, match=r"experiments/tiny/train\.py"):
            load_model("tiny")
    import huggingface_hub

    def offline(**kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="could not download org/model from the Hugging Face hub"):
        load_model("org/model")


def test_unsupported_config_options():
    with pytest.raises(ValueError, match="alibi"):
        LLaDAModel.spec_from_config(tiny_config("llada", alibi=True))
    with pytest.raises(ValueError, match="rope_scaling"):
        DreamModel.spec_from_config(tiny_config("dream", rope_scaling={"type": "yarn"}))
    with pytest.raises(ValueError, match="'d_model'"):
        LLaDAModel.spec_from_config({"model_type": "llada"})


@needs_shared
@pytest.mark.parametrize(
    ("cls", "folder", "count"),
    [(LLaDAModel, "LLaDA-8B-Instruct", 291), (DreamModel, "Dream-v0-Instruct-7B", 339)],
)
def test_expected_names_match_released_index(cls, folder, count):
    config = json.loads((CONFIGS / folder / "config.json").read_text())
    index = json.loads((CONFIGS / folder / "model.safetensors.index.json").read_text())
    names = cls.expected_weight_names(config)
    assert len(names) == count
    assert names == sorted(index["weight_map"])


@needs_shared
@pytest.mark.parametrize(
    ("preset", "folder"), [("llada-8b", "LLaDA-8B-Instruct"), ("dream-7b", "Dream-v0-Instruct-7B")]
)
def test_presets_match_released_configs(preset, folder):
    config = json.loads((CONFIGS / folder / "config.json").read_text())
    cls = loading_mod.find_model_class(config["model_type"])
    assert cls.spec_from_config(loading_mod.preset_config(preset)) == cls.spec_from_config(config)


@needs_shared
def test_dream_tokenizer_and_chat_template(tmp_path):
    src = CONFIGS / "Dream-v0-Instruct-7B"
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for name in DREAM_TOKENIZER_FILES:
        shutil.copyfile(src / name, tok_dir / name)
    path = write_random_checkpoint(
        tmp_path / "ckpt",
        "dream",
        tokenizer=tok_dir,
        vocab_size=151680,
        d_model=8,
        n_heads=2,
        n_kv_heads=1,
        d_ff=8,
        n_layers=1,
        mask_token_id=151666,
        eos_token_id=151643,
        pad_token_id=151643,
        dtype=torch.bfloat16,
    )
    model = load_model(path)
    tok = model.tokenizer
    assert tok is not None
    assert tok.convert_tokens_to_ids("<|mask|>") == model.mask_token_id
    assert model.eos_token_ids == (151643, 151645)  # <|endoftext|>, <|im_end|>
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nWhat is 2+3?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_eos_fallback_without_tokenizer():
    llada = build_model(
        {
            "preset": "llada-tiny",
            "vocab_size": 126464,
            "embedding_size": 126464,
            "eos_token_id": 126081,
            "d_model": 8,
            "n_heads": 2,
            "n_kv_heads": 2,
            "mlp_hidden_size": 8,
            "n_layers": 1,
        }
    )
    assert llada.eos_token_ids == (126081, 126348)
    assert llada.vocab_size == 126464


# --- forward contract -------------------------------------------------------------------


def test_kv_span_forward_equals_full_forward(model64):
    b, t = 2, 24
    ids = _ids(model64, b, t)
    full = model64.forward(ids)  # (B, T, V)
    assert full.shape == (b, t, model64.vocab_size) and full.dtype == torch.float64
    kv = model64.new_kv(b, t)
    assert kv.k.shape == (2, b, model64.spec.n_kv_heads, t, model64.spec.head_dim)
    refresh = model64.forward(ids, kv=kv, logits_rows=(3, 7))
    torch.testing.assert_close(refresh, full[:, 3:7], rtol=1e-10, atol=1e-10)
    before_k = kv.k.clone()
    for s, e in [(8, 16), (16, 24), (0, 5)]:  # dual- and prefix-style spans
        out = model64.forward(ids[:, s:e], start=s, kv=kv)
        torch.testing.assert_close(out, full[:, s:e], rtol=1e-10, atol=1e-10)
        sub = model64.forward(ids[:, s:e], start=s, kv=kv, logits_rows=(1, 3))
        torch.testing.assert_close(sub, full[:, s + 1 : s + 3], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(kv.k, before_k, rtol=1e-10, atol=1e-10)


def test_span_forward_reads_cache_and_writes_only_its_span(model64):
    b, t, s, e = 1, 16, 4, 8
    ids = _ids(model64, b, t, seed=1)
    kv = model64.new_kv(b, t)
    model64.forward(ids, kv=kv)
    ref = model64.forward(ids[:, s:e], start=s, kv=kv)
    snapshot = kv.k.clone()
    other = ids.clone()
    other[:, s:e] = (ids[:, s:e] + 1) % model64.mask_token_id
    model64.forward(other[:, s:e], start=s, kv=kv)
    changed = (kv.k != snapshot).any(dim=(0, 1, 2, 4))  # (T,)
    assert changed[s:e].all() and not changed[:s].any() and not changed[e:].any()
    kv.k[:, :, :, 12:] += 1.0  # corrupt the suffix K: the span output must change
    model64.forward(ids[:, s:e], start=s, kv=kv)
    assert not torch.allclose(model64.forward(ids[:, s:e], start=s, kv=kv), ref)


def test_left_padding_matches_unpadded_rows(model64):
    lengths, t = (10, 6), 10
    rows = [_ids(model64, 1, n, seed=i)[0] for i, n in enumerate(lengths)]
    ids = torch.full((2, t), model64.pad_token_id, dtype=torch.long)
    mask = torch.zeros((2, t), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, t - r.numel() :] = r
        mask[i, t - r.numel() :] = True
    pos = positions_from_mask(mask)
    padded = model64.forward(ids, attention_mask=mask, position_ids=pos)
    kv = model64.new_kv(2, t)
    model64.forward(ids, kv=kv, attention_mask=mask, position_ids=pos)
    span = model64.forward(ids[:, 6:], start=6, kv=kv, attention_mask=mask, position_ids=pos[:, 6:])
    for i, r in enumerate(rows):
        alone = model64.forward(r[None])  # (1, n, V)
        torch.testing.assert_close(padded[i, t - r.numel() :], alone[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(span[i], alone[0, -4:], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model64.logits(ids, mask), model64.logits(ids, mask))


def test_logits_alignment(model64):
    ids = _ids(model64, 2, 9)
    raw = model64.forward(ids)
    aligned = model64.logits(ids)
    assert aligned.shape == (2, 9, model64.vocab_size)
    if model64.logits_shift:  # Dream: row i predicts i from output i − 1
        torch.testing.assert_close(aligned[:, 1:], raw[:, :-1])
        torch.testing.assert_close(aligned[:, 0], raw[:, 0])
    else:
        torch.testing.assert_close(aligned, raw)


def test_forward_argument_errors(model64):
    ids = _ids(model64, 1, 8)
    with pytest.raises(ValueError, match="needs a KV buffer"):
        model64.forward(ids, start=2)
    with pytest.raises(ValueError, match="outside the KV buffer"):
        model64.forward(ids, start=4, kv=model64.new_kv(1, 8))
    with pytest.raises(ValueError, match=r"attention_mask must be \(B, T\)"):
        model64.forward(ids, attention_mask=torch.ones(1, 9, dtype=torch.bool))


def test_bf16_forward_runs_and_is_close_to_fp64(tmp_path):
    path = write_random_checkpoint(tmp_path, "dream", seed=2)
    m64, m16 = load_model(path, dtype=torch.float64), load_model(path, dtype="bf16")
    ids = _ids(m64, 1, 12)
    kv = m16.new_kv(1, 12)
    assert kv.k.dtype == torch.bfloat16
    out = m16.forward(ids, kv=kv)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), m64.forward(ids), rtol=0.05, atol=0.05)


def test_build_model_presets_and_custom():
    m = build_model("dream-tiny", dtype="float64", seed=5)
    again = build_model({"preset": "dream-tiny"}, dtype=torch.float64, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), again.parameters(), strict=True))
    custom = build_model({"preset": "llada-tiny", "n_layers": 3, "n_kv_heads": 2})
    assert custom.spec.n_layers == 3 and custom.spec.n_kv_heads == 2
    assert custom.new_kv(1, 4).k.shape == (3, 1, 2, 4, 8)
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("llada-80b")
    big = build_model("llada-8b", device="meta")  # shapes only, nothing allocated
    assert sum(p.numel() for p in big.parameters()) > 8e9
    assert big.vocab_size == 126464 and big.eos_token_ids == (126081, 126348)


# --- end to end -------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_generate_smoke(model64, cache):
    prompts = [_ids(model64, 1, n, seed=n)[0] for n in (3, 7)]
    out = dlm_decode.generate(
        model64, prompts, policy="frechet", cache=cache, gen_length=8, block_length=4
    )
    assert out.sequences.shape == (2, 7 + 8)
    assert not (out.responses == model64.mask_token_id).any()
    assert out.nfe >= 2


def test_tied_embeddings(tmp_path):
    path = write_random_checkpoint(tmp_path, "llada", weight_tying=True)
    model = load_model(path, dtype=torch.float64)
    names = dict(model.named_parameters())
    assert "model.transformer.ff_out.weight" not in names
    assert model.module.head is None
    ids = _ids(model, 1, 5)
    hidden = model.module.norm(model.module.embed(ids))  # no blocks: check the head only
    model.module.blocks = torch.nn.ModuleList()
    expected = hidden @ names["model.transformer.wte.weight"].T
    torch.testing.assert_close(model.forward(ids), expected)


def test_third_party_model_plugin_is_detected(tmp_path):
    from dlm_decode.hookspecs import hookimpl
    from dlm_decode.registry import reset_registry

    class MyLLaDA(LLaDAModel):
        name = "my_llada"
        config_model_types = ("my_llada",)

    class Plugin:
        @staticmethod
        @hookimpl
        def register_models(register):
            register(MyLLaDA)

    path = write_random_checkpoint(tmp_path, "llada")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "my_llada"}))
    try:
        reset_registry([("my_plugin", Plugin())])
        assert isinstance(load_model(path), MyLLaDA)
    finally:
        reset_registry()
    with pytest.raises(ValueError, match="unknown model_type 'my_llada'"):
        load_model(path)


def _llama_names(n_layers: int) -> dict[str, str]:
    """transformers Llama weight name → LLaDA checkpoint name."""
    out = {
        "model.embed_tokens.weight": "model.transformer.wte.weight",
        "model.norm.weight": "model.transformer.ln_f.weight",
        "lm_head.weight": "model.transformer.ff_out.weight",
    }
    pairs = [
        ("self_attn.q_proj", "q_proj"),
        ("self_attn.k_proj", "k_proj"),
        ("self_attn.v_proj", "v_proj"),
        ("self_attn.o_proj", "attn_out"),
        ("mlp.gate_proj", "ff_proj"),
        ("mlp.up_proj", "up_proj"),
        ("mlp.down_proj", "ff_out"),
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ff_norm"),
    ]
    for i in range(n_layers):
        for hf, ours in pairs:
            out[f"model.layers.{i}.{hf}.weight"] = f"model.transformer.blocks.{i}.{ours}.weight"
    return out


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_native_model_matches_transformers_llama_qwen2_with_bidirectional_mask(tmp_path, arch):
    """LLaDA is Llama without causality, Dream is Qwen2 without causality: with the same
    weights and an all-visible 4-D mask, transformers' implementations give our logits."""
    import transformers

    write_random_checkpoint(tmp_path, arch=arch, seed=1)
    model = load_model(str(tmp_path), dtype=torch.float64)
    sp = model.spec
    common = dict(
        vocab_size=sp.vocab_size,
        hidden_size=sp.d_model,
        intermediate_size=sp.d_ff,
        num_hidden_layers=sp.n_layers,
        num_attention_heads=sp.n_heads,
        num_key_value_heads=sp.n_kv_heads,
        rope_theta=sp.rope_theta,
        rms_norm_eps=sp.rms_norm_eps,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    ours = dict(model.named_parameters())
    if arch == "dream":
        ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).double()
        names = {k: k for k in ref.state_dict()}
    else:
        cfg = transformers.LlamaConfig(**common, attention_bias=False, mlp_bias=False)
        ref = transformers.LlamaForCausalLM(cfg).double()
        names = _llama_names(sp.n_layers)
    ref.load_state_dict({k: ours[v].detach() for k, v in names.items()}, strict=True)
    ids = torch.randint(0, sp.vocab_size - 4, (2, 11), generator=torch.Generator().manual_seed(0))
    visible = torch.zeros(2, 1, 11, 11, dtype=torch.float64)  # additive mask: all keys visible
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=visible).logits
        causal = ref(input_ids=ids).logits
        got = model.forward(ids)
    # transformers computes RoPE frequencies in float32: agreement to ~1e-7, not 1e-15.
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (causal - got).abs().max() > 1e-2  # the mask really made it bidirectional


def test_resolve_device_defaults_and_refuses_missing_cuda(monkeypatch):
    from dlm_decode.models.loading import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match=r"no CUDA device.*use cpu"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None) == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match=r"has 2 CUDA device\(s\); use one of: cuda, cuda:0"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["tpu", "meta", "cpu:5", "", "CUDA", "cuda:-1"])
def test_resolve_device_refuses_unknown_names_in_one_line(name):
    from dlm_decode.models.loading import resolve_device

    with pytest.raises(
        ValueError, match=r"is not a device dlm_decode runs on; use one of: cpu"
    ) as e:
        resolve_device(name)
    assert "\n" not in str(e.value)
