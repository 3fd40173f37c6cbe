"""Held-out exact match of a shipped tiny model under several decode settings.

Usage::

    python experiments/tiny/evaluate.py --n 600 --update-log
    python experiments/tiny/evaluate.py --model tiny-bd --n 600 --update-log

Runs every setting through ``dlm_decode.evaluate.evaluate`` (the code behind
``dlm-decode eval``) on the held-out synthetic problems, prints a Markdown table (overall
and per-family exact match, NFE and token-forwards per sample, tokens per NFE) and, with
``--update-log``, stores it under ``"final_eval"`` in the model's ``training_log.json``.
Every setting but the first uses ``--cache`` (default: the model's preferred cache, so
``block`` for ``tiny-bd``, else ``dual``).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

import dlm_decode
from dlm_decode.config import DecodeConfig
from dlm_decode.evaluate import evaluate
from dlm_decode.models.loading import resolve_model_folder
from dlm_decode.tasks.synthetic import FAMILIES, SyntheticTask

#: (label, policy, policy_args, cache); ``{cache}`` is ``--cache``.
SETTINGS: list[tuple[str, str, dict[str, Any], str]] = [
    ("fixed 1/step none", "fixed", {}, "none"),
    ("fixed 1/step {cache}", "fixed", {}, "{cache}"),
    ("threshold 0.9 {cache}", "threshold", {"threshold": 0.9}, "{cache}"),
    ("factor 0.75 {cache}", "factor", {"factor": 0.75}, "{cache}"),
    ("frechet 0.25 {cache}", "frechet", {"margin": 0.25}, "{cache}"),
    ("threshold 0.5 {cache}", "threshold", {"threshold": 0.5}, "{cache}"),
    ("frechet 0 {cache}", "frechet", {"margin": 0.0}, "{cache}"),
]


def main(argv: list[str] | None = None) -> None:
    """Evaluate every setting and print (and optionally store) the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--n", type=int, default=600)
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--block-length", type=int, default=16)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=None, help="cache of every setting but the first")
    p.add_argument("--only", default=None, help="comma-separated setting labels to run")
    p.add_argument("--update-log", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = dlm_decode.load_model(args.model)
    cache_name = args.cache or model.preferred_cache or "dual"
    task = SyntheticTask()
    samples = task.samples(args.n)
    rows = []
    head = (
        "| setting | exact match | "
        + " | ".join(FAMILIES)
        + " | NFE/sample | token-forwards/sample | tokens/NFE |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for label, policy, pargs, cache in SETTINGS:
        label, cache = label.format(cache=cache_name), cache.format(cache=cache_name)
        if args.only and label not in args.only.split(","):
            continue
        cfg = DecodeConfig(
            policy=policy,
            policy_args=pargs,
            cache=cache,
            gen_length=args.gen_length,
            block_length=args.block_length,
            steps=args.gen_length if policy == "fixed" else None,
        )
        t0 = time.time()
        s = evaluate(model, task, cfg, samples=samples, batch_size=args.batch, progress=False)
        s = s.summary
        row = {"setting": label, "seconds": round(time.time() - t0, 1), **s}
        rows.append(row)
        fams = " | ".join(f"{s[f'accuracy_{f}']:.3f}" for f in FAMILIES)
        print(
            f"| {label} | {s['accuracy']:.3f} | {fams} | {s['nfe_per_sample']:.1f} | "
            f"{s['token_forwards_per_sample']:.0f} | {s['tokens_per_nfe']:.2f} |",
            flush=True,
        )
    if args.update_log:
        path = resolve_model_folder(args.model) / "training_log.json"
        log = json.loads(path.read_text())
        log["final_eval"] = {
            "n": args.n,
            "gen_length": args.gen_length,
            "block_length": args.block_length,
            "rows": rows,
        }
        path.write_text(json.dumps(log, indent=1) + "\n")


if __name__ == "__main__":
    main()
