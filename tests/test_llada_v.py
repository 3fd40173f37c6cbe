"""LLaDA-V: multimodal prompts through the Decoder, and parity with the authors' code.

The reference (``../shared/refs/llada_v``, imported, never copied) runs on CPU with shims
for what it imports and this checkout lacks (``llava.utils``, ``llava.cache``, the
resampler and other towers' modules, transformers 4's ``modeling_attn_mask_utils``).
Its numerics differ from ours below float64 in known places (RMSNorm, RoPE and the
attention softmax run in float32 even for float64 weights), hence the tolerances.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import dlm_decode
from dlm_decode.interfaces import IMAGE_PLACEHOLDER, MultimodalPrompt
from dlm_decode.models import CheckpointError, build_model, load_model
from dlm_decode.models.llada_v import LLaDAVModel, preset_tiny_config

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

REF = Path(__file__).resolve().parents[2] / "shared" / "refs" / "llada_v"
MASK = 126336


def _image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


def _decode(model, prompts, **kw):
    args = {"gen_length": 16, "block_length": 8, "early_stop": False, **kw}
    return dlm_decode.generate(model, prompts, **args)


# --------------------------------------------------------------------------------------
# Step 1: the prompt contract
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> LLaDAVModel:
    return build_model("llada-v-tiny", dtype=torch.float64)


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_batched_image_prompts_equal_each_decoded_alone(tiny, cache):
    a, b, c = _image(50, 30, 0), _image(20, 70, 1), _image(28, 28, 2)
    prompts = [
        MultimodalPrompt([5, 6, IMAGE_PLACEHOLDER, 7, 8], [a]),
        MultimodalPrompt([9, IMAGE_PLACEHOLDER, 3, IMAGE_PLACEHOLDER, 4, 4, 4], [b, c]),
        MultimodalPrompt([10, 11, 12]),  # no image, in a batch with images
    ]
    both = _decode(tiny, prompts, policy="fixed", steps=16, cache=cache)
    assert both.attention_mask[:, : both.prompt_length].sum(-1).unique().numel() == 3
    for i, p in enumerate(prompts):
        alone = _decode(tiny, [p], policy="fixed", steps=16, cache=cache)
        assert torch.equal(both.responses[i], alone.responses[0]), (cache, i)


def test_image_changes_the_decode_and_text_only_prompt_is_plain_ids(tiny):
    ids = [5, 6, 7, 8]
    plain = _decode(tiny, [ids], policy="fixed", steps=16)
    wrapped = _decode(tiny, [MultimodalPrompt(ids)], policy="fixed", steps=16)
    assert torch.equal(plain.sequences, wrapped.sequences)
    with_img = [MultimodalPrompt([5, IMAGE_PLACEHOLDER, 6, 7, 8], [_image(40, 40, 3)])]
    other = [MultimodalPrompt([5, IMAGE_PLACEHOLDER, 6, 7, 8], [_image(40, 40, 4)])]
    r1 = _decode(tiny, with_img, policy="fixed", steps=16)
    assert r1.prompt_length > len(ids) + 1  # the placeholder expanded into features
    e1, e2 = tiny.embed_prompt(with_img), tiny.embed_prompt(other)
    x = torch.cat([e1.ids, torch.full((1, 4), tiny.mask_token_id)], dim=1)
    l1 = tiny.forward(x, prompt_embeds=e1.embeds)
    l2 = tiny.forward(x, prompt_embeds=e2.embeds)
    assert (l1 - l2).abs().max() > 1e-6  # the image reaches the logits


def test_prompt_embeddings_replace_token_embeddings_below_p(tiny):
    # an "image" whose embedding equals the token embeddings of some ids decodes as those
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    embeds = tiny.module.embed(ids)  # (1, 6, d)
    x = torch.cat([ids, torch.full((1, 4), tiny.mask_token_id)], dim=1)
    ref = tiny.forward(x)
    swapped = torch.where(ids == 7, 1, ids)  # what the sequence holds is not read below P
    got = tiny.forward(torch.cat([swapped, x[:, 6:]], dim=1), prompt_embeds=embeds)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    kv = tiny.new_kv(1, 10)
    # a refresh, then a span crossing P: slots 4, 5 from the embeddings, 6.. from the ids
    tiny.forward(torch.cat([swapped, x[:, 6:]], dim=1), kv=kv, prompt_embeds=embeds)
    part = tiny.forward(x[:, 4:], start=4, kv=kv, prompt_embeds=embeds, logits_rows=(2, 6))
    torch.testing.assert_close(part, ref[:, 6:], rtol=1e-10, atol=1e-10)


def test_text_model_refuses_images():
    model = build_model("llada-tiny", dtype=torch.float32)
    p = MultimodalPrompt([5, IMAGE_PLACEHOLDER, 6], [_image(10, 10, 0)])
    with pytest.raises(TypeError, match="token-id prompts only"):
        _decode(model, [p], policy="fixed", steps=16)


def test_placeholders_must_match_images():
    with pytest.raises(ValueError, match="one image per placeholder"):
        MultimodalPrompt([5, IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER], [object()])


def test_masked_rows_never_propose_suppressed_ids():
    cfg = preset_tiny_config(suppress_token_ids=[3, 4])
    model = LLaDAVModel.from_config(cfg, dtype=torch.float64)
    with torch.no_grad():
        model.module.head.weight[3:5] = 10.0  # would win everywhere
    out = _decode(model, [[5, 6, 7]], policy="fixed", steps=16)
    assert not torch.isin(out.responses, torch.tensor([3, 4])).any()
    logits = model.forward(torch.tensor([[5, 6, model.mask_token_id]]))
    assert logits[0, 2, 3] == torch.finfo(torch.float64).min
    assert logits[0, 0, 3] > torch.finfo(torch.float64).min  # unmasked rows untouched
    torch.testing.assert_close(logits[:, :2], model.module(torch.tensor([[5, 6, 127]]))[:, :2])


# --------------------------------------------------------------------------------------
# Step 2: checkpoints
# --------------------------------------------------------------------------------------


def test_checkpoint_round_trip_with_image_processor(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "v")
    assert (folder / "preprocessor_config.json").is_file()
    loaded = load_model(folder, dtype=torch.float64)
    assert isinstance(loaded, LLaDAVModel)
    assert loaded.image_processor.size == 28
    sd, sd2 = tiny.checkpoint_state_dict(), loaded.checkpoint_state_dict()
    assert sorted(sd) == sorted(sd2) == LLaDAVModel.expected_weight_names(tiny.config)
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight" in sd
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight" not in sd
    assert "model.mm_projector.2.weight" in sd and "model.image_newline" in sd
    p = [MultimodalPrompt([5, IMAGE_PLACEHOLDER, 6], [_image(33, 21, 5)])]
    assert torch.equal(
        _decode(tiny, p, policy="fixed", steps=16).sequences,
        _decode(loaded, p, policy="fixed", steps=16).sequences,
    )


def test_loader_error_lists_the_expected_layout(tiny, tmp_path):
    from safetensors.torch import save_file

    folder = tiny.save_pretrained(tmp_path / "v")
    sd = {k: v.contiguous() for k, v in tiny.checkpoint_state_dict().items()}
    sd["model.vision_tower.vision_tower.vision_model.head.probe"] = torch.zeros(1, 1, 16)
    del sd["model.image_newline"]
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    msg = str(info.value)
    assert "model.image_newline" in msg and "head.probe" in msg
    assert "derived from the authors' code" in msg
    assert "encoder.layers.{j}" in msg and "for j in 0..1" in msg
    assert "mm_vision_select_layer" in msg


def test_bad_vision_config_is_refused():
    with pytest.raises(ValueError, match="mm_vision_select_layer"):
        LLaDAVModel.spec_from_config(preset_tiny_config(mm_vision_select_layer=-1))
    with pytest.raises(ValueError, match="mm_projector_type"):
        LLaDAVModel.spec_from_config(preset_tiny_config(mm_projector_type="pooler"))


# --------------------------------------------------------------------------------------
# Step 3: parity with the reference
# --------------------------------------------------------------------------------------


def _shim_reference() -> None:
    """Make ``llava`` importable from ``../shared/refs/llada_v`` (modules it imports that
    the copy lacks become stubs; none of them is on the paths the tests run)."""
    if not REF.is_dir():
        pytest.skip(f"reference not found at {REF}")
    if str(REF) not in sys.path:
        sys.path.insert(0, str(REF))

    def stub(name: str, **attrs) -> None:
        if name not in sys.modules:
            m = types.ModuleType(name)
            m.__dict__.update(attrs)
            sys.modules[name] = m

    def noop(*a, **k):
        return None

    class _NoCache:
        def reset_cache(self, *a, **k):
            pass

    class _NoResampler(torch.nn.Module):
        config: ClassVar[dict] = {}

        def forward(self, x, *a, **k):
            return x

    stub(
        "llava.utils",
        rank0_print=noop,
        rank_print=noop,
        process_video_with_pyav=noop,
        process_video_with_decord=noop,
    )
    stub("llava.cache", dLLMCache=_NoCache, dLLMCacheConfig=object)
    stub("llava.model.multimodal_resampler")
    stub(
        "llava.model.multimodal_resampler.builder",
        build_vision_resampler=lambda *a, **k: _NoResampler(),
    )
    stub("llava.model.multimodal_projector.pooler_projector", PoolerProjector=object)
    for n, cls in [
        ("clip_encoder", ("CLIPVisionTower", "CLIPVisionTowerS2")),
        ("imagebind", ("ImageBindWrapper",)),
        ("open_clip_encoder", ("OpenCLIPVisionTower",)),
        ("hf_vision", ("HFVisionTower",)),
    ]:
        stub(f"llava.model.multimodal_encoder.{n}", **dict.fromkeys(cls, object))
    try:
        import transformers.modeling_attn_mask_utils  # noqa: F401
    except ImportError:  # transformers 5; only its CUDA padding path is used

        class AttentionMaskConverter:
            @staticmethod
            def _unmask_unattended(mask, min_dtype):
                return mask

        stub("transformers.modeling_attn_mask_utils", AttentionMaskConverter=AttentionMaskConverter)


def _ref_config(ours: LLaDAVModel, vision: bool):
    from llava.model.language_model.llava_llada import LlavaLLaDAConfig

    c = ours.config
    kw = dict(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"],
        max_position_embeddings=c["max_position_embeddings"],
        rms_norm_eps=c["rms_norm_eps"],
        rope_theta=c["rope_theta"],
        pad_token_id=None,
    )
    if vision:
        kw.update(
            mm_vision_tower="siglip-tiny-random",
            delay_load=True,
            mm_hidden_size=c["mm_hidden_size"],
            mm_projector_type=c["mm_projector_type"],
            mm_patch_merge_type=c["mm_patch_merge_type"],
            image_aspect_ratio=c["image_aspect_ratio"],
            image_grid_pinpoints=c["image_grid_pinpoints"],
        )
    kw.update(
        hidden_act="silu",
        initializer_range=0.02,
        pretraining_tp=1,
        use_cache=False,
        rope_scaling=None,
        attention_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )
    cfg = LlavaLLaDAConfig()
    for key, value in kw.items():  # transformers 5 skips LLaDAConfig.__init__ (a dataclass)
        setattr(cfg, key, value)
    cfg._attn_implementation = "sdpa"
    return cfg


def _reference(ours: LLaDAVModel, vision: bool = True):
    """The authors' ``LlavaLLaDAModelLM`` with our weights (strict: same names)."""
    _shim_reference()
    from llava.model.language_model.llava_llada import LlavaLLaDAModelLM
    from llava.model.multimodal_encoder import siglip_encoder as se

    ref = LlavaLLaDAModelLM(_ref_config(ours, vision)).to(torch.float64)
    sd = ours.checkpoint_state_dict()
    if vision:
        v = ours.options["vision"]
        vcfg = se.SigLipVisionConfig(**{k: v[k] for k in v if k != "num_channels"})
        tower = ref.model.vision_tower
        tower.config = vcfg
        tower.vision_tower = se.SigLipVisionModel(vcfg)
        del tower.vision_tower.vision_model.encoder.layers[-1:]  # as load_model does
        tower.vision_tower.vision_model.head = torch.nn.Identity()
        tower.vision_tower.to(torch.float64)
        tower.is_loaded = True
    else:
        sd = {
            k: t
            for k, t in sd.items()
            if not k.startswith(("model.vision", "model.mm_", "model.image_"))
        }
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if "position_ids" not in k], (
        missing,
        unexpected,
    )
    return ref.eval()


@pytest.fixture(scope="module")
def geo384() -> LLaDAVModel:
    """Tiny widths at the reference's fixed geometry (384-px tiles, 27 × 27 patches: its
    tower asserts 729 patches)."""
    cfg = preset_tiny_config(
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "image_size": 384,
            "patch_size": 14,
        },
        image_grid_pinpoints="(1x1),...,(6x6)",
        image_processor={"size": 384},
    )
    return LLaDAVModel.from_config(cfg, dtype=torch.float64, seed=3)


@pytest.mark.parametrize("size", [(500, 300), (300, 800), (1900, 500), (200, 200)])
def test_image_features_and_merged_prompt_match_reference(geo384, size):
    ref = _reference(geo384)
    from llava.mm_utils import process_images
    from llava.model.multimodal_encoder.siglip_encoder import SigLipImageProcessor

    img = _image(*size, seed=size[0])
    cfg = types.SimpleNamespace(
        image_aspect_ratio=geo384.config["image_aspect_ratio"],
        image_grid_pinpoints=geo384.config["image_grid_pinpoints"],
    )
    pix_ref = process_images([img], SigLipImageProcessor(), cfg)  # (1, n, 3, 384, 384)
    pix = geo384.image_processor.crops(img, geo384.options["pinpoints"])
    torch.testing.assert_close(pix, pix_ref[0].to(pix.dtype), rtol=0, atol=1e-6)
    feats_ref = ref.encode_images(pix_ref[0].to(torch.float64))  # (n, 729, d)
    torch.testing.assert_close(geo384.vision(pix.double()), feats_ref, rtol=1e-5, atol=1e-6)

    ids = [7, 8, IMAGE_PLACEHOLDER, 9, 10, 11]
    pe = geo384.embed_prompt([MultimodalPrompt(ids, [img])])
    _, _, _, _, emb_ref, _ = ref.prepare_inputs_labels_for_multimodal(
        torch.tensor([ids]), None, None, None, None, [pix_ref[0].double()], ["image"], [img.size]
    )
    assert pe.embeds.shape == emb_ref.shape
    torch.testing.assert_close(pe.embeds, emb_ref, rtol=1e-5, atol=1e-6)

    x = torch.cat([pe.ids, torch.full((1, 4), geo384.mask_token_id)], dim=1)
    e_full = torch.cat([emb_ref, ref.model.embed_tokens(x[:, -4:])], dim=1)
    logits_ref = ref.lm_head(ref.model(inputs_embeds=e_full)[0])
    logits = geo384.forward(x, prompt_embeds=pe.embeds)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def fullvocab() -> LLaDAVModel:
    """LLaDA's vocabulary (the reference loops index ids 126080…126347), tiny widths,
    sharpened attention and head so that confidences are spread out (0.3 to 0.98, no
    near-ties that the reference's float32 internals could reorder) and the adaptive rules
    commit several tokens per step; the mask
    token's head row is zeroed (the reference does not exclude it from its argmax, a
    trained LLaDA never predicts it)."""
    cfg = preset_tiny_config(
        vocab_size=126464,
        mask_token_id=MASK,
        eos_token_id=126081,
        pad_token_id=126081,
        suppress_token_ids=None,
    )
    model = LLaDAVModel.from_config(cfg, dtype=torch.float64, seed=7)
    with torch.no_grad():  # sharp, position-dependent attention: no near-tied positions
        for block in model.module.blocks:
            block.attn.q.weight.mul_(20.0)
            block.attn.k.weight.mul_(20.0)
        model.module.head.weight.mul_(60.0)
        model.module.head.weight[MASK] = 0.0
    return model


def _fullvocab_prompt(model) -> torch.Tensor:
    p = MultimodalPrompt([126080, 12, IMAGE_PLACEHOLDER, 13, 14, 15], [_image(45, 30, 9)])
    return p, model.embed_prompt([p]).embeds


@pytest.mark.parametrize("steps,block", [(16, 16), (16, 8), (8, 8)])
def test_generate_with_embeds_fixed_steps_token_for_token(fullvocab, steps, block):
    ref = _reference(fullvocab, vision=False)
    p, embeds = _fullvocab_prompt(fullvocab)
    want = ref.generate_with_embeds(
        embeds, steps=steps, gen_length=16, block_length=block, mask_id=MASK
    )
    got = _decode(
        fullvocab, [p], policy="fixed", steps=steps, block_length=block, cache="none"
    ).responses
    assert torch.equal(got, want)


def _hook_forward(self, input_ids=None, inputs_embeds=None, fast_dllm_cache=None, **_):
    """``LLaDAModel.forward`` as the Fast-dLLM++ hook calls it: the copied
    ``modeling_llada.py`` predates the hook and takes no ``fast_dllm_cache`` (the hook adds
    the cache offset to these positions itself and attends without a mask)."""
    h = inputs_embeds
    pos = torch.arange(h.shape[1]).unsqueeze(0)
    for layer in self.layers:
        h = layer(h, attention_mask=None, position_ids=pos, fast_dllm_cache=fast_dllm_cache)[0]
    return (self.norm(h),)


@pytest.mark.parametrize(
    "hook_args,policy",
    [
        ({"threshold": 0.9}, "factor:factor=0.9"),  # the hook's threshold is the factor rule
        ({"factor": 1.5}, "factor:factor=1.5"),
        ({"frechet_margin": 0.1}, "frechet:margin=0.1"),
        ({"frechet_margin": 0.0}, "frechet:margin=0.0"),
        ({}, "fixed"),
    ],
)
@pytest.mark.parametrize("refresh", [32, 2])
def test_fast_dllm_hook_prefix_cache_token_for_token(fullvocab, hook_args, policy, refresh):
    _shim_reference()
    from llava.hooks.fast_dllm_hook import FastDLLMGenerationHook

    ref = _reference(fullvocab, vision=False)
    ref.model.forward = types.MethodType(_hook_forward, ref.model)
    hook = FastDLLMGenerationHook(ref)
    hook.register_hooks()
    p, embeds = _fullvocab_prompt(fullvocab)
    want = hook._fast_generate_with_embeds(
        embeds,
        steps=16,
        gen_length=16,
        block_length=8,
        mask_id=MASK,
        prefix_refresh_interval=refresh,
        **hook_args,
    )
    out = _decode(
        fullvocab,
        [p],
        policy=policy,
        steps=16,
        cache="prefix",
        cache_args={"refresh_every": refresh},
    )
    assert torch.equal(out.responses, want)
    if hook_args:
        assert out.nfe < 16  # the adaptive rules committed several tokens in some step


def test_fast_decoder_and_traces_take_image_prompts(tiny):
    from dlm_decode.fast import FastDecoder

    img = _image(50, 30, 0)
    p = [MultimodalPrompt([5, 6, IMAGE_PLACEHOLDER, 7, 8], [img])]
    kw = {"policy": "fixed", "steps": 16, "gen_length": 16, "block_length": 8}
    ref = _decode(tiny, p, **kw, cache="prefix", trace=True)
    fast = FastDecoder(tiny, cache="prefix", early_stop=False, **kw)
    assert torch.equal(fast.generate(p).sequences, ref.sequences)
    assert torch.equal(
        fast.generate([[5, 6, 7]]).responses,
        _decode(tiny, [[5, 6, 7]], **kw, cache="prefix").responses,
    )
    assert torch.equal(fast.generate(p).sequences, ref.sequences)  # image after text
    assert len(ref.trace) == ref.nfe


@pytest.mark.parametrize("policy", ["threshold", "factor", "frechet"])
def test_every_registered_cache_decodes_an_image_prompt(tiny, policy):
    """Every cache × the three rules on a batch of image prompts: each decode finishes (no
    mask left), batched rows equal each prompt alone, and a cache that declares itself
    exact commits what ``none`` does. The hook parity tests above cover the one cache the
    authors' hook has (prefix, refreshed every k steps)."""
    from dlm_decode.registry import get_registry

    prompts = [
        MultimodalPrompt([5, 6, IMAGE_PLACEHOLDER, 7, 8], [_image(50, 30, 0)]),
        MultimodalPrompt([9, IMAGE_PLACEHOLDER, 3], [_image(20, 44, 1)]),
    ]
    base = _decode(tiny, prompts, policy=policy, cache="none")
    names = get_registry().names("cache")
    assert {"none", "prefix", "dual", "block", "vicinity", "dkv", "drift"} <= set(names)
    for name in names:
        out = _decode(tiny, prompts, policy=policy, cache=name)
        assert not (out.responses == tiny.mask_token_id).any(), name
        alone = _decode(tiny, prompts[1:], policy=policy, cache=name)
        assert torch.equal(out.responses[1], alone.responses[0]), name
        if dlm_decode.get_cache(name).exact:  # an instance: prefix/dual decide by refresh_every
            assert torch.equal(out.sequences, base.sequences), name
