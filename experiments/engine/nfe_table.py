"""NFE and CPU time of one decode for every policy × cache on a fixed prompt.

Usage::

    python experiments/engine/nfe_table.py                 # tiny random LLaDA + Dream
    python experiments/engine/nfe_table.py --model tiny    # the shipped tiny model

With random checkpoints the LM head is scaled (``--head-scale``) so that confidences are
spread out as in a trained model; the point is the engine's bookkeeping, not quality.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import dlm_decode
from dlm_decode.models import load_model
from dlm_decode.models.testing import write_random_checkpoint

POLICIES = [
    ("fixed", {}),
    ("threshold", {"threshold": 0.9}),
    ("factor", {"factor": 0.75}),
    ("frechet", {"margin": 0.25}),
    ("frechet_robust", {"margin": 0.25, "eta": 0.05}),
]
CACHES = ["none", "prefix", "dual"]


def _models(args: argparse.Namespace, tmp: str) -> list[tuple[str, dlm_decode.Model]]:
    if args.model:
        return [(args.model, load_model(args.model))]
    out = []
    for arch in ("llada", "dream"):
        path = write_random_checkpoint(f"{tmp}/{arch}", arch=arch, seed=0)
        m = load_model(str(path))
        for name, p in m.named_parameters():
            if name in ("model.transformer.ff_out.weight", "lm_head.weight"):
                p.data.mul_(args.head_scale)
        out.append((f"random tiny {arch}", m))
    return out


def main() -> None:
    """Print a Markdown table of NFE and decode time per model × policy × cache."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="tiny, a folder, or omit for random tiny")
    ap.add_argument("--prompt", default="12+34=")
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=16)
    ap.add_argument("--head-scale", type=float, default=12.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"gen_length={args.gen_length}, block_length={args.block_length}, CPU, "
        f"{args.threads} thread(s), float32, batch 1, best of 3\n"
    )
    print("| model | policy | cache | NFE | tokens/NFE | ms per decode |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, model in _models(args, tmp):
            if model.tokenizer is not None:
                ids = model.tokenizer.encode(args.prompt, add_special_tokens=True)
            else:
                ids = list(range(1, 9))
            for (pol, pargs), cache in [(p, c) for p in POLICIES for c in CACHES]:
                steps = args.gen_length if pol == "fixed" else None
                best = float("inf")
                for _ in range(3):
                    t0 = time.perf_counter()
                    out = dlm_decode.generate(
                        model,
                        [ids],
                        policy=pol,
                        policy_args=pargs,
                        cache=cache,
                        gen_length=args.gen_length,
                        block_length=args.block_length,
                        steps=steps,
                    )
                    best = min(best, time.perf_counter() - t0)
                print(
                    f"| {label} | {pol} {pargs or ''} | {cache} | {out.nfe} | "
                    f"{args.gen_length / out.nfe:.2f} | {best * 1e3:.1f} |"
                )


if __name__ == "__main__":
    main()
