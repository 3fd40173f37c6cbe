"""``dlm-decode bench``: milliseconds per forward (NFE) for every cache × batch × policy.

For each combination the bench decodes seeded random prompts with the fast path
([`FastDecoder`][dlm_decode.fast.FastDecoder]: static buffers, CUDA graphs on a GPU) and
reports the median wall time per NFE over the timed repeats (after warm-up), tokens per
second, NFE, peak memory and the share of step time spent outside the model forward (from
one extra run with ``profile=True``, which synchronizes around the forwards). With
``--compare`` the reference path ([`Decoder`][dlm_decode.decoder.Decoder]: eager forwards,
fresh tensors every step) runs beside it in the same process, and the bench reports the
speed ratio and whether every fast run committed exactly the reference's sequences.

Where the time goes: every row carries a ``breakdown`` of one more fast-path decode
(refresh forwards, step forwards, the select stage, host syncs and the remainder; see
[`StageRecorder`][dlm_decode.bench.StageRecorder]). ``--floor`` also times the plain model
forward at exactly the shapes the decode ran and combines them with its own mix of
refreshes and steps ([`forward_floor`][dlm_decode.bench.forward_floor]): the row's
``floor_ms_per_nfe``, ``floor_ratio`` (ms/NFE ÷ floor) and ``weight_read_ms_per_nfe``
(parameter bytes ÷ memory bandwidth). ``--tokens-per-step`` replaces the policies by a
fixed commit profile ([`CommitProfilePolicy`][dlm_decode.bench.CommitProfilePolicy]), so
that random weights (which commit one token a step) decode with a trained model's NFE.

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
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, field_validator
from tqdm import tqdm

from dlm_decode.argtypes import nonnegative_int, positive_int, seed_int
from dlm_decode.config import CacheRef, DecodeConfig, PolicyRef, parse_args
from dlm_decode.decoder import Decoder
from dlm_decode.fast import FastDecoder
from dlm_decode.interfaces import CountPolicy, StepState
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
    "GPU_BANDWIDTH_GBS",
    "GPU_ONLY_PARAMS",
    "BenchError",
    "BenchRow",
    "CommitProfileParams",
    "CommitProfilePolicy",
    "ForwardRecord",
    "StageRecorder",
    "add_arguments",
    "arch_config",
    "commit_profile",
    "forward_floor",
    "known_bandwidth_gbs",
    "measure",
    "parameter_count",
    "parse_policies",
    "positive_float",
    "profile_counts",
    "profile_steps_per_block",
    "random_prompts",
    "run",
    "weight_bytes",
]

#: Models with more parameters than this need a GPU in the bench (full-size presets).
GPU_ONLY_PARAMS = 1_000_000_000


class BenchError(ValueError):
    """A user error of ``bench``: the CLI prints it as one line and exits with 2."""


#: Peak memory bandwidth (GB/s) of known GPUs, matched in order against
#: ``torch.cuda.get_device_name`` (a substring; the first match wins). Used for the
#: weight-read limit (parameter bytes ÷ bandwidth); ``--bandwidth-gbs`` overrides it.
GPU_BANDWIDTH_GBS: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM (HBM3), e.g. "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB", 1935.0),  # PCIe
    ("A100", 1555.0),  # 40 GB
)


def known_bandwidth_gbs(device_name: str) -> float | None:
    """The peak memory bandwidth of a GPU named ``device_name``, or ``None`` if unknown.

    Args:
        device_name: what ``torch.cuda.get_device_name`` returns (``"cpu"`` on a CPU).

    Returns:
        GB/s from ``GPU_BANDWIDTH_GBS``, or ``None``.
    """
    for key, gbs in GPU_BANDWIDTH_GBS:
        if key.lower() in device_name.lower():
            return gbs
    return None


# --------------------------------------------------------------------------------------
# argument types


def positive_float(text: str) -> float:
    """A finite number > 0 (``--bandwidth-gbs``).

    Raises:
        argparse.ArgumentTypeError: not a number, not finite, or ≤ 0.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def commit_profile(text: str) -> str:
    """A commit profile for ``--tokens-per-step``: one rate (``3.5``, a finite number ≥ 1)
    or a comma list of integer counts ≥ 1, one per step of a block (``1,2,4,8``).

    Returns:
        The profile normalised (``"3.5"``, ``"1,2,4,8"``).

    Raises:
        argparse.ArgumentTypeError: anything else (``0``, ``-1``, ``abc``, ``1,x``, ``0.5``).
    """
    items = [t.strip() for t in text.split(",")]
    if len(items) == 1:
        try:
            rate = float(items[0])
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number of tokens per step (e.g. 3.5) or a comma list of counts "
                f"(e.g. 1,2,4), got {text!r}"
            ) from None
        if not math.isfinite(rate) or rate < 1:
            raise argparse.ArgumentTypeError(
                f"must be a finite number ≥ 1 (every step commits at least one token), got {text!r}"
            )
        return format(rate, "g") if rate != int(rate) else str(int(rate))
    counts = []
    for item in items:
        try:
            n = int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"a comma list of counts takes integers ≥ 1, got {item!r} in {text!r}"
            ) from None
        if n < 1:
            raise argparse.ArgumentTypeError(
                f"a comma list of counts takes integers ≥ 1 (every step commits at least one "
                f"token), got {item!r} in {text!r}"
            )
        counts.append(n)
    return ",".join(map(str, counts))


# --------------------------------------------------------------------------------------
# a deterministic commit profile (bench only; random weights commit one token a step)


def profile_counts(profile: str, block_length: int) -> list[int]:
    """Tokens committed at step ``k = 0 … L−1`` of a block under ``profile``.

    A rate ``r`` commits ``⌊(k+1)·r⌋ − ⌊k·r⌋`` at step ``k`` (``3.5``: 3, 4, 3, 4, …, so
    that after ``k`` steps ``⌊k·r⌋`` are committed); a comma list commits its ``k``-th
    entry, the last entry repeating after the list ends. The Decoder caps a step at the
    block's remaining masks.

    Args:
        profile: what [`commit_profile`][dlm_decode.bench.commit_profile] returns.
        block_length: ``L`` (at most ``L`` steps per block).

    Returns:
        ``L`` counts, each ≥ 1.
    """
    items = profile.split(",")
    if len(items) == 1:
        r = float(items[0])
        return [math.floor((k + 1) * r) - math.floor(k * r) for k in range(block_length)]
    counts = [int(v) for v in items]
    return [counts[min(k, len(counts) - 1)] for k in range(block_length)]


def profile_steps_per_block(profile: str, block_length: int) -> int:
    """Steps (NFE) a fully masked block of ``block_length`` takes under ``profile``.

    The smallest ``k`` whose first ``k`` counts sum to at least ``L`` (for a rate ``r``,
    ``⌈L / r⌉``); a decode of ``gen_length / L`` blocks runs this many forwards per block.
    """
    done = 0
    for k, n in enumerate(profile_counts(profile, block_length), start=1):
        done += n
        if done >= block_length:
            return k
    return block_length  # unreachable: every count is ≥ 1


class CommitProfileParams(BaseModel):
    """Params of the bench's ``commit_profile`` policy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: str = "1"
    """A rate (``3.5``) or a comma list of counts per step (``1,2,4``)."""

    @field_validator("profile")
    @classmethod
    def _check(cls, v: str) -> str:
        try:
            return commit_profile(v)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(str(exc)) from None


class CommitProfilePolicy(CountPolicy):
    """Commits a fixed number of the most confident masked positions per step, following a
    tokens-per-step profile ([`profile_counts`][dlm_decode.bench.profile_counts]),
    whatever the logits say: a trained model's refresh/step mix on random weights.

    Deterministic and tensor-only (the step index is a tensor in the policy's state, so the
    fast path captures the select stage as for the built-in rules). Not registered: the
    bench hands the object to the decoders.
    """

    name: ClassVar[str] = "commit_profile"
    Params: ClassVar[type[BaseModel]] = CommitProfileParams
    capturable: ClassVar[bool] = True

    def make_state(
        self, batch_size: int, block_length: int, vocab_size: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """The step counter ``()`` and the count table ``(L,)`` (both long)."""
        table = profile_counts(self.params.profile, block_length)
        return {
            "step": torch.zeros((), dtype=torch.long, device=device),  # ()
            "table": torch.tensor(table, dtype=torch.long, device=device),  # (L,)
        }

    def reset_state(self, state: dict[str, torch.Tensor], masked: torch.Tensor) -> None:
        """Back to step 0 at a block start (the table stays)."""
        state["step"].zero_()

    def commit_count(
        self, sorted_conf: torch.Tensor, valid: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        """The table's count at the current step, for every row: ``(B,)`` long."""
        st = state.policy_state
        if st is None or "step" not in st:  # a counterfactual call without the state
            return torch.ones(valid.shape[0], dtype=torch.long, device=valid.device)
        table = st["table"]  # (L,)
        k = st["step"].clamp(max=table.shape[0] - 1).view(1)  # (1,)
        return table.index_select(0, k).expand(valid.shape[0])  # (B,)

    def select(
        self, confidence: torch.Tensor, masked: torch.Tensor, state: StepState
    ) -> torch.Tensor:
        """The ``n`` most confident masked positions; then the step counter advances."""
        out = super().select(confidence, masked, state)
        if state.policy_state is not None and "step" in state.policy_state:
            state.policy_state["step"].add_(1)
        return out


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
        floor_ms_per_nfe: ``--floor``: the plain model forward's time for the decode's own
            mix of forwards, per NFE: ``(refreshes × t_full + Σ t_step) / NFE`` (see
            [`forward_floor`][dlm_decode.bench.forward_floor]).
        floor_ratio: ``ms_per_nfe / floor_ms_per_nfe`` (the goal is ≤ 1.25).
        weight_read_ms_per_nfe: ``--floor``: parameter bytes ÷ memory bandwidth, the time
            one forward needs to read the weights once (``None`` without a bandwidth).
        breakdown: one more fast-path decode split into ``refresh_forward_s``,
            ``step_forward_s``, ``select_s``, ``host_sync_s`` and ``remainder_s``, which
            sum to its ``total_s`` (see [`StageRecorder`][dlm_decode.bench.StageRecorder]);
            ``None`` with ``--no-profile`` (unless ``--floor``).
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
    floor_ms_per_nfe: float | None = None
    floor_ratio: float | None = None
    weight_read_ms_per_nfe: float | None = None
    breakdown: dict[str, Any] | None = None
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
        default=None,
        help="space- or semicolon-separated; each NAME or NAME:k=v,k=v (e.g. "
        "'frechet:margin=0.2 threshold'); a policy without arguments uses its defaults "
        f"(default {DecodeConfig.model_fields['policy'].default})",
    )
    p.add_argument("--repeats", type=positive_int, default=3, help="timed decodes per row (median)")
    p.add_argument(
        "--warmup",
        type=nonnegative_int,
        default=2,
        help="untimed decodes first (the fast path captures its CUDA graphs on the 2nd)",
    )
    p.add_argument("--compare", action="store_true", help="also run the reference Decoder")
    p.add_argument(
        "--floor",
        action="store_true",
        help="also time the plain model forward at the decode's own shapes (full sequence for "
        "refreshes and none, each cache's step span) and report floor ms/NFE, ratio and the "
        "weight-read limit",
    )
    p.add_argument(
        "--floor-repeats",
        type=positive_int,
        default=5,
        help="timed forwards per shape for --floor (median; default 5)",
    )
    p.add_argument(
        "--bandwidth-gbs",
        type=positive_float,
        default=None,
        metavar="GB/S",
        help="memory bandwidth for the weight-read limit (default: a table of known GPUs by "
        "name; none on CPU)",
    )
    p.add_argument(
        "--tokens-per-step",
        "--commit-profile",
        dest="tokens_per_step",
        type=commit_profile,
        default=None,
        metavar="R|N,N,…",
        help="commit a fixed profile instead of --policies: R tokens per step on average (e.g. "
        "3.5: 3,4,3,4,…) or a comma list of counts per step of a block (last one repeats)",
    )
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
    breakdown: bool = False,
) -> dict[str, Any]:
    """Time a decoder on one batch of prompts.

    Args:
        decoder: a ``Decoder`` or ``FastDecoder``.
        prompts: ``(B, P)`` ids on the model's device.
        warmup: untimed decodes first.
        repeats: timed decodes (at least one).
        profile: one more decode with ``profile=True`` for the forward/outside split.
        reference: ``(B, T)`` sequences every run must equal (``agree``).
        breakdown: one more decode under a [`StageRecorder`][dlm_decode.bench.StageRecorder]
            (no ``profile`` syncs) for the time breakdown and the list of its forwards.

    Returns:
        ``ms_per_nfe`` (median), ``ms_per_nfe_runs``, ``wall_s`` (median), ``nfe``,
        ``token_forwards``,
        ``peak_mem_bytes``, ``forward_s``/``select_s`` of the profiled run (or ``None``),
        ``breakdown`` and ``forwards`` of the recorded run (or ``None``),
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
    split = forwards = None
    if breakdown:
        rec = StageRecorder(decoder)
        _sync(dev)
        t0 = time.perf_counter()
        with rec:
            res = decoder.generate(prompts)
        _sync(dev)
        split = rec.breakdown(time.perf_counter() - t0)
        forwards = rec.forwards
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
        "breakdown": split,
        "forwards": forwards,
        "sequences": sequences[-1].cpu(),
        "agree": agree,
    }


@dataclass(frozen=True)
class ForwardRecord:
    """One forward of a recorded decode.

    Attributes:
        refresh: the loop called the cache's refresh (else its step).
        block_start: the active block's first position.
        block_end: one past its last.
        span: ``S``, token positions per row the forward computed.
        kv: the cache keeps a KV buffer (the forward wrote and attended over it).
    """

    refresh: bool
    block_start: int
    block_end: int
    span: int
    kv: bool


class StageRecorder:
    """Times a decoder's stages during one ``generate``: a context manager that wraps the
    instance's ``_forward`` and ``_select`` (the loop's two stages) and restores them.

    Clock: CUDA events on a GPU (device time, no added sync), ``time.perf_counter`` on a
    CPU. The breakdown partitions the decode's wall time ``total_s``:

    * ``refresh_forward_s`` / ``step_forward_s``: inside the forward stages (the cache's
      refresh or step and, on the fast path, the logits copy or graph replay);
    * ``select_s``: inside the select stages (signals, policy, commits, flags);
    * ``host_sync_s``: from the end of a step's select to the start of the next forward,
      where the loop reads the step's flags (its one host sync; on a GPU the device idles
      until the host has read them and launched the next forward) and, at a block's
      start, checks the block for masks;
    * ``remainder_s``: the rest: setup before the first forward, the result after the
      last, and any gap between a forward and its select (host launch latency).

    Args:
        decoder: a ``Decoder`` or ``FastDecoder``.

    Attributes:
        forwards: a [`ForwardRecord`][dlm_decode.bench.ForwardRecord] per forward, in order.
    """

    def __init__(self, decoder: Any) -> None:
        self.decoder = decoder
        self.cuda = torch.device(decoder.model.device).type == "cuda"
        self.forwards: list[ForwardRecord] = []
        self._marks: list[tuple[str, Any, Any]] = []  # (stage, start mark, end mark)

    def _mark(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _seconds(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def __enter__(self) -> StageRecorder:
        dec = self.decoder
        fwd, sel = dec._forward, dec._select  # the class's bound methods

        def forward(run: Any, refresh: bool, bs: int, be: int) -> int:
            a = self._mark()
            span = fwd(run, refresh, bs, be)
            b = self._mark()
            self._marks.append(("refresh" if refresh else "step", a, b))
            kv = getattr(run.ctx, "kv", None) is not None
            self.forwards.append(ForwardRecord(bool(refresh), bs, be, int(span), kv))
            return span

        def select(run: Any, bs: int, be: int, state: StepState) -> Any:
            a = self._mark()
            out = sel(run, bs, be, state)
            b = self._mark()
            self._marks.append(("select", a, b))
            return out

        dec._forward, dec._select = forward, select  # instance attributes shadow the class's
        return self

    def __exit__(self, *exc: object) -> None:
        for name in ("_forward", "_select"):
            self.decoder.__dict__.pop(name, None)

    def breakdown(self, total_s: float) -> dict[str, Any]:
        """The recorded decode's time split (seconds; call after a device sync).

        Args:
            total_s: the decode's wall time (``generate`` between two syncs).

        Returns:
            ``total_s``, ``refresh_forward_s``, ``step_forward_s``, ``select_s``,
            ``host_sync_s``, ``remainder_s`` (the five sum to ``total_s``; the remainder
            is clipped at 0 when the clocks disagree by a little), ``refreshes``,
            ``steps``, ``nfe`` and ``clock``.
        """
        sums = {"refresh": 0.0, "step": 0.0, "select": 0.0}
        sync = 0.0
        last_select_end = None
        for stage, a, b in self._marks:
            sums[stage] += self._seconds(a, b)
            if stage == "select":
                last_select_end = b
            elif last_select_end is not None:
                sync += self._seconds(last_select_end, a)
                last_select_end = None
        refreshes = sum(f.refresh for f in self.forwards)
        parts = sums["refresh"] + sums["step"] + sums["select"] + sync
        return {
            "total_s": total_s,
            "refresh_forward_s": sums["refresh"],
            "step_forward_s": sums["step"],
            "select_s": sums["select"],
            "host_sync_s": sync,
            "remainder_s": max(0.0, total_s - parts),
            "refreshes": refreshes,
            "steps": len(self.forwards) - refreshes,
            "nfe": len(self.forwards),
            "clock": "cuda_events" if self.cuda else "perf_counter",
        }


@torch.no_grad()
def forward_floor(
    model: Any,
    forwards: Sequence[ForwardRecord],
    batch_size: int,
    total_length: int,
    *,
    repeats: int = 5,
    warmup: int = 2,
    seed: int = 0,
    graphs: bool | None = None,
) -> dict[str, Any]:
    """The plain model forward's time for a decode's own forwards, per NFE.

    Every distinct forward shape of ``forwards`` (its span ``S`` per row and whether it
    uses the KV buffer) is timed alone with ``model.forward`` called as the built-in caches
    call it: over ``x[:, s:s+S]`` with ``start=s``, the ``(B, T)`` KV buffer when the cache
    keeps one, the RoPE positions and ``logits_rows`` of the block. A full-length span
    starts at 0 (a refresh, or any ``none`` forward); a shorter one at the block start
    (less the logits shift): the block for ``dual``, the block to the end for ``prefix``.
    The floor is then ``Σ_f t(shape_f) / NFE`` over the decode's forwards, i.e.
    ``(refreshes × t_full + steps × t_step) / NFE``.

    On a GPU each shape is captured in a CUDA graph and its replays are timed with CUDA
    events (no launch overhead: the fastest this forward runs); if capture fails it is
    timed eagerly. On a CPU it runs eagerly (median of ``repeats``).

    Args:
        model: the model (``forward``, ``new_kv``, ``logits_shift``).
        forwards: the decode's forwards (a [`StageRecorder`][dlm_decode.bench.StageRecorder]'s).
        batch_size: ``B``.
        total_length: ``T``, prompt plus generation.
        repeats: timed forwards per shape (median; on a GPU one timed batch of replays).
        warmup: untimed forwards per shape first.
        seed: seed of the random ids.
        graphs: capture CUDA graphs (default: on a CUDA device).

    Returns:
        ``floor_ms_per_nfe``, ``t_full_ms`` (mean over full-span forwards, ``None`` if
        none), ``t_step_ms`` (mean over the other forwards, ``None`` if none),
        ``refreshes``, ``steps``, ``kind`` (``cuda_graph``/``eager``) and ``shapes`` (each
        ``span``, ``kv``, ``ms``, ``count``).

    Raises:
        ValueError: no forwards.
    """
    if not forwards:
        raise ValueError("forward_floor needs the decode's forwards; none were recorded")
    dev = torch.device(model.device)
    cuda = dev.type == "cuda"
    use_graphs = cuda if graphs is None else bool(graphs and cuda)
    b, t, shift = batch_size, total_length, int(model.logits_shift)
    ids = random_prompts(model, b, t, seed)  # (B, T)
    pos = torch.arange(t, device=dev).expand(b, t)  # (B, T)
    kv = model.new_kv(b, t) if any(f.kv for f in forwards) else None
    shapes: dict[tuple[int, bool], ForwardRecord] = {}
    counts: dict[tuple[int, bool], int] = {}
    for f in forwards:
        key = (f.span, f.kv)
        shapes.setdefault(key, f)
        counts[key] = counts.get(key, 0) + 1

    def call(f: ForwardRecord) -> Callable[[], Any]:
        s = 0 if f.span >= t else max(0, min(f.block_start - shift, t - f.span))
        e = s + f.span
        lo = f.block_start - shift - s  # the output row predicting block_start
        rows = (lo, lo + f.block_end - f.block_start)
        return (
            lambda: model.forward(
                ids[:, s:e],  # (B, S)
                start=s,
                kv=kv if f.kv else None,
                attention_mask=None,
                position_ids=pos[:, s:e],  # (B, S)
                logits_rows=rows,
            )
        )

    if kv is not None:  # fill the buffer as a refresh would
        full = next((f for f in forwards if f.span >= t and f.kv), None)
        if full is not None:
            call(full)()
    kind = "cuda_graph" if use_graphs else "eager"
    times: dict[tuple[int, bool], float] = {}
    for key, f in shapes.items():
        fn = call(f)
        ms = None
        if use_graphs:
            try:
                ms = _graph_ms(fn, dev, repeats, warmup)
            except (RuntimeError, ValueError):  # not capturable: time it eagerly
                kind = "eager"
        if ms is None:
            ms = _eager_ms(fn, dev, repeats, warmup)
        times[key] = ms
    full_keys = [k for k in times if k[0] >= t]
    step_keys = [k for k in times if k[0] < t]
    n_full = sum(counts[k] for k in full_keys)
    n_step = sum(counts[k] for k in step_keys)
    refreshes = sum(f.refresh for f in forwards)
    total_ms = sum(times[k] * counts[k] for k in times)

    def mean(keys: list[tuple[int, bool]], n: int) -> float | None:
        return sum(times[k] * counts[k] for k in keys) / n if n else None

    _empty_cache(dev)
    return {
        "floor_ms_per_nfe": total_ms / len(forwards),
        "t_full_ms": mean(full_keys, n_full),
        "t_step_ms": mean(step_keys, n_step),
        "full_span_forwards": n_full,
        "refreshes": refreshes,
        "steps": len(forwards) - refreshes,
        "kind": kind,
        "shapes": [
            {"span": k[0], "kv": k[1], "ms": times[k], "count": counts[k]} for k in sorted(times)
        ],
    }


def _eager_ms(fn: Callable[[], Any], dev: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        runs.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(runs)


def _graph_ms(fn: Callable[[], Any], dev: torch.device, repeats: int, warmup: int) -> float:
    side = torch.cuda.Stream(device=dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(repeats):
        graph.replay()
    b.record()
    torch.cuda.synchronize(dev)
    ms = a.elapsed_time(b) / repeats
    del graph
    return ms


def weight_bytes(model: Any) -> int:
    """Bytes of the model's parameters (0 when it exposes no ``module``)."""
    module = getattr(model, "module", None)
    if module is None:
        return 0
    return int(sum(p.numel() * p.element_size() for p in module.parameters()))


def _static_bytes(model: Any, batch: int, total: int, block: int) -> int:
    weights = weight_bytes(model)
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
    floor: bool = False,
    floor_repeats: int = 5,
    bandwidth_gbs: float | None = None,
) -> BenchRow:
    """Measure one cache × policy setting at one batch size (the fast path, and the
    reference on request).

    Args:
        model: the model.
        settings: the resolved policy and cache (``gen_length`` and ``block_length`` are
            taken from the keyword arguments).
        batch_size: rows decoded together.
        prompt_length: ``P`` of the random prompts.
        gen_length: tokens generated per row.
        block_length: tokens per block.
        warmup: untimed decodes first.
        repeats: timed decodes (median).
        compare: also measure the reference ``Decoder``.
        profile: the profiled run (forward/outside split) and the breakdown run.
        seed: seed of the prompts.
        floor: time the plain forward at the decode's shapes (after the fast path's
            buffers are freed) and report the floor, ratio and weight-read limit.
        floor_repeats: timed forwards per shape for the floor.
        bandwidth_gbs: memory bandwidth for the weight-read limit (``None``: unknown).
    """
    dev = model.device
    cfg = settings.config.model_copy(
        update={"gen_length": gen_length, "block_length": block_length}
    )
    cfg = DecodeConfig.model_validate(cfg.model_dump())
    # A bench-only policy is not registered: the decoders get the object itself.
    pol = {"policy": settings.policy} if isinstance(settings.policy, CommitProfilePolicy) else {}
    prompts = random_prompts(model, batch_size, prompt_length, seed)
    slow = None
    if compare:
        # The reference first, then freed: at large batches both KV buffers need not fit.
        slow = measure(
            Decoder(model, cfg, **pol),
            prompts,
            warmup=min(warmup, 1),
            repeats=repeats,
            profile=profile,
            breakdown=profile,
        )
        _empty_cache(dev)
    fast_dec = FastDecoder(model, cfg, **pol)
    fast = measure(
        fast_dec,
        prompts,
        warmup=warmup,
        repeats=repeats,
        profile=profile,
        reference=None if slow is None else slow["sequences"],
        breakdown=profile or floor,
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
        breakdown=fast["breakdown"],
        extra={"fast_stage_runs_last_decode": stats},
    )
    if isinstance(settings.policy, CommitProfilePolicy):
        per_block = profile_steps_per_block(settings.policy.params.profile, block_length)
        row.extra["expected_nfe"] = per_block * (gen_length // block_length)
    if floor:
        fl = forward_floor(
            model,
            fast["forwards"],
            batch_size,
            prompt_length + gen_length,
            repeats=floor_repeats,
            seed=seed,
        )
        row.floor_ms_per_nfe = fl["floor_ms_per_nfe"]
        row.floor_ratio = row.ms_per_nfe / fl["floor_ms_per_nfe"]
        if bandwidth_gbs is not None:
            row.weight_read_ms_per_nfe = 1e3 * weight_bytes(model) / (bandwidth_gbs * 1e9)
        row.extra["floor"] = fl
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
            slow_breakdown=slow["breakdown"],
        )
        if floor:
            row.extra["slow_floor_ratio"] = slow["ms_per_nfe"] / row.floor_ms_per_nfe
    return row


# --------------------------------------------------------------------------------------
# output


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def format_table(rows: Sequence[BenchRow], compare: bool, floor: bool = False) -> str:
    """A readable fixed-width table of the rows (columns as wide as their longest label).

    Args:
        rows: the measurements.
        compare: add the reference columns.
        floor: add ``floor`` (ms/NFE), ``ratio`` (ms/NFE ÷ floor) and ``wt-read`` (ms).
    """
    cw = max([5, *(len(r.cache) for r in rows)]) + 2
    pw = max([6, *(len(r.policy) for r in rows)]) + 2
    head = (
        f"{'cache':<{cw}}{'B':>4}  {'policy':<{pw}}{'ms/NFE':>9}{'tok/s':>10}{'NFE':>6}"
        f"{'tok-fwd':>9}{'peak MiB':>10}{'outside':>9}"
    )
    if floor:
        head += f"{'floor':>9}{'ratio':>7}{'wt-read':>9}"
    if compare:
        head += f" | {'ref ms/NFE':>10}{'ref out':>8}{'speedup':>8}  agree"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (
            f"{r.cache:<{cw}}{r.batch_size:>4}  {r.policy:<{pw}}{r.ms_per_nfe:>9.3f}"
            f"{r.tokens_per_s:>10.1f}{r.nfe:>6}{r.token_forwards:>9}{_mib(r.peak_mem_bytes):>10}"
            f"{_fmt(r.outside_forward_share, '.0%'):>9}"
        )
        if floor:
            line += (
                f"{_fmt(r.floor_ms_per_nfe, '.3f'):>9}{_fmt(r.floor_ratio, '.2f'):>6}x"
                f"{_fmt(r.weight_read_ms_per_nfe, '.3f'):>9}"
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
    if args.tokens_per_step is not None:
        if args.policies is not None:
            raise BenchError(
                "give either --policies or --tokens-per-step (a fixed commit profile), not both"
            )
        policies: list[Any] = [
            CommitProfilePolicy(CommitProfileParams(profile=args.tokens_per_step))
        ]
    else:
        policies = parse_policies(
            args.policies
            if args.policies is not None
            else DecodeConfig.model_fields["policy"].default
        )
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
            "tokens_per_step": args.tokens_per_step,
        }
        if args.floor:
            bw, bw_src = args.bandwidth_gbs, "--bandwidth-gbs"
            if bw is None and model.device.type == "cuda":
                bw, bw_src = known_bandwidth_gbs(meta["device_name"]), "table"
            meta.update(
                floor="plain model.forward at the decode's shapes (CUDA graph replays on a "
                "GPU, eager on CPU), combined with the decode's refresh/step mix, per NFE",
                bandwidth_gbs=bw,
                bandwidth_source=bw_src if bw is not None else None,
                weight_bytes=weight_bytes(model),
            )
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
                            floor=args.floor,
                            floor_repeats=args.floor_repeats,
                            bandwidth_gbs=meta.get("bandwidth_gbs"),
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
        + (
            "; floor = plain forward ms/NFE at the decode's shapes and refresh/step mix, "
            "ratio = ms/NFE ÷ floor, wt-read = weight bytes ÷ bandwidth (ms)"
            if args.floor
            else ""
        )
    )
    print(format_table(rows, args.compare, args.floor))
    if args.json:
        print(f"json: {args.json}")
    if args.compare and not all(r.agree for r in rows):
        print("dlm-decode: warning: the fast path disagrees with the reference", file=sys.stderr)
        return 1
    return 0
