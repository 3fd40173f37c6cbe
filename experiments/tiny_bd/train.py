"""Train ``tiny-bd``: a tiny block-diffusion model (SDAR layout) on the synthetic suite.

The model is the native SDAR architecture (``dlm_decode.models.sdar.SDARModel``: Qwen3-style
blocks with per-head q/k RMSNorm and block-causal attention) at the tiny model's sizes, with
the character-level tokenizer of ``dlm_decode.tasks.synthetic``.

Objective (block diffusion, as SDAR's and Fast-dLLM v2's training describe it): a row
``x_0 = [left padding | prompt | answer + EOS padding]`` is cut into attention blocks of
``--block-size`` buffer slots. Each block of each row draws its own mask rate
``t ~ U(0, 1)`` (``p = eps + (1 − eps) t``) and each answer slot of the block is masked with
probability ``p``, giving ``x_t`` (the prompt is never masked). The model reads the
concatenation ``[x_t | x_0]`` under one mask (:func:`block_diffusion_mask`): a noisy block
sees itself (bidirectionally) and the *clean* blocks before it; a clean block sees the clean
blocks up to itself. So every block is denoised in one forward, conditioned exactly as it is
at decode time, on the finished blocks before it. Both halves take the same RoPE positions.
The loss is the mean cross-entropy over the masked slots. With ``--complementary`` every
row is also trained with the complement of its mask (the slots left clean are masked), as
Fast-dLLM v2's training does, so each answer slot is supervised once per step.

The block grid is aligned to buffer slots, as the Decoder aligns it, and a batch's buffer
starts at its longest prompt's left padding: so each batch is shifted by a random
``0 … block_size − 1`` extra padding slots, and the model sees every alignment of prompt
and grid that a batched decode can give it.

The model is initialised from the shipped tiny LLaDA model (``--init-llada``, same sizes:
every weight is copied and the q/k norm weights, which LLaDA does not have, are set to the
per-channel root-mean-square of the queries and keys on a training batch, so the first
forward is close to the LLaDA model's scale), then trained as above. The loop, pool,
schedule, validation and checkpoint selection are the tiny model's (``train_loop`` in
``experiments/tiny/train.py``).

Usage::

    python experiments/tiny_bd/train.py --max-minutes 40 --out dlm_decode/assets/tiny_bd
    python experiments/tiny_bd/train.py --init RUN_DIR ...   # continue a tiny-bd checkpoint
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

import dlm_decode
from dlm_decode.models.sdar import SDAR_BLOCK_CONFIG, SDARModel
from dlm_decode.models.transformer import rope_cos_sin
from dlm_decode.tasks.synthetic import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def _tiny_train() -> ModuleType:
    """``experiments/tiny/train.py`` (the shared training loop and data layout)."""
    name = "tiny_train"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments/tiny/train.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


tiny = _tiny_train()
PAD, BOS, EOS, MASK = tiny.PAD, tiny.BOS, tiny.EOS, tiny.MASK


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The tiny model's options, with this recipe's defaults and its own."""
    args, rest = _own_args(argv)
    base = tiny.parse_args(
        [
            "--out",
            str(ROOT / "dlm_decode" / "assets" / "tiny_bd"),
            "--run-dir",
            str(ROOT / "experiments" / "tiny_bd" / "runs" / "latest"),
            "--eval-cache",
            "block",
            "--block-length",
            "16",
            "--lr",
            "5e-4",
            "--warmup",
            "100",
            "--eps",
            "0.001",
            *rest,
        ]
    )
    for k, v in vars(args).items():
        setattr(base, k, v)
    return base


def _own_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    p.add_argument("--block-size", type=int, default=16, help="attention block of the model")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: heads)")
    p.add_argument(
        "--init-llada",
        type=Path,
        default=ROOT / "dlm_decode" / "assets" / "tiny",
        help="LLaDA checkpoint of the same sizes to start from ('' for random weights)",
    )
    p.add_argument(
        "--complementary", action="store_true", help="also train on each mask's complement"
    )
    return p.parse_known_args(argv)


def model_config(args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """The ``config.json`` of ``tiny-bd`` (SDAR's Qwen3-style keys)."""
    return {
        "model_type": "sdar",
        "architectures": ["SDARForCausalLM"],
        "hidden_size": args.d_model,
        "intermediate_size": args.mlp,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads or args.n_heads,
        "head_dim": args.d_model // args.n_heads,
        "num_hidden_layers": args.n_layers,
        "vocab_size": vocab,
        "max_position_embeddings": 256,
        "block_size": args.block_size,
        "mask_token_id": MASK,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        **SDAR_BLOCK_CONFIG,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float32",
    }


def block_diffusion_mask(am: torch.Tensor, block_size: int) -> torch.Tensor:
    """The attention mask of ``[x_t | x_0]`` rows (true = attend).

    Slot ``i`` of either half lies in block ``i // block_size``. A noisy query attends to
    the noisy keys of its own block and to the clean keys of earlier blocks; a clean query
    attends to the clean keys of its block and earlier ones; never to padding; every query
    to itself (so a padding row is not empty).

    Args:
        am: ``(B, T)`` bool, true at real (non-padding) slots of ``x_0``.
        block_size: slots per attention block.

    Returns:
        ``(B, 1, 2T, 2T)`` bool.
    """
    t = am.shape[1]
    dev = am.device
    idx = torch.arange(2 * t, device=dev)  # (2T,)
    blk, clean = (idx % t) // block_size, idx >= t  # (2T,) each
    bq, bk = blk[:, None], blk[None, :]  # (2T, 1), (1, 2T)
    cq, ck = clean[:, None], clean[None, :]
    noisy_rows = ~cq & ((~ck & (bk == bq)) | (ck & (bk < bq)))
    clean_rows = cq & ck & (bk <= bq)
    allowed = (noisy_rows | clean_rows)[None, None]  # (1, 1, 2T, 2T)
    keys = torch.cat([am, am], dim=1)[:, None, None, :]  # (B, 1, 1, 2T)
    return (allowed & keys) | torch.eye(2 * t, dtype=torch.bool, device=dev)


def forward_bd(
    module: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Logits of the noisy half of ``[x_t | x_0]`` rows under ``mask``.

    Args:
        module: the SDAR ``Transformer``.
        ids: ``(B, 2T)`` ids.
        pos: ``(B, 2T)`` RoPE positions.
        mask: ``(B, 1, 2T, 2T)`` from :func:`block_diffusion_mask`.

    Returns:
        ``(B, T, V)`` float logits.
    """
    spec = module.spec
    x = module.embed(ids)  # (B, 2T, d)
    cos, sin = rope_cos_sin(pos, spec.head_dim, spec.rope_theta, x.dtype)
    for i, block in enumerate(module.blocks):
        x = block(x, cos, sin, mask, None, i, 0)  # (B, 2T, d)
    x = module.norm(x[:, : ids.shape[1] // 2])  # (B, T, d)
    return F.linear(x, module.head.weight).float()  # (B, T, V)


def bd_loss(module: torch.nn.Module, args: argparse.Namespace) -> Any:
    """The block-diffusion loss of a batch: ``loss(ids, t, gen)`` for ``(B, P + G)`` rows
    (``t`` is unused: every block draws its own rate)."""
    m, p = args.block_size, args.prompt_length

    def loss_fn(ids: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        am = ids != PAD  # (B, T) left padding is the only PAD
        pos = (am.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        noisy = torch.where(masked, MASK, ids)  # (B, T)
        both = torch.cat([noisy, ids], dim=1)  # (B, 2T)
        logits = forward_bd(module, both, torch.cat([pos, pos], 1), block_diffusion_mask(am, m))
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="none"
        )
        w = masked.reshape(-1).float()
        return (ce * w).sum() / w.sum().clamp(min=1)

    compiled = tiny.compile_or_eager(loss_fn, args)

    def step(ids: torch.Tensor, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        dev = ids.device
        shift = int(torch.randint(m, (), generator=gen, device=dev))
        tail = -(-(shift + ids.shape[1]) // m) * m - shift - ids.shape[1]  # EOS to the grid
        b = ids.shape[0]
        ids = torch.cat(
            [
                torch.full((b, shift), PAD, dtype=ids.dtype, device=dev),
                ids,
                torch.full((b, tail), EOS, dtype=ids.dtype, device=dev),
            ],
            dim=1,
        )  # (B, T), T a multiple of m
        t_len = ids.shape[1]
        answer = torch.arange(t_len, device=dev) >= shift + p  # (T,)
        rate = torch.rand((b, t_len // m), generator=gen, device=dev)  # (B, T/m)
        rate = (args.eps + (1 - args.eps) * rate).repeat_interleave(m, dim=1)  # (B, T)
        draw = torch.rand((b, t_len), generator=gen, device=dev) < rate
        masked = draw & answer
        if args.complementary:
            ids = torch.cat([ids, ids])
            masked = torch.cat([masked, ~draw & answer])
        return compiled(ids, masked)

    return step


@torch.no_grad()
def init_from_llada(model: SDARModel, folder: Path, probe: torch.Tensor) -> dict[str, Any]:
    """Copy a same-sized LLaDA checkpoint's weights into ``model`` and set the q/k norms.

    The q/k norm weights (size ``head_dim``, shared by the heads, as in Qwen3) become the
    root-mean-square of each query / key channel over the real tokens of ``probe`` under
    the LLaDA model, so that normalising restores each channel's typical scale.

    Args:
        model: the SDAR model (same d_model, heads, layers, MLP and vocabulary).
        folder: the LLaDA checkpoint folder.
        probe: ``(B, S)`` training rows (left-padded).

    Returns:
        What was done, for the training log.
    """
    llada = dlm_decode.load_model(folder, dtype=torch.float32)
    src = llada.module.state_dict()
    missing, unexpected = model.module.load_state_dict(src, strict=False)
    if unexpected or any(not k.endswith(("q_norm.weight", "k_norm.weight")) for k in missing):
        raise SystemExit(
            f"--init-llada {folder}: sizes or names differ (missing {missing}, unexpected "
            f"{unexpected}); pass a LLaDA checkpoint of the same sizes or --init-llada ''"
        )
    spec = model.module.spec
    hd = spec.head_dim
    stats: dict[str, torch.Tensor] = {}
    am = probe != PAD
    hooks = []
    for i, blk in enumerate(llada.module.blocks):
        for name in ("q", "k"):

            def grab(mod: Any, inp: Any, out: torch.Tensor, key: str = f"{i}.{name}") -> None:
                heads = out[am].reshape(-1, hd)  # (N·H, hd) real tokens, every head
                stats[key] = heads.pow(2).mean(0).sqrt()

            hooks.append(getattr(blk.attn, name).register_forward_hook(grab))
    pos = (am.long().cumsum(-1) - 1).clamp(min=0)
    llada.module(probe, attention_mask=am, position_ids=pos)
    for h in hooks:
        h.remove()
    for i, blk in enumerate(model.module.blocks):
        blk.attn.q_norm.weight.copy_(stats[f"{i}.q"])
        blk.attn.k_norm.weight.copy_(stats[f"{i}.k"])
    return {
        "init": str(folder),
        "qk_norm_init_mean": {k: round(float(v.mean()), 4) for k, v in stats.items()},
    }


def main(argv: list[str] | None = None) -> None:
    """Build (or initialise) ``tiny-bd``, train it, save the best checkpoint to ``--out``."""
    args = parse_args(argv)
    device = tiny.setup(args)
    tokenizer = build_tokenizer()
    extra: dict[str, Any] = {"objective": "block diffusion", "block_size": args.block_size}
    if args.init is not None:  # continue an earlier tiny-bd run
        config = json.loads((args.init / "config.json").read_text())
        model = SDARModel.from_pretrained(str(args.init), dtype=torch.float32, device=device)
        extra.update(init=str(args.init), block_size=config["block_size"])
    else:
        config = model_config(args, len(tokenizer))
        model = SDARModel.from_config(config, seed=args.seed, dtype=torch.float32, device=device)
    model.tokenizer = tokenizer
    if args.init is None and str(args.init_llada) not in ("", "."):
        probe = tiny.build_pool(256, args.seed + 11, args.prompt_length, args.gen_length)
        extra.update(init_from_llada(model, args.init_llada, probe.long().to(device)))
    print(json.dumps({k: v for k, v in extra.items() if k != "qk_norm_init_mean"}), flush=True)
    tiny.train_loop(args, model, config, bd_loss(model.module, args), extra)


if __name__ == "__main__":
    main()
