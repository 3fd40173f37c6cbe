"""Fast-dLLM v2 (issue 16): the native ``fast_dllm_v2`` model against the released weight
index, transformers' Qwen2 fed a block-causal 4-D mask and the authors' modeling code in
``../shared/refs/fast_dllm_v2`` (imported, never copied), and the Decoder's sub-blocks and
greedy block head against NVlabs' ``batch_sample``, token for token."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import sys
import types
import typing
from pathlib import Path

import pytest
import torch
from block_support import block_mask, install_stub_modules, random_ids, sharpen

import dlm_decode
from dlm_decode.decoder import Decoder
from dlm_decode.models import FastDLLMv2Model, build_model, load_model
from dlm_decode.models.testing import write_random_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared"
FOLDER = SHARED / "data" / "model_configs" / "Fast_dLLM_v2_7B"
REFS = SHARED / "refs" / "fast_dllm_v2"
needs_shared = pytest.mark.skipif(
    not FOLDER.is_dir() or not REFS.is_dir(),
    reason=f"shared Fast_dLLM_v2_7B config / refs not found under {SHARED}",
)
BD = 32  # the released bd_size, also the tiny preset's
SUB = 8  # NVlabs' small_block_size


@pytest.fixture(scope="module")
def fd64(tmp_path_factory) -> FastDLLMv2Model:
    """A tiny random Fast-dLLM v2 checkpoint (``bd_size`` 32), float64, its matrices
    scaled ×10 so that greedy decodes are not one repeated token."""
    path = write_random_checkpoint(tmp_path_factory.mktemp("fd2"), "fast_dllm_v2", seed=5)
    model = load_model(path, dtype=torch.float64)
    assert isinstance(model, FastDLLMv2Model)
    return sharpen(model)


# --------------------------------------------------------------------------------------
# Config, weight names
# --------------------------------------------------------------------------------------


@needs_shared
def test_expected_weight_names_match_released_index_and_config():
    config = json.loads((FOLDER / "config.json").read_text())
    index = json.loads((FOLDER / "model.safetensors.index.json").read_text())["weight_map"]
    assert FastDLLMv2Model.expected_weight_names(config) == sorted(index)
    spec = FastDLLMv2Model.spec_from_config(config)
    assert (spec.block_size, spec.n_kv_heads, spec.qkv_bias, spec.qk_norm) == (32, 4, True, False)
    assert (spec.d_model, spec.n_layers, spec.d_ff, spec.vocab_size) == (3584, 28, 18944, 152064)
    preset = dlm_decode.models.loading.preset_config("fast-dllm-v2-7b")
    shared = {k for k in preset if k in config and k != "torch_dtype"}
    assert {k: preset[k] for k in shared} == {k: config[k] for k in shared}
    # the released config names no mask id: 151665 (|<MASK>|, batch_sample's default)
    assert "mask_token_id" not in config
    model = build_model(config, device="meta")
    assert isinstance(model, FastDLLMv2Model)
    assert model.mask_token_id == 151665 and model.logits_shift == 1
    assert model.attention.block_size == 32 and 151645 in model.eos_token_ids
    added = json.loads((FOLDER / "added_tokens.json").read_text())
    assert added["|<MASK>|"] == 151665


def test_tiny_preset_and_registered_model_type():
    model = build_model("fast-dllm-v2-tiny", dtype=torch.float64)
    assert isinstance(model, FastDLLMv2Model) and str(model.attention) == "block-causal(32)"
    assert dlm_decode.models.loading.find_model_class("Fast_dLLM_Qwen") is FastDLLMv2Model


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bd_size": 0}, "bd_size"),
        ({"bd_size": "32"}, "bd_size"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": 30}, "hidden_size"),
        ({"mask_token_id": 500}, "mask_token_id"),
    ],
)
def test_config_errors_are_one_line(change, match):
    from dlm_decode.models import ConfigError

    cfg = dlm_decode.models.loading.preset_config("fast-dllm-v2-tiny")
    with pytest.raises(ConfigError, match=match) as err:
        build_model(cfg | change)
    assert "\n" not in str(err.value)


def test_unsupported_features_raise():
    cfg = dlm_decode.models.loading.preset_config("fast-dllm-v2-tiny")
    with pytest.raises(ValueError, match="rope_scaling"):
        build_model(cfg | {"rope_scaling": {"type": "yarn"}})
    with pytest.raises(ValueError, match="hidden_act"):
        build_model(cfg | {"hidden_act": "gelu"})


# --------------------------------------------------------------------------------------
# Logits parity
# --------------------------------------------------------------------------------------


def test_matches_transformers_qwen2_with_block_causal_mask(fd64):
    import transformers

    c = fd64.config
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rope_theta",
        "rms_norm_eps",
    )
    cfg = transformers.Qwen2Config(**{k: c[k] for k in keys}, tie_word_embeddings=False)
    ref = transformers.Qwen2ForCausalLM(cfg).double().eval()
    ref.load_state_dict(
        {k: v.clone() for k, v in fd64.checkpoint_state_dict().items()}, strict=True
    )
    t = 70  # three attention blocks, the last partial
    ids = random_ids(t, seed=2, batch=2)
    mask = block_mask(t, BD)[None, None].expand(2, 1, t, t)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        causal = ref(input_ids=ids).logits
    got = fd64.forward(ids)  # (B, T, V) raw output rows: row i predicts i + 1
    # transformers' RoPE works in float32: ~1e-6 on these ×10 weights
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (causal - got).abs().max() > 1e-3  # the mask is not plain causal attention
    # the shifted logits: position i from output row i - 1
    torch.testing.assert_close(fd64.logits(ids)[:, 1:], got[:, :-1], atol=0, rtol=0)


def _install_ref_shims() -> tuple[types.ModuleType, typing.Callable[[], None]]:
    """Import ``../shared/refs/fast_dllm_v2/modeling.py`` on a CPU with transformers 5.

    It imports ``einops`` (not installed here; unused at inference) and does a relative
    import of its ``configuration.py`` (a package stand-in, ``fd2_ref``, points at the
    folder); its RoPE asks for the ``default`` initialiser transformers 5 dropped (a
    stand-in computes the standard inverse frequencies). Its ``DynamicCache`` is given back
    the per-layer indexing and ``len`` transformers 5 removed. The modeling file itself
    runs unchanged (flex attention is only used in training).

    Returns:
        The modeling module, and a function that removes every stand-in again.
    """
    undo: list[typing.Callable[[], None]] = []
    from transformers import modeling_rope_utils as rope_utils
    from transformers.cache_utils import DynamicCache

    if "default" not in rope_utils.ROPE_INIT_FUNCTIONS:

        def default_rope(config, device=None):
            dim = config.hidden_size // config.num_attention_heads
            exps = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
            return 1.0 / (config.rope_theta**exps), 1.0

        rope_utils.ROPE_INIT_FUNCTIONS["default"] = default_rope
        undo.append(lambda: rope_utils.ROPE_INIT_FUNCTIONS.pop("default", None))
    mods = {name: types.ModuleType(name) for name in ("einops", "fd2_ref")}
    mods["einops"].rearrange = mods["einops"].repeat = None
    mods["fd2_ref"].__path__ = [str(REFS)]
    install_stub_modules(mods, {"fd2_ref"}, undo, prefer_real={"einops"})
    try:
        modeling = importlib.import_module("fd2_ref.modeling")
    except Exception:
        for fn in reversed(undo):
            fn()
        raise

    class IndexableCache(DynamicCache):
        def __getitem__(self, i):
            return self.layers[i].keys, self.layers[i].values

        def __len__(self):
            return sum(1 for layer in self.layers if getattr(layer, "is_initialized", False))

    modeling.DynamicCache = IndexableCache

    def restore() -> None:
        for fn in reversed(undo):
            fn()
        for name in ("fd2_ref.modeling", "fd2_ref.configuration"):
            sys.modules.pop(name, None)

    return modeling, restore


@pytest.fixture(scope="module")
def fd_ref(fd64):
    """The authors' ``Fast_dLLM_QwenForCausalLM`` with ``fd64``'s weights, and NVlabs'
    ``batch_sample`` (a plain function of the model)."""
    try:
        modeling, restore = _install_ref_shims()
    except Exception as exc:  # pragma: no cover - depends on the installed transformers
        pytest.skip(f"the authors' Fast-dLLM v2 modeling code does not import here: {exc}")
    try:
        c = {k: v for k, v in fd64.config.items() if k not in ("model_type", "torch_dtype")}
        cfg = modeling.Fast_dLLM_QwenConfig(**c)
        cfg._attn_implementation = "sdpa"
        ref = modeling.Fast_dLLM_QwenForCausalLM(cfg).double().eval()
        rope = ref.model.rotary_emb  # built while the stand-in was installed
    finally:
        restore()
    assert rope is not None
    ref.load_state_dict(
        {k: v.clone() for k, v in fd64.checkpoint_state_dict().items()}, strict=True
    )
    spec = importlib.util.spec_from_file_location(
        "fd2_generation_ref", REFS / "generation_functions.py"
    )
    gen = importlib.util.module_from_spec(spec)
    import transformers.utils as tutils

    # its class carries @auto_docstring, which transformers 5 rejects for an unregistered
    # class: the decorator is replaced by the identity while the file runs
    real = tutils.auto_docstring
    tutils.auto_docstring = lambda obj=None, **_: obj if obj is not None else (lambda o: o)
    try:
        spec.loader.exec_module(gen)
    finally:
        tutils.auto_docstring = real
    return ref, gen.Fast_dLLM_QwenForCausalLM.batch_sample


def _float64_numerics(ref) -> None:
    """Make the authors' model compute RMSNorm and RoPE in its own dtype (float64) instead
    of float32, so that a decode compared token for token is not decided by float32
    rounding at a near tie (their logits differ from the native ones by ~2e-6 otherwise)."""

    def norm(self, h):
        return self.weight * (
            h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    cfg = ref.config
    dim = cfg.hidden_size // cfg.num_attention_heads
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)

    def rope(x, position_ids):  # (B, S) → cos, sin (B, S, head_dim)
        freqs = position_ids[:, :, None].double() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    for module in ref.modules():
        if type(module).__name__ == "Fast_dLLM_QwenRMSNorm":
            module.forward = types.MethodType(norm, module)
    ref.model.rotary_emb.forward = rope


@pytest.fixture(scope="module")
def fd_ref64(fd64, fd_ref):
    """``fd_ref`` on a copy whose RMSNorm and RoPE run in float64."""
    import copy

    ref, batch_sample = fd_ref
    ref = copy.deepcopy(ref)
    _float64_numerics(ref)
    ids = random_ids(70, seed=4)
    with torch.no_grad():
        diff = (ref(input_ids=ids, block_size=BD).logits - fd64.forward(ids)).abs().max()
    assert diff < 1e-9, diff

    # The Decoder never proposes the mask token: its confidences are the softmax over the
    # vocabulary without it. batch_sample's softmax keeps it, which moves each position's
    # confidence by its own p(mask) and can reorder them. The reference's head gives the
    # mask token logit -inf, so that both loops see the same distributions.
    def no_mask(module, args, out):  # (B, S, V)
        out = out.clone()
        out[..., fd64.mask_token_id] = float("-inf")
        return out

    ref.lm_head.register_forward_hook(no_mask)
    return ref, batch_sample


@needs_shared
def test_matches_the_authors_modeling_code(fd64, fd_ref):
    ref, _ = fd_ref
    ids = random_ids(70, seed=4)
    with torch.no_grad():
        want = ref(input_ids=ids, block_size=BD).logits  # its eval mask, block size 32
        causal_mask_free = ref(input_ids=ids, block_size=1).logits  # block 1: causal
    # the authors' RoPE runs in float32 (~2e-6 on these ×10 weights)
    torch.testing.assert_close(fd64.forward(ids), want, atol=1e-5, rtol=0)
    assert (causal_mask_free - want).abs().max() > 1e-3


# --------------------------------------------------------------------------------------
# Decoding: sub-blocks and the greedy block head against batch_sample
# --------------------------------------------------------------------------------------


def _batch_sample(
    ref,
    batch_sample,
    prompt: torch.Tensor,
    max_new: int,
    threshold: float,
    use_block_cache: bool = False,
):
    """NVlabs' ``batch_sample`` (greedy: temperature 0), without stop: ``stop_token=-1``
    (no id), so every row decodes ``max_new // 32`` blocks; the sequence it returns ends
    with the extra token its last ``update_past_key_values`` forward appends."""
    seq_len = torch.tensor([prompt.shape[1]] * prompt.shape[0])
    tok = types.SimpleNamespace(pad_token_id=1)
    with torch.no_grad():
        out = batch_sample(
            ref,
            prompt.clone(),
            tok,
            block_size=BD,
            max_new_tokens=max_new,
            small_block_size=SUB,
            min_len=int(seq_len.min()),
            seq_len=seq_len,
            mask_id=127,
            threshold=threshold,
            stop_token=-1,
            use_block_cache=use_block_cache,
            temperature=0.0,
        )
    return torch.stack([out[i] for i in range(prompt.shape[0])])


@needs_shared
@pytest.mark.parametrize("cache", ["none", "block"])
@pytest.mark.parametrize("prompt_len", [40, 64, 10, 75])
@pytest.mark.parametrize("threshold", [1.0, 0.05])
def test_greedy_decode_equals_batch_sample(fd64, fd_ref64, cache, prompt_len, threshold):
    """``batch_sample`` with temperature 0 (threshold 1: one token per sub-block step, the
    most confident; 0.05: several on these weights) vs the Decoder with ``threshold`` and
    ``block_length`` 8 on the attention block of 32: token for token. P = 40 / 75: the
    partial prompt block is decoded with the first generated positions; P = 64: on the
    grid, so the prefill's last logit gives the first generated token (the greedy head);
    P = 10: no prefill (a prompt shorter than a block)."""
    ref, batch_sample = fd_ref64
    prompt = random_ids(prompt_len, seed=prompt_len, batch=2)
    max_new = 64
    want = _batch_sample(ref, batch_sample, prompt, max_new, threshold)
    end = (prompt_len // BD + max_new // BD) * BD  # the end of batch_sample's last block
    assert want.shape[1] == end + 1  # + the token its last update forward predicts
    gen = -(-(end - prompt_len) // SUB) * SUB  # gen_length must be a multiple of 8
    dec = Decoder(
        fd64,
        policy="threshold",
        policy_args={"threshold": threshold},
        cache=cache,
        gen_length=gen,
        block_length=SUB,
        early_stop=False,
    )
    out = dec.generate(prompt)
    n = min(out.sequences.shape[1], end + 1)  # past `end`: the next block's greedy head
    assert torch.equal(out.sequences[:, :n], want[:, :n])
    assert len(set(want[0, prompt_len:end].tolist())) > 3  # not a degenerate decode
    steps = len(out.step_blocks)
    first = prompt_len // BD * BD
    total = dec.block_layout(prompt_len)[2]  # the buffer (its grid tail is dropped)
    heads = sum(1 for g in range(first, total, BD) if g >= prompt_len)  # masked block starts
    if threshold < 1:  # several tokens in some steps
        assert steps + heads < total - prompt_len
    else:  # one token per step, besides the greedy heads
        assert steps + heads == total - prompt_len
    # none: one forward per step, plus one per greedy head; block: + the prefill (the write
    # of the prompt's whole blocks) unless a head's write forward is the prefill
    prefill = cache == "block" and prompt_len >= BD and prompt_len % BD != 0
    assert out.nfe == steps + heads + prefill
    assert int(out.commit_counts.sum()) == 2 * (total - prompt_len)  # heads included


def test_sub_blocks_none_and_block_agree_and_divisor_check(fd64):
    prompts = [random_ids(n, seed=n)[0] for n in (37, 50)]  # ragged: left padding
    kw = dict(policy="threshold", gen_length=40, block_length=SUB, early_stop=False)
    none = dlm_decode.generate(fd64, prompts, cache="none", **kw)
    block = dlm_decode.generate(fd64, prompts, cache="block", **kw)
    assert torch.equal(none.sequences, block.sequences)
    assert not (none.responses == fd64.mask_token_id).any()
    with pytest.raises(ValueError, match="nor a divisor"):
        Decoder(fd64, policy="threshold", gen_length=24, block_length=12)
    Decoder(fd64, policy="threshold", gen_length=64, block_length=64)  # 2 attention blocks


def test_greedy_head_is_the_previous_blocks_last_logit(fd64):
    """With the head, the first position of each generated attention block is the argmax
    of the finished block's last output row, whatever the policy."""
    prompt = random_ids(64, seed=9)
    out = dlm_decode.generate(
        fd64,
        prompt,
        policy="threshold",
        gen_length=64,
        block_length=SUB,
        cache="block",
        early_stop=False,
    )
    seq = out.sequences
    rows = fd64.forward(seq)  # (1, T, V): block-causal, so row s - 1 sees blocks < s / 32
    for s in (64, 96):
        assert int(seq[0, s]) == int(rows[0, s - 1].argmax())


@pytest.mark.parametrize("cache", ["none", "block"])
def test_fast_decoder_equals_decoder_with_sub_blocks_and_the_greedy_head(fd64, cache):
    from dlm_decode.fast import FastDecoder

    prompts = [random_ids(n, seed=n)[0] for n in (37, 50)]  # ragged: left padding
    kw = dict(policy="threshold", gen_length=40, block_length=SUB, early_stop=False)
    want = Decoder(fd64, cache=cache, **kw).generate(prompts)
    got = FastDecoder(fd64, cache=cache, **kw).generate(prompts)
    assert torch.equal(got.sequences, want.sequences) and got.nfe == want.nfe


@needs_shared
@pytest.mark.parametrize("prompt_len", [40, 64, 75])
@pytest.mark.parametrize("threshold", [1.0, 0.05])
def test_sub_block_cache_equals_batch_sample_with_use_block_cache(
    fd64, fd_ref64, prompt_len, threshold
):
    """``subblock`` (the attention block run in full only when the sub-block's first
    position is masked in some row) vs ``batch_sample(use_block_cache=True)``: token for
    token, and fewer token-forwards than ``block``."""
    ref, batch_sample = fd_ref64
    prompt = random_ids(prompt_len, seed=prompt_len, batch=2)
    want = _batch_sample(ref, batch_sample, prompt, 64, threshold, use_block_cache=True)
    end = (prompt_len // BD + 64 // BD) * BD
    gen = -(-(end - prompt_len) // SUB) * SUB
    kw = dict(policy="threshold", policy_args={"threshold": threshold}, gen_length=gen)
    kw.update(block_length=SUB, early_stop=False)
    out = Decoder(fd64, cache="subblock", **kw).generate(prompt)
    n = min(out.sequences.shape[1], end + 1)
    assert torch.equal(out.sequences[:, :n], want[:, :n])
    exact = Decoder(fd64, cache="block", **kw).generate(prompt)
    assert out.token_forwards < exact.token_forwards  # sub-block-only steps were taken
    assert out.nfe == exact.nfe or threshold < 1  # one token per step: the same steps
