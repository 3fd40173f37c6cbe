"""Block-diffusion models (issue 16): the block-causal attention pattern, the Decoder's block
grid, the exact ``block`` cache, and the native SDAR model against transformers' Qwen3 and
the authors' code in ``../shared/refs/sdar`` (imported, never copied)."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import sys
import types
import typing
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from block_support import block_mask, install_stub_modules, random_ids, sharpen

import dlm_decode
from dlm_decode.decoder import Decoder
from dlm_decode.interfaces import AttentionPattern, CommitPolicy, StepState
from dlm_decode.models import SDARModel, build_model, load_model
from dlm_decode.models.testing import write_random_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared"
CONFIGS = SHARED / "data" / "model_configs"
SDAR_REFS = SHARED / "refs" / "sdar"
needs_shared = pytest.mark.skipif(
    not (CONFIGS / "SDAR-4B-Chat").is_dir() or not SDAR_REFS.is_dir(),
    reason=f"shared SDAR configs / refs not found under {SHARED}",
)


@pytest.fixture(scope="module")
def sdar64(tmp_path_factory) -> SDARModel:
    """A tiny random SDAR checkpoint (block size 4, head dim 16 ≠ hidden / heads), float64,
    its matrices scaled ×10 so that greedy decodes are not one repeated token."""
    path = write_random_checkpoint(tmp_path_factory.mktemp("sdar"), "sdar", seed=3)
    model = load_model(path, dtype=torch.float64)
    assert isinstance(model, SDARModel)
    return sharpen(model)


class Leftmost(CommitPolicy):
    """Commits the leftmost masked position of each row (SDAR's ``sequential`` strategy with
    one token per step)."""

    name: ClassVar[str] = "test_leftmost"

    def select(self, confidence, masked, state: StepState):
        first = torch.cumsum(masked.long(), -1) == 1
        return first & masked


# --------------------------------------------------------------------------------------
# The attention pattern
# --------------------------------------------------------------------------------------


def test_attention_pattern_property_and_validation(sdar64):
    assert sdar64.attention == AttentionPattern(4) and sdar64.attention.block_causal
    assert str(sdar64.attention) == "block-causal(4)"
    llada = build_model("llada-tiny", dtype=torch.float64)
    assert llada.attention.block_size is None and str(llada.attention) == "full"
    assert (
        AttentionPattern(4).block_grid_start(7) == 4 and AttentionPattern().block_grid_start(7) == 7
    )
    with pytest.raises(ValueError, match="block_size"):
        AttentionPattern(0)


def test_block_causal_logits_ignore_later_blocks_and_see_their_own(sdar64):
    ids = random_ids(12)
    base = sdar64.logits(ids)
    later = ids.clone()
    later[0, 9] = (later[0, 9] + 1) % 120 + 2  # a token of block 2
    out = sdar64.logits(later)
    torch.testing.assert_close(out[:, :8], base[:, :8], rtol=0, atol=0)  # blocks 0, 1: unchanged
    assert (out[:, 8:] - base[:, 8:]).abs().max() > 1e-6  # its own block sees it (both ways)
    assert (out[:, 8] - base[:, 8]).abs().max() > 1e-6  # position 8 sees the later 9


def test_kv_span_forward_equals_full_forward_under_block_causal_mask(sdar64):
    """A query block attends to the cached earlier blocks and to itself."""
    ids = random_ids(12, seed=1)
    full = sdar64.forward(ids)
    kv = sdar64.new_kv(1, 12)
    sdar64.forward(ids[:, :8], start=0, kv=kv, logits_rows=(0, 0))  # prefill blocks 0, 1
    kv.k[:, :, :, 8:].normal_()  # garbage in later slots: hidden by the mask
    span = sdar64.forward(ids[:, 8:], start=8, kv=kv)
    torch.testing.assert_close(span, full[:, 8:], rtol=1e-10, atol=1e-10)
    # a span that starts inside a block sees the earlier part of its block from the cache
    sdar64.forward(ids[:, :12], start=0, kv=kv, logits_rows=(0, 0))
    mid = sdar64.forward(ids[:, 6:8], start=6, kv=kv)
    torch.testing.assert_close(mid, full[:, 6:8], rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------
# SDAR: config, weight names, parity
# --------------------------------------------------------------------------------------


@needs_shared
def test_sdar_expected_weight_names_match_released_index():
    folder = CONFIGS / "SDAR-4B-Chat"
    config = json.loads((folder / "config.json").read_text())
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert SDARModel.expected_weight_names(config) == sorted(index)
    spec = SDARModel.spec_from_config(config)
    assert (spec.head_dim, spec.block_size, spec.n_kv_heads, spec.qk_norm) == (128, 4, 8, True)
    preset = dlm_decode.models.loading.preset_config("sdar-4b")
    assert {k: preset[k] for k in preset if k in config} == {
        k: config[k] for k in preset if k in config and k != "torch_dtype"
    } | {"torch_dtype": "bfloat16"}
    model = build_model(config | {"block_size": 4}, device="meta")
    assert model.mask_token_id == 151669 and model.attention.block_size == 4


def test_sdar_config_errors_are_one_line():
    cfg = dlm_decode.models.loading.preset_config("sdar-tiny")
    with pytest.raises(ValueError, match="block_size"):
        build_model({k: v for k, v in cfg.items() if k != "block_size"})
    with pytest.raises(ValueError, match="attention_bias"):
        build_model(cfg | {"attention_bias": True})
    with pytest.raises(ValueError, match="head_dim"):
        build_model(cfg | {"head_dim": 15})


def test_sdar_matches_transformers_qwen3_with_block_causal_mask(sdar64):
    import transformers

    c = sdar64.config
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rope_theta",
        "rms_norm_eps",
    )
    cfg = transformers.Qwen3Config(
        **{k: c[k] for k in keys}, tie_word_embeddings=False, attention_bias=False
    )
    ref = transformers.Qwen3ForCausalLM(cfg).double().eval()
    ref.load_state_dict(
        {k: v.clone() for k, v in sdar64.checkpoint_state_dict().items()}, strict=True
    )
    ids = random_ids(11, seed=2, batch=2)
    mask = block_mask(11, 4)[None, None].expand(2, 1, 11, 11)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        causal = ref(input_ids=ids).logits
    got = sdar64.logits(ids)
    # transformers' Qwen3 RMSNorm and RoPE work in float32: ~1e-6 on these ×10 weights.
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (causal - got).abs().max() > 1e-3  # the mask is not plain causal attention


# -- the authors' modeling code and decode loop, imported on the CPU -------------------


def _install_sdar_shims() -> tuple[types.ModuleType, typing.Callable[[], None]]:
    """Import ``../shared/refs/sdar/modeling_sdar.py`` on a CPU with transformers 5.

    It imports ``flash_attn`` (CUDA only), ``einops`` and names transformers 5 dropped
    (``LossKwargs``, ``modeling_attn_mask_utils``, the ``default`` RoPE initialiser); each
    gets a small stand-in written here: RMSNorm and non-causal attention through torch.
    The modeling file itself runs unchanged.

    Returns:
        The modeling module, and a function that removes every stand-in again (call it
        once the reference model is built, so that no other test sees them).
    """
    undo: list[typing.Callable[[], None]] = []
    import transformers.cache_utils as cache_utils
    import transformers.utils as tutils
    from transformers import modeling_rope_utils as rope_utils

    if not hasattr(tutils, "LossKwargs"):

        class LossKwargs(typing.TypedDict, total=False):
            pass

        tutils.LossKwargs = LossKwargs
        undo.append(lambda: delattr(tutils, "LossKwargs"))
    for name in ("SlidingWindowCache", "StaticCache"):
        if not hasattr(cache_utils, name):
            setattr(cache_utils, name, type(name, (), {}))
            undo.append(lambda name=name: delattr(cache_utils, name))
    if "default" not in rope_utils.ROPE_INIT_FUNCTIONS:

        def default_rope(config, device=None):
            dim = config.head_dim
            exps = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
            return 1.0 / (config.rope_theta**exps), 1.0

        rope_utils.ROPE_INIT_FUNCTIONS["default"] = default_rope
        undo.append(lambda: rope_utils.ROPE_INIT_FUNCTIONS.pop("default", None))

    def rearrange(t, pattern):
        assert pattern in ("b h l d -> b l (h d)", "b l h d -> b l (h d)"), pattern
        t = t.transpose(1, 2) if pattern.startswith("b h") else t
        return t.reshape(*t.shape[:2], -1)

    def flash_attn_func(q, k, v, causal=False, softmax_scale=None):  # (B, L, H, hd)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=softmax_scale, enable_gqa=True
        )
        return out.transpose(1, 2)

    def rms_norm_fn(x, weight, bias=None, eps=1e-6):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    mods = {
        name: types.ModuleType(name)
        for name in (
            "einops",
            "flash_attn",
            "flash_attn.ops",
            "flash_attn.ops.triton",
            "flash_attn.ops.triton.layer_norm",
            "flash_attn.bert_padding",
            "transformers.modeling_attn_mask_utils",
            "sdar_ref",
            "sdar_ref.fused_linear_diffusion_cross_entropy",
        )
    }
    mods["einops"].rearrange = rearrange
    mods["flash_attn"].flash_attn_func = flash_attn_func
    mods["flash_attn"].flash_attn_varlen_func = None
    mods["flash_attn.ops.triton.layer_norm"].rms_norm_fn = rms_norm_fn
    for name in ("index_first_axis", "pad_input", "unpad_input"):
        setattr(mods["flash_attn.bert_padding"], name, None)
    mods["transformers.modeling_attn_mask_utils"].AttentionMaskConverter = object
    mods["sdar_ref"].__path__ = [str(SDAR_REFS)]
    mods[
        "sdar_ref.fused_linear_diffusion_cross_entropy"
    ].FusedLinearDiffusionCrossEntropyLoss = object
    packages = {"flash_attn", "flash_attn.ops", "flash_attn.ops.triton", "sdar_ref"}
    # transformers 4 still has modeling_attn_mask_utils
    install_stub_modules(
        mods, packages, undo, prefer_real={"transformers.modeling_attn_mask_utils"}
    )
    try:
        modeling = importlib.import_module("sdar_ref.modeling_sdar")
        from sdar_ref.configuration_sdar import SDARConfig
    except Exception:
        for fn in reversed(undo):
            fn()
        raise
    modeling.SDARConfig = SDARConfig

    def restore() -> None:
        for fn in reversed(undo):
            fn()
        for name in ("sdar_ref.modeling_sdar", "sdar_ref.configuration_sdar"):
            sys.modules.pop(name, None)

    return modeling, restore


@pytest.fixture(scope="module")
def sdar_ref(sdar64):
    """The authors' ``SDARForCausalLM`` with ``sdar64``'s weights, and their ``generate``
    module (its ``DynamicCache`` given back the indexing transformers 5 removed)."""
    try:
        modeling, restore = _install_sdar_shims()
    except Exception as exc:  # pragma: no cover - depends on the installed transformers
        pytest.skip(f"the authors' SDAR modeling code does not import here: {exc}")
    try:
        c = {k: v for k, v in sdar64.config.items() if k not in ("model_type", "torch_dtype")}
        cfg = modeling.SDARConfig(**c, fuse_cross_entropy=False)
        cfg._attn_implementation = "sdpa"
        ref = modeling.SDARForCausalLM(cfg).double().eval()
    finally:
        restore()  # the built model keeps what it needs; no other test sees the stand-ins
    ref.load_state_dict(
        {k: v.clone() for k, v in sdar64.checkpoint_state_dict().items()}, strict=True
    )
    spec = importlib.util.spec_from_file_location("sdar_generate_ref", SDAR_REFS / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    from transformers.cache_utils import DynamicCache

    class IndexableCache(DynamicCache):
        def __getitem__(self, i):
            return self.layers[i].keys, self.layers[i].values

        def __len__(self):
            return sum(1 for layer in self.layers if getattr(layer, "is_initialized", False))

    gen.DynamicCache = IndexableCache
    return ref, gen


@needs_shared
def test_sdar_matches_the_authors_modeling_code(sdar64, sdar_ref):
    ref, _ = sdar_ref
    ids = random_ids(12, seed=4)
    mask = block_mask(12, 4)[None]  # (1, T, T), as generate.py passes it
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, position_ids=torch.arange(12)[None]).logits
    # the authors' RoPE runs in float32
    torch.testing.assert_close(sdar64.logits(ids), want, atol=1e-6, rtol=0)


@needs_shared
@pytest.mark.parametrize("cache", ["none", "block", "dual"])
@pytest.mark.parametrize(
    ("prompt_len", "gen", "block"), [(6, 10, 4), (8, 8, 4), (3, 13, 8), (5, 11, 4)]
)
def test_greedy_sequential_decode_equals_sdar_generate(
    sdar64, sdar_ref, cache, prompt_len, gen, block
):
    """``block_diffusion_generate`` with top-k 1 and the ``sequential`` strategy (one
    token per step, leftmost first) vs the Decoder with a leftmost policy: token for token,
    the partial prompt block decoded with the first generated positions. The reference's
    block-causal mask is built from its ``block_length``, so the attention block equals the
    decode block here (``block_size`` set to it)."""
    ref, gen_mod = sdar_ref
    model = sdar64 if block == 4 else _with_block_size(sdar64, block)
    ref.config.block_size = block
    prompt = random_ids(prompt_len, seed=prompt_len)
    want = gen_mod.block_diffusion_generate(
        ref,
        {"input_ids": prompt},
        mask_id=model.mask_token_id,
        gen_length=gen,
        block_length=block,
        denoising_steps=block,
        temperature=1.0,
        top_k=1,
        remasking_strategy="sequential",
    )
    # our gen_length is a multiple of block_length; the grid tail is decoded and dropped
    ours_gen = -(-gen // block) * block
    out = Decoder(
        model,
        policy=Leftmost(),
        cache=cache,
        gen_length=ours_gen,
        block_length=block,
        early_stop=False,
    ).generate(prompt)
    n = want.shape[1]
    assert out.sequences.shape[1] == prompt_len + ours_gen >= n
    assert torch.equal(out.sequences[:, :n], want)
    assert len(set(want[0, prompt_len:].tolist())) > 1  # not a degenerate decode


def _with_block_size(model: SDARModel, size: int) -> SDARModel:
    """The same weights under another attention block size (the reference's mask follows
    its decode ``block_length``)."""
    import dataclasses

    spec = dataclasses.replace(model.spec, block_size=size)
    module = type(model.module)(spec, model.dtype)
    module.load_state_dict(model.module.state_dict())
    module.requires_grad_(False).eval()
    return SDARModel(module, {**model.config, "block_size": size})


@needs_shared
def test_one_step_blocks_equal_sdar_generate_dynamic_topk1(sdar64, sdar_ref):
    """``low_confidence_dynamic`` with top-k 1 sees confidence 1 everywhere and commits a
    whole block per step: ``fixed`` with one step per block does the same."""
    ref, gen_mod = sdar_ref
    ref.config.block_size = 4
    prompt = random_ids(6, seed=11)
    want = gen_mod.block_diffusion_generate(
        ref, {"input_ids": prompt}, mask_id=127, gen_length=10, block_length=4, top_k=1
    )
    for cache in ("none", "block"):
        out = dlm_decode.generate(
            sdar64,
            prompt,
            policy="fixed",
            steps=3,
            gen_length=12,
            block_length=4,
            cache=cache,
            early_stop=False,
        )
        assert torch.equal(out.sequences[:, : want.shape[1]], want)


# --------------------------------------------------------------------------------------
# The Decoder's grid and the caches
# --------------------------------------------------------------------------------------


def test_block_length_must_be_a_multiple_of_the_model_block(sdar64):
    with pytest.raises(ValueError, match=r"block_length=6 is not a multiple of the block size 4"):
        Decoder(sdar64, policy="threshold", gen_length=12, block_length=6)
    Decoder(sdar64, policy="threshold", gen_length=16, block_length=8)  # 2 attention blocks


def test_block_layout_aligns_to_the_grid_and_keeps_full_attention_unchanged(sdar64):
    dec = Decoder(sdar64, policy="threshold", gen_length=8, block_length=4)
    assert dec.block_layout(6) == (4, 3, 16)  # [4, 8) holds prompt 4, 5; tail 14, 15 dropped
    assert dec.block_layout(8) == (8, 2, 16)
    llada = build_model("llada-tiny", dtype=torch.float64)
    full = Decoder(llada, policy="threshold", gen_length=8, block_length=4)
    assert full.block_layout(6) == (6, 2, 14)


def test_partial_prompt_block_keeps_prompt_tokens_and_result_shape(sdar64):
    prompt = random_ids(6, seed=5)
    out = dlm_decode.generate(
        sdar64, prompt, policy="threshold", gen_length=8, block_length=4, early_stop=False
    )
    assert out.sequences.shape == (1, 14) and torch.equal(out.sequences[:, :6], prompt)
    assert not (out.responses == sdar64.mask_token_id).any()
    assert out.step_blocks.max() == 2  # three blocks: [4, 8), [8, 12), [12, 16)


@pytest.mark.parametrize("policy", ["threshold", "frechet", "fixed"])
def test_block_cache_is_exact_and_counts_its_write_forwards(sdar64, policy):
    prompts = [random_ids(n, seed=n)[0] for n in (9, 5, 13)]  # pads 4, 8, 0: all on the grid
    kw = dict(policy=policy, gen_length=12, block_length=4, early_stop=False)
    if policy == "fixed":
        kw["steps"] = 6
    runs = {c: dlm_decode.generate(sdar64, prompts, cache=c, **kw) for c in ("none", "block")}
    none, block = runs["none"], runs["block"]
    assert torch.equal(none.sequences, block.sequences)
    steps = len(block.step_blocks)
    blocks = int(block.step_blocks.max()) + 1
    # one prefill (prompt blocks before the first decode block) and one write per block
    # that a later block reads: blocks - 1
    assert block.nfe == steps + 1 + (blocks - 1)
    assert none.nfe == steps
    # block: each step runs its 4 positions; the prefill writes [0, 12); each write 4
    total = 12 + 4 * 4  # P = 13: the first block starts at 12; four blocks end at 28
    assert block.token_forwards == 3 * (steps * 4 + 12 + 4 * (blocks - 1))
    assert none.token_forwards == 3 * steps * total


def test_dual_and_prefix_are_exact_on_a_block_causal_model(sdar64):
    """The model applies its mask in every forward, so the K/V the full-attention caches
    reuse are those of finished blocks: exact, at a full refresh per block."""
    prompts = [random_ids(n, seed=n)[0] for n in (7, 10)]
    kw = dict(policy="threshold", gen_length=12, block_length=4, early_stop=False)
    base = dlm_decode.generate(sdar64, prompts, cache="none", **kw).sequences
    for cache in ("prefix", "dual", "block"):
        assert torch.equal(dlm_decode.generate(sdar64, prompts, cache=cache, **kw).sequences, base)


def test_ragged_row_with_grid_aligned_padding_decodes_as_alone(sdar64):
    long, short = random_ids(9, seed=1)[0], random_ids(5, seed=2)[0]  # short gets 4 pads: one block
    kw = dict(policy="threshold", gen_length=8, block_length=4, early_stop=False, cache="block")
    both = dlm_decode.generate(sdar64, [long, short], **kw)
    alone = dlm_decode.generate(sdar64, [short], **kw)
    n = alone.sequences.shape[1]
    assert torch.equal(both.sequences[1, -n:], alone.sequences[0])


def test_block_cache_on_a_full_attention_model_is_none(tmp_path):
    model = build_model("llada-tiny", dtype=torch.float64, seed=2)
    prompts = [random_ids(n, seed=n)[0] for n in (5, 8)]
    kw = dict(policy="threshold", gen_length=8, block_length=4)
    want = dlm_decode.generate(model, prompts, cache="none", **kw)
    got = dlm_decode.generate(model, prompts, cache="block", **kw)
    assert torch.equal(got.sequences, want.sequences) and got.nfe == want.nfe


@pytest.mark.parametrize("cache", ["none", "dual", "block"])
@pytest.mark.parametrize("policy", ["threshold", "frechet"])
def test_fast_decoder_equals_decoder_on_a_block_causal_model(sdar64, cache, policy):
    """The fast path allocates the grid-aligned length too: prompts whose grid runs past
    ``P + gen_length`` (P = 6, 7 here) and ragged batches decode as the reference does."""
    from dlm_decode.fast import FastDecoder

    cfg = dlm_decode.DecodeConfig(
        policy=policy, cache=cache, gen_length=8, block_length=4, early_stop=False
    )
    fast = FastDecoder(sdar64, cfg)
    for prompts in (
        [random_ids(6, seed=1)[0]],
        [random_ids(7, seed=2)[0], random_ids(4, seed=3)[0]],
    ):
        want = Decoder(sdar64, cfg).generate(prompts)
        for _ in range(2):  # the second call reuses the static buffers
            got = fast.generate(prompts)
            assert torch.equal(got.sequences, want.sequences)
            assert got.nfe == want.nfe and torch.equal(got.nfe_per_row, want.nfe_per_row)
