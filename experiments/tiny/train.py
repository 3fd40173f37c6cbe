"""Train the shipped tiny dLLM on the synthetic task suite (masked-diffusion SFT objective).

The model is the native LLaDA architecture (``dlm_decode.models.llada.LLaDAModel``) at tiny
dimensions, with the character-level tokenizer of ``dlm_decode.tasks.synthetic``.

Objective (LLaDA SFT): each training row is ``[left padding | prompt | answer + EOS
padding]`` with a fixed answer region of ``gen_length`` slots. Per row draw
``t ~ U(0, 1)`` (stratified over the batch, clamped to ``[eps, 1]``), mask every answer slot
(EOS padding included, never the prompt) with probability ``t``, and minimise the
cross-entropy of the masked slots weighted by ``1 / t``, summed and divided by the number of
answer slots (``B · gen_length``). With ``--block-frac F`` a share ``F`` of the rows is
masked like a state of a block decode instead (:func:`block_masks`).

Usage::

    python experiments/tiny/train.py --steps 5000 --max-minutes 45          # CPU
    python experiments/tiny/train.py --device cuda --batch 512 --steps 20000  # a GPU

Training rows come from a pool of ``--pool`` problems generated up front by ``--workers``
processes (each chunk of the pool has its own seed, so the pool does not depend on the
number of workers) and are visited in a seeded random order, epoch after epoch.
Every ``--eval-every`` steps the model decodes the validation split
(:func:`dlm_decode.tasks.synthetic.validation_problems`, disjoint from training and from
the held-out set) one token per step; the checkpoint with the best validation exact match
is the one written to ``--out``.

Writes ``config.json``, ``model.safetensors``, the tokenizer files and ``training_log.json``
to ``--out`` (default ``dlm_decode/assets/tiny``), and intermediate checkpoints to
``--run-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

import dlm_decode
from dlm_decode.models.llada import LLADA_BLOCK_CONFIG, LLaDAModel
from dlm_decode.models.native import NativeModel
from dlm_decode.tasks.synthetic import (
    ALPHABET,
    SPECIAL_TOKENS,
    Problem,
    build_tokenizer,
    score_problem,
    train_stream,
    validation_problems,
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
    p.add_argument(
        "--block-frac",
        type=float,
        default=0.0,
        help="share of rows masked like a semi-autoregressive block decode (see block_masks)",
    )
    p.add_argument("--d-model", type=int, default=192)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--n-heads", type=int, default=6)
    p.add_argument("--mlp", type=int, default=512)
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--prompt-length", type=int, default=40, help="fixed left-padded width")
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--eval-cache", default="none", help="cache of the validation decodes")
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--pool", type=int, default=200_000, help="training problems generated")
    p.add_argument("--workers", type=int, default=1, help="processes generating the pool")
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
        **LLADA_BLOCK_CONFIG,
        "torch_dtype": "float32",
    }


#: Character code -> token id of the tiny tokenizer (ids 4.. follow :data:`ALPHABET`).
_CHAR_IDS = np.zeros(128, dtype=np.uint8)
for _i, _ch in enumerate(ALPHABET):
    _CHAR_IDS[ord(_ch)] = len(SPECIAL_TOKENS) + _i


def encode_rows(problems: Sequence[Problem], prompt_length: int, gen_length: int) -> np.ndarray:
    """Lay problems out as training rows ``[PAD… | prompt | answer | EOS…]``.

    The ids are those of :func:`dlm_decode.tasks.synthetic.build_tokenizer` (one token per
    character), computed by table lookup instead of the tokenizer for speed.

    Args:
        problems: the problems.
        prompt_length: fixed, left-padded prompt width ``P``.
        gen_length: answer slots ``G`` (the answer, then EOS up to ``G``).

    Returns:
        ``(N, P + G)`` ``uint8`` ids.

    Raises:
        ValueError: a prompt longer than ``P`` or an answer that leaves no EOS slot.
    """
    rows = np.full((len(problems), prompt_length + gen_length), PAD, dtype=np.uint8)
    for i, q in enumerate(problems):
        pr = _CHAR_IDS[np.frombuffer(q.prompt.encode("ascii"), dtype=np.uint8)]
        an = _CHAR_IDS[np.frombuffer(q.answer.encode("ascii"), dtype=np.uint8)]
        if len(pr) > prompt_length or len(an) >= gen_length:
            raise ValueError(
                f"problem too long for the layout (prompt {len(pr)} > {prompt_length} or "
                f"answer {len(an)} >= {gen_length}): {q}"
            )
        rows[i, prompt_length - len(pr) : prompt_length] = pr
        rows[i, prompt_length : prompt_length + len(an)] = an
        rows[i, prompt_length + len(an) :] = EOS
    return rows


_CHUNK = 25_000


def _pool_chunk(job: tuple[int, int, int, int, int]) -> np.ndarray:
    """Worker: chunk ``index`` of the pool of ``seed`` (its own stream, so order-free)."""
    seed, index, n, prompt_length, gen_length = job
    stream = train_stream(seed * 1_000_003 + index)
    return encode_rows([next(stream) for _ in range(n)], prompt_length, gen_length)


def build_pool(
    size: int, seed: int, prompt_length: int, gen_length: int, workers: int = 1
) -> torch.Tensor:
    """Generate ``size`` training rows (see :func:`encode_rows`) in seeded chunks.

    Args:
        size: number of problems.
        seed: seed of the pool (chunk ``i`` draws from ``train_stream(seed · 1000003 + i)``).
        prompt_length: prompt width ``P``.
        gen_length: answer slots ``G``.
        workers: processes to generate with (the result does not depend on it).

    Returns:
        ``(size, P + G)`` ``uint8`` CPU tensor.
    """
    jobs = [
        (seed, i, min(_CHUNK, size - i * _CHUNK), prompt_length, gen_length)
        for i in range(math.ceil(size / _CHUNK))
    ]
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            parts = list(tqdm(pool.imap(_pool_chunk, jobs), total=len(jobs), desc="pool"))
    else:
        parts = [_pool_chunk(j) for j in tqdm(jobs, desc="pool")]
    return torch.from_numpy(np.concatenate(parts))


def batches(pool: torch.Tensor, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless ``(B, P + G)`` long batches of ``pool`` rows in seeded per-epoch orders."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(pool.shape[0], generator=gen).to(pool.device)
        for i in range(0, pool.shape[0] - batch + 1, batch):
            yield pool[order[i : i + batch]].long()


def block_masks(
    t: torch.Tensor, gen_length: int, block_frac: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which answer slots to mask, and the loss weight of each.

    A row is masked uniformly (each slot with probability ``t``, weight ``1 / t``, the
    LLaDA objective) or, with probability ``block_frac``, like a state of a
    semi-autoregressive block decode. Such a row gets a block length ``L ∈ {16, 32}`` and a
    block ``k``. Slots before the block are clean, slots inside it are masked with
    probability ``t`` (weight ``1 / t``) and slots after it are all masked (weight 1).
    Uniform masking almost never shows the model a decoded prefix followed by a fully
    masked tail, yet block decoding visits exactly those states.

    Args:
        t: ``(B,)`` mask rates in ``(0, 1]``.
        gen_length: answer slots ``G`` (a multiple of 32).
        block_frac: share of block-structured rows.
        gen: random generator (on ``t``'s device).

    Returns:
        ``masked`` ``(B, G)`` bool and ``weight`` ``(B, G)`` float (0 where not masked).
    """
    bsz, dev = t.shape[0], t.device
    uniform = torch.rand((bsz, gen_length), generator=gen, device=dev) < t[:, None]  # (B, G)
    weight = uniform.float() / t[:, None]
    if block_frac <= 0:
        return uniform, weight
    rows = torch.rand(bsz, generator=gen, device=dev) < block_frac  # (B,)
    length = torch.where(torch.rand(bsz, generator=gen, device=dev) < 0.5, 16, 32)  # (B,)
    k = (torch.rand(bsz, generator=gen, device=dev) * (gen_length // length)).long()  # (B,)
    start, end = (k * length)[:, None], ((k + 1) * length)[:, None]  # (B, 1)
    slot = torch.arange(gen_length, device=dev)  # (G,)
    inside, after = (slot >= start) & (slot < end), slot >= end  # (B, G)
    block = (inside & uniform) | after
    masked = torch.where(rows[:, None], block, uniform)
    bweight = torch.where(after, 1.0, 1.0 / t[:, None]) * block
    return masked, torch.where(rows[:, None], bweight, weight)


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
    model: NativeModel,
    tokenizer: Any,
    n: int,
    gen_length: int,
    block_length: int,
    policy: str = "fixed",
    policy_args: dict[str, Any] | None = None,
    cache: str = "none",
    batch: int = 64,
) -> dict[str, Any]:
    """Exact match on the first ``n`` validation problems with :func:`dlm_decode.generate`.

    Returns:
        ``{"overall": acc, "per_family": {...}, "nfe": mean batch NFE, "nfe_row": mean
        per-row NFE}``.
    """
    probs = validation_problems()[:n]
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
            hits[q.family].append(score_problem(q.family, q.prompt, q.answer, text)[0])
        nfes.append(res.nfe)
        nfe_rows.extend(res.nfe_per_row.tolist())
    allhits = [h for v in hits.values() for h in v]
    return {
        "overall": sum(allhits) / len(allhits),
        "per_family": {k: sum(v) / len(v) for k, v in hits.items()},
        "nfe": sum(nfes) / len(nfes),
        "nfe_row": sum(nfe_rows) / len(nfe_rows),
    }


def save_checkpoint(model: NativeModel, config: dict[str, Any], folder: Path) -> None:
    """Write ``config.json`` + ``model.safetensors`` (the family's HF names) + tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    sd = {
        k: v.detach().cpu().contiguous().clone() for k, v in model.checkpoint_state_dict().items()
    }
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer(folder)


#: ``loss(ids, t, gen)``: the loss of a ``(B, P + G)`` batch at ``(B,)`` mask rates.
LossStep = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def llada_loss(module: torch.nn.Module, args: argparse.Namespace) -> LossStep:
    """The LLaDA SFT loss of a batch: ``loss(ids, t)`` for ``(B, P + G)`` rows and ``(B,)``
    mask rates (the objective in the module docstring, :func:`block_masks` included)."""
    p, g, bsz = args.prompt_length, args.gen_length, args.batch

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

    compiled = compile_or_eager(loss_fn, args)

    def step(ids: torch.Tensor, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        am = ids != PAD  # left padding is the only PAD
        pos = (am.long().cumsum(-1) - 1).clamp(min=0)
        ans = ids[:, p:]
        masked, weight = block_masks(t, g, args.block_frac, gen)  # (B, G) each
        noisy = ids.clone()
        noisy[:, p:] = torch.where(masked, MASK, ans)
        return compiled(noisy, ans, am, pos, weight)

    return step


def compile_or_eager(fn: Callable[..., torch.Tensor], args: argparse.Namespace):
    """``fn`` under ``torch.compile`` (unless ``--no-compile``), falling back to eager the
    first time compilation fails (a machine without a working compiler)."""
    if args.no_compile:
        return fn
    compiled = torch.compile(fn)
    state = {"fn": compiled}

    def call(*a: Any) -> torch.Tensor:
        try:
            return state["fn"](*a)
        except Exception as exc:
            if state["fn"] is fn:
                raise
            tqdm.write(f"torch.compile failed ({exc!r:.200}); continuing without it")
            state["fn"] = fn
            return fn(*a)

    return call


def setup(args: argparse.Namespace) -> torch.device:
    """Threads, seed and device (TF32 matmuls on a GPU)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here; use --device cpu")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def train_loop(
    args: argparse.Namespace,
    model: Any,
    config: dict[str, Any],
    loss_step: LossStep,
    log_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Optimise ``model`` with ``loss_step``, select the best validation checkpoint, save it.

    Shared by the tiny LLaDA model and ``tiny-bd`` (``experiments/tiny_bd/train.py``):
    AdamW, the LR schedule of :func:`lr_at`, the seeded pool and batches, validation
    decodes every ``--eval-every`` steps (with ``--eval-cache``), the best checkpoint
    written to ``--out`` with ``training_log.json``.

    Args:
        args: the options of :func:`parse_args` (and the caller's own).
        model: a native model (``model.module`` is trained in place).
        config: its ``config.json``.
        loss_step: ``loss(ids, t, gen)`` of a ``(B, P + G)`` batch and ``(B,)`` stratified
            mask rates.
        log_extra: entries added to the training log.

    Returns:
        The training log.
    """
    device = model.device
    tokenizer = model.tokenizer
    module = model.module
    module.requires_grad_(True).train()
    n_params = sum(p.numel() for p in module.parameters())
    print(f"{config['model_type']}: {n_params / 1e6:.2f} M parameters; config {config}", flush=True)
    decay = [p for n, p in module.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in module.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.98),
        fused=device.type == "cuda",
    )
    p, g, bsz = args.prompt_length, args.gen_length, args.batch
    pool = build_pool(args.pool, args.seed + 1, p, g, args.workers).to(device)
    rows = batches(pool, bsz, args.seed + 3)
    gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    strata = torch.arange(bsz, device=device) / bsz  # (B,)
    where = (
        f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, TF32 matmuls)"
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {args.threads} threads"
    )
    log: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "params": n_params,
        "machine": f"{platform.node()}: {where}, torch {torch.__version__}",
        **(log_extra or {}),
        "evals": [],
        "losses": [],
    }
    t0 = time.time()
    ema = torch.zeros((), device=device)
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    bar = tqdm(range(args.steps), desc="train", mininterval=5.0, file=sys.stdout)
    step = 0
    for step in bar:
        lr = lr_at(step, args, (time.time() - t0) / 60)
        for group in opt.param_groups:
            group["lr"] = lr
        ids = next(rows)  # (B, P + G)
        u = (torch.rand((), generator=gen, device=device) + strata) % 1.0  # stratified
        t = args.eps + (1 - args.eps) * u  # (B,)
        loss = loss_step(ids, t, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        ema = loss.detach() if step == 0 else 0.98 * ema + 0.02 * loss.detach()
        if step % 50 == 0:  # the only host syncs besides evaluation
            ev = float(ema)
            bar.set_postfix(loss=f"{ev:.4f}", lr=f"{lr:.2e}")
            log["losses"].append((step, round(ev, 5), round(time.time() - t0, 1)))
        elapsed = (time.time() - t0) / 60
        last = step == args.steps - 1 or elapsed > args.max_minutes
        if (step + 1) % args.eval_every == 0 or last:
            save_checkpoint(model, config, args.run_dir)
            module.eval()
            try:
                res = evaluate(
                    model,
                    tokenizer,
                    args.eval_n,
                    g,
                    args.block_length,
                    cache=args.eval_cache,
                    batch=args.eval_batch,
                )
            except Exception as exc:  # a broken plugin must not kill the run
                tqdm.write(f"[eval step {step + 1}] failed: {exc!r}")
                res = {"error": repr(exc)}
            module.train()
            res.update(step=step + 1, minutes=round(elapsed, 2), loss=round(float(ema), 5))
            log["evals"].append(res)
            if "overall" in res:
                if best is None or res["overall"] >= best[0]:
                    state = module.state_dict()
                    best = (
                        res["overall"],
                        step + 1,
                        {k: v.cpu().clone() for k, v in state.items()},
                    )
                fam = " ".join(f"{k}={v:.2f}" for k, v in res["per_family"].items())
                tqdm.write(
                    f"[eval step {step + 1} {elapsed:.1f} min] validation exact match "
                    f"{res['overall']:.3f} ({fam})"
                )
            (args.run_dir / "training_log.json").write_text(json.dumps(log, indent=1))
        if last:
            break
    log["steps_done"] = step + 1
    log["train_minutes"] = round((time.time() - t0) / 60, 2)
    if best is not None:
        module.load_state_dict(best[2])
        log["selected"] = {"step": best[1], "validation_exact_match": best[0]}
    save_checkpoint(model, config, args.out)
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(
        f"saved {args.out} after {log['steps_done']} steps, {log['train_minutes']} min; "
        f"selected {log.get('selected')}"
    )
    return log


def main(argv: list[str] | None = None) -> None:
    """Train, evaluate on the validation split, save the best checkpoint to ``--out``."""
    args = parse_args(argv)
    device = setup(args)
    tokenizer = build_tokenizer()
    if args.init is not None:
        config = json.loads((args.init / "config.json").read_text())
        model = LLaDAModel.from_pretrained(str(args.init), dtype=torch.float32, device=device)
    else:
        config = model_config(args, len(tokenizer))
        model = LLaDAModel.from_config(config, seed=args.seed, dtype=torch.float32, device=device)
    model.tokenizer = tokenizer
    train_loop(args, model, config, llada_loss(model.module, args))


if __name__ == "__main__":
    main()
