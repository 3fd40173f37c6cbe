"""Train the shipped tiny dLLM on the synthetic task suite (masked-diffusion SFT objective).

The model is the native LLaDA architecture (``dlm_decode.models.llada.LLaDAModel``) at tiny
dimensions, with the character-level tokenizer of ``dlm_decode.tasks.synthetic``.

Objective (LLaDA SFT): each training row is ``[left padding | prompt | answer + EOS
padding]`` with a fixed answer region of ``gen_length`` slots. Per row draw
``t ~ U(0, 1)`` (stratified over the batch, clamped to ``[eps, 1]``), mask every answer slot
(EOS padding included, never the prompt) with probability ``t``, and minimise the
cross-entropy of the masked slots weighted by ``1 / t``, summed and divided by the number of
answer slots (``B · gen_length``).

Usage::

    python experiments/tiny/train.py --steps 5000 --max-minutes 45

Writes ``config.json``, ``model.safetensors``, the tokenizer files and ``training_log.json``
to ``--out`` (default ``dlm_decode/assets/tiny``), and intermediate checkpoints to
``--run-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

import dlm_decode
from dlm_decode.models.llada import LLaDAModel
from dlm_decode.tasks.synthetic import (
    SPECIAL_TOKENS,
    build_tokenizer,
    heldout_problems,
    score_completion,
    train_stream,
)

ROOT = Path(__file__).resolve().parents[2]
PAD, BOS, EOS, MASK = range(len(SPECIAL_TOKENS))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--eps", type=float, default=0.05, help="lower clamp of the mask rate t")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=384)
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--prompt-length", type=int, default=40, help="fixed left-padded width")
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--eval-n", type=int, default=40)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-minutes", type=float, default=45.0, help="stop (and save) after this")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--init", type=Path, default=None, help="continue from this checkpoint folder")
    p.add_argument("--time-schedule", action="store_true", help="decay the LR by wall time too")
    p.add_argument("--out", type=Path, default=ROOT / "dlm_decode" / "assets" / "tiny")
    p.add_argument(
        "--run-dir", type=Path, default=ROOT / "experiments" / "tiny" / "runs" / "latest"
    )
    return p.parse_args(argv)


def model_config(args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """The ``config.json`` of the tiny model (LLaDA's OLMo-style keys)."""
    return {
        "model_type": "llada",
        "architectures": ["LLaDAModelLM"],
        "d_model": args.d_model,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_heads,
        "n_layers": args.n_layers,
        "mlp_hidden_size": args.mlp,
        "vocab_size": vocab,
        "embedding_size": vocab,
        "max_sequence_length": 256,
        "mask_token_id": MASK,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "bos_token_id": BOS,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "weight_tying": False,
        "include_qkv_bias": False,
        "block_type": "llama",
        "layer_norm_type": "rms",
        "activation_type": "silu",
        "rope": True,
        "rope_full_precision": True,
        "torch_dtype": "float32",
    }


class Batcher:
    """Turns the training stream into fixed-shape ``(B, P + G)`` id tensors.

    Args:
        tokenizer: the character tokenizer.
        seed: seed of the problem stream.
        batch: rows per batch.
        prompt_length: fixed (left-padded) prompt width ``P``.
        gen_length: answer slots ``G`` (answer, then EOS padding).
    """

    def __init__(
        self, tokenizer: Any, seed: int, batch: int, prompt_length: int, gen_length: int
    ) -> None:
        self.tok = tokenizer
        self.stream = train_stream(seed)
        self.batch, self.p, self.g = batch, prompt_length, gen_length

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids`` ``(B, P + G)`` long and the key mask ``(B, P + G)`` bool."""
        probs = [next(self.stream) for _ in range(self.batch)]
        prompts = self.tok([q.prompt for q in probs], add_special_tokens=False)["input_ids"]
        answers = self.tok([q.answer for q in probs], add_special_tokens=False)["input_ids"]
        ids = torch.full((self.batch, self.p + self.g), PAD, dtype=torch.long)
        am = torch.ones((self.batch, self.p + self.g), dtype=torch.bool)
        for i, (pr, an) in enumerate(zip(prompts, answers, strict=True)):
            if len(pr) > self.p or len(an) >= self.g:
                raise ValueError(f"problem too long for the layout: {probs[i]}")
            ids[i, self.p - len(pr) : self.p] = torch.tensor(pr)
            am[i, : self.p - len(pr)] = False
            ids[i, self.p : self.p + len(an)] = torch.tensor(an)
            ids[i, self.p + len(an) :] = EOS
        return ids, am


def lr_at(step: int, args: argparse.Namespace, minutes: float = 0.0) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio · lr``.

    With ``--time-schedule`` the decay's progress is the larger of the step fraction and the
    fraction of ``--max-minutes`` spent, so the schedule ends on time on a slow machine (at
    the cost of bitwise reproducibility across machines).
    """
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    if args.time_schedule:
        frac = max(frac, minutes / args.max_minutes)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cos)


def evaluate(
    model: LLaDAModel,
    tokenizer: Any,
    n: int,
    gen_length: int,
    block_length: int,
    policy: str = "fixed",
    policy_args: dict[str, Any] | None = None,
    cache: str = "none",
    batch: int = 64,
) -> dict[str, Any]:
    """Exact match on the first ``n`` held-out problems with :func:`dlm_decode.generate`.

    Returns:
        ``{"overall": acc, "per_family": {...}, "nfe": mean batch NFE, "nfe_row": mean
        per-row NFE}``.
    """
    probs = heldout_problems()[:n]
    hits: dict[str, list[bool]] = defaultdict(list)
    nfes, nfe_rows = [], []
    for i in range(0, len(probs), batch):
        chunk = probs[i : i + batch]
        prompts = tokenizer([q.prompt for q in chunk], add_special_tokens=False)["input_ids"]
        res = dlm_decode.generate(
            model,
            prompts,
            policy=policy,
            policy_args=policy_args,
            cache=cache,
            gen_length=gen_length,
            block_length=block_length,
            steps=gen_length if policy == "fixed" else None,
        )
        for q, text in zip(chunk, res.texts(tokenizer), strict=True):
            hits[q.family].append(score_completion(q.answer, text)[0])
        nfes.append(res.nfe)
        nfe_rows.extend(res.nfe_per_row.tolist())
    allhits = [h for v in hits.values() for h in v]
    return {
        "overall": sum(allhits) / len(allhits),
        "per_family": {k: sum(v) / len(v) for k, v in hits.items()},
        "nfe": sum(nfes) / len(nfes),
        "nfe_row": sum(nfe_rows) / len(nfe_rows),
    }


def save_checkpoint(
    model: LLaDAModel, config: dict[str, Any], tokenizer: Any, folder: Path
) -> None:
    """Write ``config.json`` + ``model.safetensors`` (HF LLaDA names) + tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    sd = {k: v.detach().contiguous().clone() for k, v in model.checkpoint_state_dict().items()}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer(folder)
    del tokenizer


def main(argv: list[str] | None = None) -> None:
    """Train, evaluate periodically, save the packaged checkpoint."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    config = model_config(args, len(tokenizer))
    if args.init is not None:
        model = LLaDAModel.from_pretrained(str(args.init), dtype=torch.float32)
    else:
        model = LLaDAModel.from_config(config, seed=args.seed, dtype=torch.float32)
    model.tokenizer = tokenizer
    module = model.module
    module.requires_grad_(True).train()
    n_params = sum(p.numel() for p in module.parameters())
    print(f"tiny LLaDA: {n_params / 1e6:.2f} M parameters; config {config}", flush=True)

    decay = [p for n, p in module.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in module.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    batcher = Batcher(tokenizer, args.seed + 1, args.batch, args.prompt_length, args.gen_length)
    gen = torch.Generator().manual_seed(args.seed + 2)
    p, g, bsz = args.prompt_length, args.gen_length, args.batch
    positions_base = torch.arange(p + g)

    def loss_fn(
        noisy: torch.Tensor,
        target: torch.Tensor,
        am: torch.Tensor,
        pos: torch.Tensor,
        weight: torch.Tensor,
    ) -> torch.Tensor:
        logits = module(noisy, attention_mask=am, position_ids=pos, logits_rows=(p, p + g))
        ce = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
        ).view(bsz, g)
        return (ce * weight).sum() / (bsz * g)

    step_fn = loss_fn if args.no_compile else torch.compile(loss_fn)

    log: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "params": n_params,
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {args.threads} threads (shared CPU)",
        "evals": [],
        "losses": [],
    }
    t0 = time.time()
    ema = None
    bar = tqdm(range(args.steps), desc="train", mininterval=5.0, file=sys.stdout)
    step = 0
    for step in bar:
        lr = lr_at(step, args, (time.time() - t0) / 60)
        for group in opt.param_groups:
            group["lr"] = lr
        ids, am = batcher.next()
        pos = (am.long().cumsum(-1) - 1).clamp(min=0)
        u = (torch.rand((), generator=gen) + torch.arange(bsz) / bsz) % 1.0  # stratified
        t = args.eps + (1 - args.eps) * u  # (B,)
        ans = ids[:, p:]
        masked = torch.rand((bsz, g), generator=gen) < t[:, None]  # (B, G)
        noisy = ids.clone()
        noisy[:, p:] = torch.where(masked, MASK, ans)
        weight = masked.float() / t[:, None]
        loss = step_fn(noisy, ans, am, pos, weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        lv = float(loss.detach())
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr:.2e}")
        if step % 50 == 0:
            log["losses"].append((step, round(ema, 5), round(time.time() - t0, 1)))
        elapsed = (time.time() - t0) / 60
        last = step == args.steps - 1 or elapsed > args.max_minutes
        if (step + 1) % args.eval_every == 0 or last:
            save_checkpoint(model, config, tokenizer, args.run_dir)
            try:
                res = evaluate(model, tokenizer, args.eval_n, g, args.block_length)
            except Exception as exc:  # a broken plugin must not kill the run
                tqdm.write(f"[eval step {step + 1}] failed: {exc!r}")
                res = {"error": repr(exc)}
            res.update(step=step + 1, minutes=round(elapsed, 2), loss=round(ema, 5))
            log["evals"].append(res)
            if "overall" in res:
                fam = " ".join(f"{k}={v:.2f}" for k, v in res["per_family"].items())
                tqdm.write(
                    f"[eval step {step + 1} {elapsed:.1f} min] fixed exact match "
                    f"{res['overall']:.3f} ({fam})"
                )
            (args.run_dir / "training_log.json").write_text(json.dumps(log, indent=1))
        if last:
            break
    del positions_base
    log["steps_done"] = step + 1
    log["train_minutes"] = round((time.time() - t0) / 60, 2)
    save_checkpoint(model, config, tokenizer, args.out)
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"saved {args.out} after {log['steps_done']} steps, {log['train_minutes']} min")


if __name__ == "__main__":
    main()
