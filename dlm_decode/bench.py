"""``dlm-decode bench``: milliseconds per forward (NFE) for every cache × batch × policy.

For each combination the bench decodes seeded random prompts with the fast path
([`FastDecoder`][dlm_decode.fast.FastDecoder]: static buffers, CUDA graphs on a GPU) and
reports the median wall time per NFE over the timed repeats (after warm-up), tokens per
second, NFE, peak memory and the share of step time spent outside the model forward (from
one extra run with ``profile=True``, which synchronizes around the forwards). With
``--compare`` the reference path ([`Decoder`][dlm_decode.decoder.Decoder]: eager forwards,
fresh tensors every step) runs beside it in the same process, and the bench reports the
speed ratio and whether every fast run committed exactly the reference's sequences.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the measured runs (weights
included); on CPU the growth of the process's peak resident set (``ru_maxrss``) during
them, a lower bound (zero when an earlier phase peaked higher). Each row also carries
``static_bytes``, the weights plus the KV and logits buffers, computed from shapes.

Example:
    ```bash
    dlm-decode bench --arch tiny --random-weights --prompt-length 32 --gen-length 32 \\
        --block-length 16 --batch-sizes 1 --repeats 1
    ```
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dlm_decode.argtypes import nonnegative_int, positive_int, seed_int
from dlm_decode.config import CacheRef, DecodeConfig, PolicyRef, parse_args
from dlm_decode.decoder import Decoder
from dlm_decode.fast import FastDecoder
from dlm_decode.models.checkpoint import read_config
from dlm_decode.models.loading import (
    TINY_FOLDER,
    build_model,
    load_model,
    preset_config,
    resolve_device,
)
from dlm_decode.settings import Resolved, resolve

__all__ = [
    "GPU_ONLY_PARAMS",
    "BenchError",
    "BenchRow",
    "add_arguments",
    "arch_config",
    "measure",
    "parameter_count",
    "parse_policies",
    "random_prompts",
    "run",
]

#: Models with more parameters than this need a GPU in the bench (full-size presets).
GPU_ONLY_PARAMS = 1_000_000_000


class BenchError(ValueError):
    """A user error of ``bench``: the CLI prints it as one line and exits with 2."""


@dataclass
class BenchRow:
    """One cache × batch × policy measurement (``None`` where not measured).

    Attributes:
        cache: cache label (every argument: ``dual``, ``myCache(k=2)``).
        batch_size: rows decoded together.
        policy: policy label (``frechet(margin=0.25)``).
        ms_per_nfe: fast path, median over repeats of wall time / NFE.
        ms_per_nfe_runs: fast path, every timed repeat.
        tokens_per_s: fast path, generated tokens (all rows) per second at the median.
        nfe: forwards per decode.
        token_forwards: token positions the forwards of one decode computed (all rows).
        peak_mem_bytes: see the module docstring (``mem_kind`` in the JSON's ``meta``).
        static_bytes: weights + KV buffer + logits buffer, from shapes.
        outside_forward_share: share of step time outside the forward (profiled run).
        forward_ms_per_nfe: profiled run, forward time per NFE.
        select_ms_per_nfe: profiled run, time per NFE outside the forward (propose,
            policy, commit, the step's host sync).
        graphs: whether the fast path replayed CUDA graphs.
        slow_ms_per_nfe: reference path (``--compare``), median ms per NFE.
        slow_tokens_per_s: reference path tokens per second.
        slow_outside_forward_share: reference path, share outside the forward.
        speedup: ``slow_ms_per_nfe / ms_per_nfe``.
        agree: every fast run committed exactly the reference sequences (and NFE).
    """

    cache: str
    batch_size: int
    policy: str
    ms_per_nfe: float
    ms_per_nfe_runs: list[float]
    tokens_per_s: float
    nfe: int
    token_forwards: int
    peak_mem_bytes: int
    static_bytes: int
    outside_forward_share: float | None
    forward_ms_per_nfe: float | None
    select_ms_per_nfe: float | None
    graphs: bool
    slow_ms_per_nfe: float | None = None
    slow_tokens_per_s: float | None = None
    slow_outside_forward_share: float | None = None
    speedup: float | None = None
    agree: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``p``."""
    src = p.add_argument_group("model")
    src.add_argument(
        "--arch",
        default=None,
        help="build random weights of a preset on the device: tiny, llada-8b, dream-7b, "
        "llada-tiny, dream-tiny (default tiny when --model is not given)",
    )
    src.add_argument(
        "--random-weights",
        action="store_true",
        help="with --arch: random weights built on the device (the only mode of --arch)",
    )
    src.add_argument("--model", default=None, help="load a checkpoint: tiny, a folder, a hub id")
    src.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if any)")
    src.add_argument(
        "--dtype",
        default=None,
        help="bfloat16, float16, float32 (default: bfloat16 on GPU, float32 on CPU)",
    )
    src.add_argument("--seed", type=seed_int, default=0, help="seed of the weights and prompts")
    p.add_argument("--prompt-length", type=positive_int, default=768)
    p.add_argument("--gen-length", type=positive_int, default=256)
    p.add_argument("--block-length", type=positive_int, default=32)
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated, e.g. 1,8,32")
    p.add_argument("--caches", default="none,prefix,dual", help="comma-separated cache names")
    p.add_argument(
        "--cache-arg",
        action="append",
        default=[],
        metavar="K=V",
        help="a parameter of every cache in --caches (each must accept it)",
    )
    p.add_argument(
        "--policies",
        default=DecodeConfig.model_fields["policy"].default,
        help="space- or semicolon-separated; each NAME or NAME:k=v,k=v (e.g. "
        "'frechet:margin=0.2 threshold'); a policy without arguments uses its defaults",
    )
    p.add_argument("--repeats", type=positive_int, default=3, help="timed decodes per row (median)")
    p.add_argument(
        "--warmup",
        type=nonnegative_int,
        default=2,
        help="untimed decodes first (the fast path captures its CUDA graphs on the 2nd)",
    )
    p.add_argument("--compare", action="store_true", help="also run the reference Decoder")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled run")
    p.add_argument(
        "--threads",
        type=nonnegative_int,
        default=1,
        help="torch CPU threads during the bench (default 1: small shapes are dispatch-bound "
        "and extra threads only contend; 0 leaves torch's setting)",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")


def parse_policies(text: str) -> list[PolicyRef]:
    """Parse ``"frechet:margin=0.25 threshold:threshold=0.9"`` into policy references.

    Raises:
        BenchError: an argument without ``=``, or no policy.
    """
    out = []
    for item in text.replace(";", " ").split():
        try:
            out.append(PolicyRef.parse(item))
        except ValueError as exc:
            raise BenchError(f"--policies {item!r}: {exc}") from None
    if not out:
        raise BenchError("--policies is empty; e.g. --policies frechet")
    return out


def _int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchError(f"{what} expects comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise BenchError(f"{what} expects positive integers, got {text!r}")
    return vals


def arch_config(arch: str, total_length: int) -> dict[str, Any]:
    """The ``config.json`` dict the bench builds for ``--arch``.

    ``tiny`` is the shipped checkpoint's config when ``dlm_decode/assets/tiny`` exists,
    else the ``llada-tiny`` preset; any other name is a preset a model class declares
    (see [`presets`][dlm_decode.models.loading.presets]). The maximum length is raised to
    ``total_length`` when shorter (random weights have no trained length).

    Raises:
        ValueError: an unknown preset name.
    """
    if arch == "tiny" and (TINY_FOLDER / "config.json").is_file():
        config = read_config(TINY_FOLDER)
    else:
        config = preset_config("llada-tiny" if arch == "tiny" else arch)
    for key in ("max_sequence_length", "max_position_embeddings"):
        if key in config and int(config[key]) < total_length:
            print(
                f"dlm-decode bench: {total_length} positions exceed {arch}'s {key} "
                f"{config[key]}; the random weights are built for {total_length} (attention "
                f"cost grows with length squared, so a row can take minutes)",
                file=sys.stderr,
            )
            config[key] = total_length
    return config


def parameter_count(config: dict[str, Any]) -> int:
    """Parameters of a ``config.json``'s architecture, from a ``meta`` build (no memory)."""
    model = build_model(config, device="meta")
    return sum(p.numel() for p in model.parameters())


def random_prompts(model: Any, batch_size: int, length: int, seed: int) -> torch.Tensor:
    """``(B, P)`` seeded random prompt ids on the model's device, never the mask id."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.vocab_size - 1, (batch_size, length), generator=g)  # (B, P)
    ids += (ids >= model.mask_token_id).long()  # skip the mask id
    return ids.to(model.device)


# --------------------------------------------------------------------------------------
# measuring


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_rss_bytes() -> int:
    try:
        import resource
    except ImportError:  # not on Unix
        return 0
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def measure(
    decoder: Any,
    prompts: torch.Tensor,
    *,
    warmup: int,
    repeats: int,
    profile: bool = True,
    reference: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Time a decoder on one batch of prompts.

    Args:
        decoder: a ``Decoder`` or ``FastDecoder``.
        prompts: ``(B, P)`` ids on the model's device.
        warmup: untimed decodes first.
        repeats: timed decodes (at least one).
        profile: one more decode with ``profile=True`` for the forward/outside split.
        reference: ``(B, T)`` sequences every run must equal (``agree``).

    Returns:
        ``ms_per_nfe`` (median), ``ms_per_nfe_runs``, ``wall_s`` (median), ``nfe``,
        ``token_forwards``,
        ``peak_mem_bytes``, ``forward_s``/``select_s`` of the profiled run (or ``None``),
        ``sequences`` (CPU, last run) and ``agree``.

    Raises:
        ValueError: ``repeats`` < 1 or ``warmup`` < 0.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer (timed decodes), got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer ≥ 0, got {warmup!r}")
    dev = decoder.model.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rss0 = _peak_rss_bytes()
    sequences = []
    token_forwards = 0
    nfes = []
    walls = []
    for i in range(warmup + repeats):
        _sync(dev)
        t0 = time.perf_counter()
        res = decoder.generate(prompts)
        _sync(dev)
        wall = time.perf_counter() - t0
        sequences.append(res.sequences)
        nfes.append(res.nfe)
        token_forwards = res.token_forwards
        if i >= warmup:
            walls.append(wall)
    fwd = sel = None
    if profile:
        base = decoder.config
        decoder.config = base.model_copy(update={"profile": True})
        try:
            res = decoder.generate(prompts)
        finally:
            decoder.config = base
        fwd, sel = res.timings.get("forward_s"), res.timings.get("select_s")
        sequences.append(res.sequences)
        nfes.append(res.nfe)
    if dev.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(dev))
    else:
        peak = max(0, _peak_rss_bytes() - rss0)
    ref = sequences[0] if reference is None else reference.to(sequences[0].device)
    agree = all(torch.equal(s, ref) for s in sequences) and len(set(nfes)) == 1
    nfe = nfes[-1]
    wall = statistics.median(walls)
    return {
        "ms_per_nfe": 1e3 * wall / nfe,
        "ms_per_nfe_runs": [1e3 * w / nfe for w in walls],
        "wall_s": wall,
        "nfe": nfe,
        "token_forwards": token_forwards,
        "peak_mem_bytes": peak,
        "forward_s": fwd,
        "select_s": sel,
        "sequences": sequences[-1].cpu(),
        "agree": agree,
    }


def _static_bytes(model: Any, batch: int, total: int, block: int) -> int:
    weights = 0
    module = getattr(model, "module", None)
    if module is not None:
        weights = sum(p.numel() * p.element_size() for p in module.parameters())
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    spec = getattr(model, "spec", None)
    kv = 0
    if spec is not None:
        kv = 2 * spec.n_layers * batch * spec.n_kv_heads * total * spec.head_dim * itemsize
    logits = batch * block * model.vocab_size * itemsize
    return int(weights + kv + logits)


def _share(m: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
    f, s = m["forward_s"], m["select_s"]
    if f is None or s is None or f + s <= 0:
        return None, None, None
    return s / (f + s), 1e3 * f / m["nfe"], 1e3 * s / m["nfe"]


def _empty_cache(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def bench_row(
    model: Any,
    settings: Resolved,
    batch_size: int,
    *,
    prompt_length: int,
    gen_length: int,
    block_length: int,
    warmup: int,
    repeats: int,
    compare: bool,
    profile: bool,
    seed: int,
) -> BenchRow:
    """Measure one cache × policy setting at one batch size (the fast path, and the
    reference on request).

    Args:
        model: the model.
        settings: the resolved policy and cache (``gen_length`` and ``block_length`` are
            taken from the keyword arguments).
        batch_size: rows decoded together.
    """
    dev = model.device
    cfg = settings.config.model_copy(
        update={"gen_length": gen_length, "block_length": block_length}
    )
    cfg = DecodeConfig.model_validate(cfg.model_dump())
    prompts = random_prompts(model, batch_size, prompt_length, seed)
    slow = None
    if compare:
        # The reference first, then freed: at large batches both KV buffers need not fit.
        slow = measure(
            Decoder(model, cfg),
            prompts,
            warmup=min(warmup, 1),
            repeats=repeats,
            profile=profile,
        )
        _empty_cache(dev)
    fast_dec = FastDecoder(model, cfg)
    fast = measure(
        fast_dec,
        prompts,
        warmup=warmup,
        repeats=repeats,
        profile=profile,
        reference=None if slow is None else slow["sequences"],
    )
    stats = dict(fast_dec.stats)
    fast_dec.release()
    _empty_cache(dev)
    share, fwd_ms, sel_ms = _share(fast)
    total_tokens = batch_size * gen_length
    row = BenchRow(
        cache=settings.cache_ref.label,
        batch_size=batch_size,
        policy=settings.policy_ref.label,
        ms_per_nfe=fast["ms_per_nfe"],
        ms_per_nfe_runs=fast["ms_per_nfe_runs"],
        tokens_per_s=total_tokens / fast["wall_s"],
        nfe=fast["nfe"],
        token_forwards=fast["token_forwards"],
        peak_mem_bytes=fast["peak_mem_bytes"],
        static_bytes=_static_bytes(model, batch_size, prompt_length + gen_length, block_length),
        outside_forward_share=share,
        forward_ms_per_nfe=fwd_ms,
        select_ms_per_nfe=sel_ms,
        graphs=fast_dec.graphs,
        extra={"fast_stage_runs_last_decode": stats},
    )
    if slow is not None:
        s_share, s_fwd, s_sel = _share(slow)
        row.slow_ms_per_nfe = slow["ms_per_nfe"]
        row.slow_tokens_per_s = total_tokens / slow["wall_s"]
        row.slow_outside_forward_share = s_share
        row.speedup = slow["ms_per_nfe"] / fast["ms_per_nfe"]
        row.agree = bool(fast["agree"]) and slow["nfe"] == fast["nfe"]
        row.extra.update(
            slow_forward_ms_per_nfe=s_fwd,
            slow_select_ms_per_nfe=s_sel,
            slow_peak_mem_bytes=slow["peak_mem_bytes"],
            slow_ms_per_nfe_runs=slow["ms_per_nfe_runs"],
        )
    return row


# --------------------------------------------------------------------------------------
# output


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def format_table(rows: Sequence[BenchRow], compare: bool) -> str:
    """A readable fixed-width table of the rows (columns as wide as their longest label)."""
    cw = max([5, *(len(r.cache) for r in rows)]) + 2
    pw = max([6, *(len(r.policy) for r in rows)]) + 2
    head = (
        f"{'cache':<{cw}}{'B':>4}  {'policy':<{pw}}{'ms/NFE':>9}{'tok/s':>10}{'NFE':>6}"
        f"{'tok-fwd':>9}{'peak MiB':>10}{'outside':>9}"
    )
    if compare:
        head += f" | {'ref ms/NFE':>10}{'ref out':>8}{'speedup':>8}  agree"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (
            f"{r.cache:<{cw}}{r.batch_size:>4}  {r.policy:<{pw}}{r.ms_per_nfe:>9.3f}"
            f"{r.tokens_per_s:>10.1f}{r.nfe:>6}{r.token_forwards:>9}{_mib(r.peak_mem_bytes):>10}"
            f"{_fmt(r.outside_forward_share, '.0%'):>9}"
        )
        if compare:
            line += (
                f" | {_fmt(r.slow_ms_per_nfe, '.3f'):>10}"
                f"{_fmt(r.slow_outside_forward_share, '.0%'):>8}"
                f"{_fmt(r.speedup, '.2f'):>7}x  {r.agree}"
            )
        lines.append(line)
    return "\n".join(lines)


def _write_json(path: str | None, meta: dict[str, Any], rows: Sequence[BenchRow]) -> None:
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))


# --------------------------------------------------------------------------------------
# the command


def _load_model(args: argparse.Namespace, total: int) -> tuple[Any, str]:
    if args.model is not None and args.arch is not None:
        raise BenchError("give either --model (a checkpoint) or --arch (random weights), not both")
    if args.model is not None:
        if args.random_weights:
            raise BenchError("--random-weights goes with --arch; --model loads a checkpoint")
        model = load_model(args.model, device=resolve_device(args.device), dtype=args.dtype)
        return model, args.model
    arch = args.arch or "tiny"
    config = arch_config(arch, total)
    if parameter_count(config) > GPU_ONLY_PARAMS:
        wants_cpu = args.device is not None and not args.device.startswith("cuda")
        if wants_cpu or not torch.cuda.is_available():
            raise BenchError(f"{arch} needs a GPU; use --arch tiny on CPU")
    device = resolve_device(args.device)
    return build_model(config, device=device, dtype=args.dtype, seed=args.seed), arch


def run(args: argparse.Namespace) -> int:
    """Run ``dlm-decode bench``; returns the exit code."""
    batches = _int_list(args.batch_sizes, "--batch-sizes")
    cache_args = parse_args(args.cache_arg, "--cache-arg")
    caches = [
        CacheRef(name=c.strip(), args=cache_args) for c in args.caches.split(",") if c.strip()
    ]
    policies = parse_policies(args.policies)
    if args.prompt_length < 1:
        raise BenchError("--prompt-length must be at least 1")
    # Resolve every cache × policy before touching a device.
    settings: list[Resolved] = []
    for cache in caches:
        for pol in policies:
            try:
                settings.append(
                    resolve(
                        policy=pol,
                        cache=cache,
                        gen_length=args.gen_length,
                        block_length=args.block_length,
                    )
                )
            except ValueError as exc:
                if "needs 'steps'" in str(exc):
                    raise BenchError(
                        f"policy {pol.name!r} needs steps (a step budget); the bench runs "
                        f"policies without one"
                    ) from None
                raise
    total = args.prompt_length + args.gen_length

    old_threads = torch.get_num_threads()
    model, source = _load_model(args, total)
    if model.device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        meta = {
            "model": source,
            "random_weights": args.model is None,
            "device": str(model.device),
            "device_name": torch.cuda.get_device_name(model.device)
            if model.device.type == "cuda"
            else "cpu",
            "dtype": str(model.dtype).removeprefix("torch."),
            "prompt_length": args.prompt_length,
            "gen_length": args.gen_length,
            "block_length": args.block_length,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "mem_kind": "cuda.max_memory_allocated"
            if model.device.type == "cuda"
            else "cpu_peak_rss_growth_lower_bound",
            "ms_per_nfe": "median over repeats of decode wall time / NFE (forward + selection)",
        }
        rows: list[BenchRow] = []
        by_cache: dict[str, list[Resolved]] = {}
        for st in settings:
            by_cache.setdefault(st.cache_ref.label, []).append(st)
        bar = tqdm(total=len(settings) * len(batches), desc="bench", unit="row", file=sys.stderr)
        for group in by_cache.values():
            for bsz in batches:
                for st in group:
                    bar.set_postfix_str(f"{st.cache_ref.label} B={bsz} {st.policy_ref.label}")
                    rows.append(
                        bench_row(
                            model,
                            st,
                            bsz,
                            prompt_length=args.prompt_length,
                            gen_length=args.gen_length,
                            block_length=args.block_length,
                            warmup=args.warmup,
                            repeats=args.repeats,
                            compare=args.compare,
                            profile=not args.no_profile,
                            seed=args.seed,
                        )
                    )
                    _write_json(args.json, meta, rows)  # partial results survive a timeout
                    bar.update()
        bar.close()
    finally:
        torch.set_num_threads(old_threads)
    print(
        f"{source} on {meta['device_name']} ({meta['dtype']}), prompt {args.prompt_length}, "
        f"gen {args.gen_length}, block {args.block_length}; ms/NFE = median of "
        f"{args.repeats} after {args.warmup} warm-up; 'outside' = share of step time "
        f"outside the forward; tok-fwd = token positions computed per decode; "
        f"peak = {meta['mem_kind']}"
    )
    print(format_table(rows, args.compare))
    if args.json:
        print(f"json: {args.json}")
    if args.compare and not all(r.agree for r in rows):
        print("dlm-decode: warning: the fast path disagrees with the reference", file=sys.stderr)
        return 1
    return 0
