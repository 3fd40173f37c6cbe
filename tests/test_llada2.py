"""LLaDA2.0 MoE (``llada2_moe``, issue 16): config reader, weight names, the router, the
logits against the authors' modeling code in ``../shared/refs/llada2`` (imported with
stand-ins for what it needs and this CPU lacks, never copied), and exact block caching."""

from __future__ import annotations

import importlib
import importlib.machinery
import inspect
import json
import logging
import sys
import types
import typing
from pathlib import Path

import pytest
import torch
from block_support import block_mask, install_stub_modules, random_ids, sharpen

import dlm_decode
from dlm_decode.models import ConfigError, LLaDA2Model, build_model, load_model
from dlm_decode.models.llada2 import LLaDA2Router
from dlm_decode.models.loading import preset_config
from dlm_decode.models.testing import write_random_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared"
CONFIG_DIR = SHARED / "data" / "model_configs" / "LLaDA2.0-mini-dfactory"
REFS = SHARED / "refs" / "llada2"
needs_shared = pytest.mark.skipif(
    not CONFIG_DIR.is_dir() or not REFS.is_dir(),
    reason=f"shared LLaDA2 config / refs not found under {SHARED}",
)


@pytest.fixture(scope="module")
def llada2_64(tmp_path_factory) -> LLaDA2Model:
    """A tiny random LLaDA2 checkpoint written and loaded in float64 (1 dense + 2 MoE
    layers, 8 experts in 4 groups, top-2 of 2 groups, a shared expert, block size 4), its
    matrices ×10 so that routing and greedy decodes are not degenerate."""
    path = write_random_checkpoint(tmp_path_factory.mktemp("llada2"), "llada2_moe", seed=5)
    model = load_model(path, dtype=torch.float64)
    assert isinstance(model, LLaDA2Model)
    return sharpen(model, keep=("norm", "expert_bias"))


# --------------------------------------------------------------------------------------
# The authors' modeling code, imported on the CPU
# --------------------------------------------------------------------------------------


def _install_llada2_shims() -> tuple[types.ModuleType, typing.Callable[[], None]]:
    """Import ``../shared/refs/llada2/modeling_llada2_moe.py`` on a CPU with transformers 5.

    It imports ``veomni`` (ByteDance's training framework: fused MoE kernels, parallel
    state, liger kernels, a logger) and names transformers 5 dropped
    (``modeling_attn_mask_utils``, ``is_torch_fx_available``, the ``default`` RoPE
    initialiser). Stand-ins: no liger kernels, no fx, a logger; the 4-D mask helper passes
    a 4-D mask through unchanged, as transformers 4.52's SDPA path does; the ``default``
    RoPE as transformers 4.52 computes it (``partial_rotary_factor`` of ``head_dim``).
    The modeling file itself runs unchanged.

    Returns:
        The modeling module, and a function that removes every stand-in again.
    """
    undo: list[typing.Callable[[], None]] = []
    import transformers.utils.import_utils as import_utils
    from transformers import modeling_rope_utils as rope_utils

    if not hasattr(import_utils, "is_torch_fx_available"):
        import_utils.is_torch_fx_available = lambda: False
        undo.append(lambda: delattr(import_utils, "is_torch_fx_available"))
    if "default" not in rope_utils.ROPE_INIT_FUNCTIONS:

        def default_rope(config, device=None):
            head_dim = getattr(config, "head_dim", None)
            head_dim = head_dim or config.hidden_size // config.num_attention_heads
            dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
            exps = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
            return 1.0 / (config.rope_theta**exps), 1.0

        rope_utils.ROPE_INIT_FUNCTIONS["default"] = default_rope
        undo.append(lambda: rope_utils.ROPE_INIT_FUNCTIONS.pop("default", None))

    def sdpa_mask(attention_mask, input_shape, inputs_embeds, past_key_values_length, **kw):
        if attention_mask is None or attention_mask.dim() != 4:
            raise NotImplementedError("the LLaDA2 parity test passes a 4-D mask")
        return attention_mask

    def not_used(*args, **kwargs):
        raise NotImplementedError("not used by the LLaDA2 parity test")

    class Logger:
        def __getattr__(self, name):
            return logging.getLogger("llada2_ref").info

    mods = {
        name: types.ModuleType(name)
        for name in (
            "transformers.modeling_attn_mask_utils",
            "veomni",
            "veomni.ops",
            "veomni.distributed",
            "veomni.distributed.parallel_state",
            "veomni.utils",
            "veomni.utils.import_utils",
            "veomni.utils.logging",
            "llada2_ref",
        )
    }
    masks = mods["transformers.modeling_attn_mask_utils"]
    masks.AttentionMaskConverter = object
    masks._prepare_4d_causal_attention_mask_for_sdpa = sdpa_mask
    masks._prepare_4d_attention_mask = not_used
    masks._prepare_4d_causal_attention_mask = not_used
    mods["veomni.ops"].causallm_loss_function = not_used
    mods["veomni.ops"].fused_moe_forward = not_used
    mods["veomni.distributed.parallel_state"].get_parallel_state = not_used
    mods["veomni.utils.import_utils"].is_liger_kernel_available = lambda: False
    mods["veomni.utils.logging"].get_logger = lambda name=None: Logger()
    mods["veomni.utils"].logging = mods["veomni.utils.logging"]
    mods["llada2_ref"].__path__ = [str(REFS)]
    packages = {"veomni", "veomni.distributed", "veomni.utils", "llada2_ref"}
    # transformers 4 still has modeling_attn_mask_utils
    install_stub_modules(
        mods, packages, undo, prefer_real={"transformers.modeling_attn_mask_utils"}
    )
    try:
        modeling = importlib.import_module("llada2_ref.modeling_llada2_moe")
    except Exception:
        for fn in reversed(undo):
            fn()
        raise

    def restore() -> None:
        for fn in reversed(undo):
            fn()
        for name in ("llada2_ref.modeling_llada2_moe", "llada2_ref.configuration_llada2_moe"):
            sys.modules.pop(name, None)

    return modeling, restore


def _ref_config(modeling: types.ModuleType, config: dict[str, typing.Any]) -> typing.Any:
    """The authors' config class for ``config``, with the Hugging Face ``model_type``
    (per-expert parameters; ``llada2_moe_veomni`` would build merged ones)."""

    class HFConfig(modeling.LLaDA2MoeConfig):
        model_type = "llada2_moe"

    skip = ("model_type", "torch_dtype", "architectures")
    cfg = HFConfig(**{k: v for k, v in config.items() if k not in skip})
    # transformers 5 keeps only the attributes passed in: restore the class's defaults
    # (attention_dropout is one the class takes but never stores)
    for name, param in inspect.signature(modeling.LLaDA2MoeConfig.__init__).parameters.items():
        if param.default is not inspect.Parameter.empty and not hasattr(cfg, name):
            setattr(cfg, name, param.default)
    cfg.attention_dropout = 0.0
    cfg._attn_implementation = "sdpa"
    return cfg


@pytest.fixture(scope="module")
def ref_modeling():
    """The authors' modeling module (the stand-ins removed once it is imported: the
    module keeps the names it bound)."""
    if not REFS.is_dir():
        pytest.skip(f"../shared/refs/llada2 not found under {SHARED}")
    try:
        modeling, restore = _install_llada2_shims()
    except Exception as exc:  # pragma: no cover - depends on the installed transformers
        pytest.skip(f"the authors' LLaDA2 modeling code does not import here: {exc}")
    yield modeling
    restore()


@pytest.fixture(scope="module")
def llada2_ref(llada2_64, ref_modeling):
    """The authors' ``LLaDA2MoeModelLM`` holding ``llada2_64``'s weights (strict load: the
    same checkpoint names)."""
    ref = ref_modeling.LLaDA2MoeModelLM(_ref_config(ref_modeling, llada2_64.config))
    ref = ref.double().eval()
    ref.load_state_dict(
        {k: v.clone() for k, v in llada2_64.checkpoint_state_dict().items()}, strict=True
    )
    return ref


# --------------------------------------------------------------------------------------
# Config and weight names
# --------------------------------------------------------------------------------------


@needs_shared
def test_dfactory_config_reads_and_the_mini_preset_matches_it():
    config = json.loads((CONFIG_DIR / "config.json").read_text())
    spec = LLaDA2Model.spec_from_config(config)
    assert (spec.n_layers, spec.d_model, spec.n_heads, spec.n_kv_heads, spec.head_dim) == (
        20,
        2048,
        16,
        4,
        128,
    )
    assert (spec.n_experts, spec.n_experts_per_token, spec.n_shared_experts) == (256, 8, 1)
    assert (spec.n_groups, spec.topk_groups, spec.routed_scaling) == (8, 4, 2.5)
    assert (spec.n_dense_layers, spec.d_ff, spec.moe_d_ff, spec.rope_dim) == (1, 5120, 512, 64)
    assert spec.block_size == 32 and not spec.out_bias and not spec.qkv_bias
    model = build_model(config, device="meta")  # model_type llada2_moe_veomni is accepted
    assert isinstance(model, LLaDA2Model)
    assert model.mask_token_id == 156895 and model.eos_token_ids == (156892,)
    assert model.attention.block_size == 32 and model.logits_shift == 0
    preset = preset_config("llada2-mini")
    shared = {k for k in preset if k in config} - {"model_type", "torch_dtype"}
    assert {k: preset[k] for k in shared} == {k: config[k] for k in shared}
    assert len(shared) > 30
    params = sum(p.numel() for p in build_model("llada2-mini", device="meta").parameters())
    assert 16.0e9 < params < 16.5e9  # LLaDA2.0-mini: 16B total parameters


def test_mini_weight_names_follow_the_hf_per_expert_layout():
    names = set(LLaDA2Model.expected_weight_names(preset_config("llada2-mini")))
    per_moe = 2 + 3 * 256 + 3  # router weight and bias, experts, shared experts
    attn = {"input_layernorm", "post_attention_layernorm", "attention.dense"}
    attn |= {f"attention.{n}" for n in ("query_key_value", "query_layernorm", "key_layernorm")}
    # embeddings, final norm, head; 6 per layer; the dense MLP of layer 0; the MoE layers
    assert len(names) == 3 + 20 * len(attn) + 3 + 19 * per_moe
    for i in range(20):
        for sub in attn:
            assert f"model.layers.{i}.{sub}.weight" in names
    assert {f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")} <= names
    assert "model.layers.0.mlp.gate.weight" not in names
    for i in (1, 19):
        pre = f"model.layers.{i}.mlp."
        assert {pre + "gate.weight", pre + "gate.expert_bias"} <= names
        assert {
            f"{pre}experts.{e}.{p}_proj.weight" for e in (0, 255) for p in ("gate", "up", "down")
        } <= names
        assert {f"{pre}shared_experts.{p}_proj.weight" for p in ("gate", "up", "down")} <= names
        assert pre + "experts.256.up_proj.weight" not in names
    assert {"model.word_embeddings.weight", "model.norm.weight", "lm_head.weight"} <= names


def test_tiny_weight_names_equal_the_authors_hf_layout(llada2_64, ref_modeling):
    ref = ref_modeling.LLaDA2MoeModelLM(_ref_config(ref_modeling, llada2_64.config))
    ours = llada2_64.checkpoint_state_dict()
    theirs = ref.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in theirs.items()
    }


def test_config_errors_are_one_line():
    cfg = preset_config("llada2-tiny")
    cases = {
        "n_group": {"n_group": 3},  # 8 experts do not split into 3 groups
        "topk_group": {"topk_group": 5},
        "num_experts_per_tok": {"num_experts_per_tok": 5},  # 2 groups of 2 reach 4
        "partial_rotary_factor": {"partial_rotary_factor": 0.1},
        "rotary_dim": {"rotary_dim": 6},
        "first_k_dense_replace": {"first_k_dense_replace": 4},
        "moe_intermediate_size": {"moe_intermediate_size": "16"},
        "use_bias": {"use_bias": "false"},
        "mask_token_id": {"mask_token_id": 128},
        "num_experts": {"num_experts": None},
    }
    for key, change in cases.items():
        with pytest.raises(ConfigError, match=key) as err:
            build_model(cfg | change)
        assert "\n" not in str(err.value)
    for key, value in {"score_function": "softmax", "rope_scaling": {"type": "linear"}}.items():
        with pytest.raises(ValueError, match=key):
            build_model(cfg | {key: value})


def test_write_random_checkpoint_round_trips(tmp_path):
    path = write_random_checkpoint(tmp_path / "l2", "llada2_moe", seed=1, shards=3)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(index) == LLaDA2Model.expected_weight_names(preset_config("llada2-tiny"))
    model = load_model(path)  # float32, the stored dtype
    assert isinstance(model, LLaDA2Model) and model.attention.block_size == 4
    config = json.loads((path / "config.json").read_text())
    again = LLaDA2Model.from_config(config, dtype=torch.float32, seed=1, norm_noise=0.1)
    theirs = dict(again.named_parameters())
    for name, got in model.named_parameters():
        assert torch.equal(got, theirs.pop(name)), name
    assert not theirs
    ids = random_ids(9, seed=3)
    torch.testing.assert_close(model.logits(ids), again.logits(ids), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------
# The router against the authors' gate
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_router_equals_the_authors_gate(ref_modeling, seed):
    """Same experts (in the same order) and the same weights, bit for bit, on random
    hidden states; the expert bias and the group limit both change the choice."""
    config = preset_config("llada2-tiny") | {"num_experts": 16, "num_experts_per_tok": 3}
    spec = LLaDA2Model.spec_from_config(config)
    gen = torch.Generator().manual_seed(seed)
    ours = LLaDA2Router(spec, torch.float64)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(16, 32, generator=gen, dtype=torch.float64))
        ours.expert_bias.copy_(0.3 * torch.randn(16, generator=gen, dtype=torch.float64))
    gate = ref_modeling.LLaDA2MoeGate(_ref_config(ref_modeling, config)).double()
    gate.load_state_dict(ours.state_dict())
    x = torch.randn(64, 32, generator=gen, dtype=torch.float64)
    experts, weights = ours(x)
    want_idx, want_w, _ = gate(x)
    assert torch.equal(experts, want_idx)
    assert weights.dtype == want_w.dtype == torch.float32
    assert torch.equal(weights, want_w)
    torch.testing.assert_close(weights.sum(-1), torch.full((64,), 2.5), rtol=1e-6, atol=0)
    # the chosen experts lie in topk_group = 2 of the 4 groups (of 4 experts)
    assert max(len(set((row // 4).tolist())) for row in experts) <= 2
    # the bias and the group limit matter: plain top-k picks differ for some tokens
    scores = torch.sigmoid(x.float() @ ours.weight.float().T)
    plain = scores.topk(3).indices
    biased = (scores + ours.expert_bias).topk(3).indices
    assert not torch.equal(plain.sort(-1).values, experts.sort(-1).values)
    assert not torch.equal(biased.sort(-1).values, experts.sort(-1).values)


# --------------------------------------------------------------------------------------
# Logits against the authors' model, block-causal attention, caches
# --------------------------------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize("length", [12, 10])
def test_logits_equal_the_authors_modeling_code(llada2_64, llada2_ref, length):
    """The authors' SDPA path with the block-diagonal causal mask its ``generate`` builds
    (here boolean, true = attend, at the model's block size 4)."""
    ids = random_ids(length, seed=length, batch=2)
    mask = block_mask(length, 4)[None, None].expand(2, 1, length, length)
    with torch.no_grad():
        want = llada2_ref(
            input_ids=ids,
            attention_mask=mask,
            position_ids=torch.arange(length)[None],
            use_cache=False,
            output_attentions=False,
            output_hidden_states=False,
            output_router_logits=False,
            return_dict=True,
        ).logits
        full = llada2_ref(
            input_ids=ids,
            attention_mask=torch.ones_like(mask),
            position_ids=torch.arange(length)[None],
            use_cache=False,
            output_attentions=False,
            output_hidden_states=False,
            output_router_logits=False,
            return_dict=True,
        ).logits
    got = llada2_64.logits(ids)
    assert want.dtype == torch.float32  # the authors' LM head returns float32 logits
    want, full = want.double(), full.double()
    scale = float(want.abs().max())
    # the authors' RMSNorm, RoPE, router and expert sum work in float32: ~1e-7 relative
    torch.testing.assert_close(got, want, atol=1e-5 * scale, rtol=0)
    assert (full - got).abs().max() > 1e-2 * scale  # the mask is not full attention


def test_block_causal_logits_ignore_later_blocks(llada2_64):
    ids = random_ids(12, seed=7)
    base = llada2_64.logits(ids)
    later = ids.clone()
    later[0, 9] = (later[0, 9] + 1) % 120 + 2  # a token of block 2
    out = llada2_64.logits(later)
    torch.testing.assert_close(out[:, :8], base[:, :8], rtol=0, atol=0)
    assert (out[:, 8] - base[:, 8]).abs().max() > 1e-6  # position 8 sees the later 9


def test_kv_span_forward_equals_full_forward(llada2_64):
    ids = random_ids(12, seed=1, batch=2)
    full = llada2_64.forward(ids)
    kv = llada2_64.new_kv(2, 12)
    llada2_64.forward(ids[:, :8], start=0, kv=kv, logits_rows=(0, 0))
    kv.k[:, :, :, 8:].normal_()  # garbage in later slots: hidden by the mask
    span = llada2_64.forward(ids[:, 8:], start=8, kv=kv)
    torch.testing.assert_close(span, full[:, 8:], rtol=1e-10, atol=1e-10)
    slots = torch.tensor([[4, 5, 6, 7], [4, 5, 6, 7]])
    part = llada2_64.forward(ids[:, 4:8], positions=slots, kv=kv)
    torch.testing.assert_close(part, full[:, 4:8], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("policy", ["threshold", "fixed", "frechet"])
def test_block_cache_decode_equals_no_cache(llada2_64, policy):
    prompts = [random_ids(n, seed=n)[0] for n in (9, 5, 13)]  # ragged: pads 4, 8, 0
    kw = dict(policy=policy, gen_length=12, block_length=4, early_stop=False)
    if policy == "fixed":
        kw["steps"] = 6
    none = dlm_decode.generate(llada2_64, prompts, cache="none", **kw)
    block = dlm_decode.generate(llada2_64, prompts, cache="block", **kw)
    assert torch.equal(none.sequences, block.sequences)
    assert block.token_forwards < none.token_forwards
    responses = none.responses
    assert not (responses == llada2_64.mask_token_id).any()
    assert len(set(responses.flatten().tolist())) > 3  # not one repeated token
