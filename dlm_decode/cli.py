"""The ``dlm-decode`` command line: ``plugins``, ``generate``, ``eval``, ``quickstart``,
``bench`` and ``ablate``.

Every user error (unknown name, bad parameter, missing file) is one line on stderr and
exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dlm_decode import bench
from dlm_decode.ablate import cli as ablate_cli
from dlm_decode.api import list_plugins
from dlm_decode.argtypes import (
    OneLineParser,
    finite_float,
    nonnegative_int,
    positive_int,
    seed_int,
)
from dlm_decode.config import CacheRef, DecodeConfig, PolicyRef, format_value, parse_args
from dlm_decode.decoder import Decoder
from dlm_decode.evaluate import encode_prompts, evaluate, get_task
from dlm_decode.models.loading import load_model, resolve_device
from dlm_decode.registry import PluginLoadWarning, UnknownPluginError
from dlm_decode.settings import Resolved, resolve
from dlm_decode.tasks.base import load_samples
from dlm_decode.trace_view import LiveView, TokenText, ansi_enabled, check_writable, format_step

__all__ = ["QUICKSTART_POLICIES", "CLIError", "build_parser", "decode_settings", "main"]


class CLIError(Exception):
    """A user error reported as one line with exit code 2."""


# --------------------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="tiny, tiny-bd, a local folder, or a hub id")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if any)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16, float64")
    p.add_argument(
        "--no-check-weights",
        action="store_true",
        help="skip the NaN/inf check of the weights on load (one reduction per tensor)",
    )


def _add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache",
        default=None,
        help="none, prefix, dual, block or a plugin's (dlm-decode plugins --kind cache); "
        f"default: the model's preferred cache (block for block-diffusion models), else "
        f"{DecodeConfig.model_fields['cache'].default}",
    )
    p.add_argument(
        "--cache-arg", action="append", default=[], metavar="K=V", help="cache parameter"
    )


def _add_decode_args(p: argparse.ArgumentParser, *, gen: int, block: int) -> None:
    p.add_argument(
        "--policy",
        default=DecodeConfig.model_fields["policy"].default,
        help="commit policy (dlm-decode plugins --kind policy)",
    )
    p.add_argument(
        "--policy-arg",
        action="append",
        default=[],
        metavar="K=V",
        help="policy parameter (default: the policy's own defaults)",
    )
    _add_cache_args(p)
    p.add_argument("--gen-length", type=positive_int, default=gen)
    p.add_argument("--block-length", type=positive_int, default=block)
    p.add_argument("--steps", type=positive_int, default=None, help="total steps (needed by fixed)")
    p.add_argument("--temperature", type=finite_float, default=0.0)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--early-stop", action="store_true", help="stop rows once they emit EOS")


def decode_settings(args: argparse.Namespace, **over: Any) -> Resolved:
    """Resolve the decode options of ``generate``/``eval`` before any model loads.

    Args:
        args: the parsed options (``--policy``, ``--policy-arg``, ``--cache``,
            ``--cache-arg``, lengths, ``--steps``, …).
        **over: further ``DecodeConfig`` fields (``trace=True``).

    Returns:
        The [`Resolved`][dlm_decode.settings.Resolved] settings.

    Raises:
        CLIError: the policy needs a field that is not set (names the option).
    """
    fields = dict(
        gen_length=args.gen_length,
        block_length=args.block_length,
        steps=args.steps,
        temperature=args.temperature,
        seed=args.seed,
        early_stop=args.early_stop,
    )
    fields.update(over)
    policy = PolicyRef(name=args.policy, args=parse_args(args.policy_arg, "--policy-arg"))
    try:
        return resolve(policy=policy, cache=_cache_ref(args), **fields)
    except ValueError as exc:
        if "needs 'steps'" in str(exc):
            raise CLIError(
                f"policy {args.policy!r} needs --steps (e.g. --steps {args.gen_length} for "
                f"one token per step)"
            ) from None
        raise


def _cache_ref(args: argparse.Namespace) -> CacheRef:
    name = args.cache or DecodeConfig.model_fields["cache"].default
    return CacheRef(name=name, args=parse_args(args.cache_arg, "--cache-arg"))


def adopt_preferred_cache(args: argparse.Namespace, model: Any) -> bool:
    """Set ``args.cache`` to the model's
    [`preferred_cache`][dlm_decode.interfaces.Model] when ``--cache`` was not given.

    Returns:
        Whether the cache changed (the caller resolves its settings again).
    """
    preferred = getattr(model, "preferred_cache", None)
    if args.cache is not None or not preferred:
        return False
    args.cache = preferred
    return preferred != DecodeConfig.model_fields["cache"].default


def _settings_line(settings: Resolved) -> str:
    """``policy frechet(margin=0.25) [frechet.v1], cache dual [dual.v1]``."""
    p, c = settings.policy_ref, settings.cache_ref
    return f"policy {p.label} [{p.key}], cache {c.label} [{c.key}]"


def _load(args: argparse.Namespace):
    return load_model(
        args.model,
        device=resolve_device(args.device),
        dtype=args.dtype,
        check_weights=not args.no_check_weights,
    )


# --------------------------------------------------------------------------------------


def cmd_plugins(args: argparse.Namespace) -> int:
    """List registered plugins."""
    rows = list_plugins(args.kind)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print(f"{'kind':<7} {'key':<20} {'params':<32} {'source':<20} description")
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        if r["requires"]:
            params = (params + ", " if params else "") + "needs " + "/".join(r["requires"])
        print(f"{r['kind']:<7} {r['key']:<20} {params:<32} {r['source']:<20} {r['doc']}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from one prompt and print text, NFE and tokens/s (``--trace``: each
    step's canvas; ``--live``: the response redrawn as it decodes; ``--html``: the trace
    viewer page)."""
    html = check_writable(args.html, "--html") if args.html else None  # before any work
    images = [Path(p) for p in args.image]
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise CLIError(f"--image {missing[0]!r} is not a file; give the path of a PNG or JPEG")
    settings = decode_settings(args, trace=args.trace or html is not None)
    model = _load(args)
    if adopt_preferred_cache(args, model):
        settings = decode_settings(args, trace=args.trace or html is not None)
    if images:
        if not model.accepts_images:
            raise CLIError(
                f"--image needs a multimodal model (llada_v); {args.model!r} is a "
                f"{type(model).__name__}, which takes text only"
            )
        ids: Any = [model.image_prompt(args.prompt, images)]
    else:
        chat = None if args.chat == "auto" else args.chat == "yes"
        ids = encode_prompts(model, [args.prompt], chat=chat)
    text_of = TokenText(model.tokenizer, model.eos_token_ids)
    cfg = settings.config
    live = LiveView(sys.stdout, cfg.gen_length, cfg.block_length, text_of) if args.live else None
    try:
        res = Decoder(model, cfg).generate(ids, on_step=live)
    finally:
        if live is not None:
            live.close()
    text = res.texts(model.tokenizer)[0]
    n_tok = int(res.response_lengths()[0])
    secs = res.timings["total_s"]
    if args.trace and res.trace:
        color = ansi_enabled(sys.stdout)
        for st in res.trace:
            print("\n".join(format_step(st, text_of, color=color)))
    if html is not None:
        html.parent.mkdir(parents=True, exist_ok=True)
        html.write_text(res.trace.to_html(model.tokenizer), encoding="utf-8")
    print(text)
    print(
        f"-- {n_tok} tokens, NFE {res.nfe}, {res.token_forwards} token-forwards, "
        f"{n_tok / secs:.1f} tokens/s, "
        f"{_settings_line(settings)}",
        file=sys.stderr,
    )
    if html is not None:
        print(f"-- trace viewer: {html}", file=sys.stderr)
    return 0


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return a.resolve() == b.resolve()


def open_rows_file(path: str, *, inputs: Sequence[str | None] = ()) -> Any:
    """Open ``--output`` for appending, after refusing paths that would lose data.

    Args:
        path: the rows file (JSONL); created if missing, appended to if present.
        inputs: files the command reads (``--data``); the rows file may not be one of them.

    Returns:
        The open text file (append mode: existing rows are never truncated).

    Raises:
        CLIError: the path is an input file, a folder, or cannot be written.
    """
    out = Path(path)
    read: list[Path] = []
    for given in inputs:
        if given is not None:
            g = Path(given)
            read += [g, *(g.iterdir() if g.is_dir() else ())]
    for g in read:
        if _same_file(out, g) or out.absolute() == g.absolute():
            raise CLIError(
                f"--output {path!r} is the --data file; rows would overwrite the dataset — "
                f"write them to another file"
            )
    if out.is_dir():
        raise CLIError(f"--output {path!r} is a folder; give a file such as {path}/rows.jsonl")
    if out.exists() and not out.is_file():
        raise CLIError(f"--output {path!r} is not a regular file; give a .jsonl file path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return open(out, "a", encoding="utf-8")
    except OSError as exc:
        raise CLIError(f"cannot write --output {path!r}: {exc.strerror or exc}") from None


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate on a task; print the summary (and append rows to ``--output``)."""
    settings = decode_settings(args)
    task_kwargs: dict[str, Any] = {}
    if args.shots is not None:
        task_kwargs["shots"] = args.shots
    if args.data is not None:
        task_kwargs["data_path"] = args.data
    task = get_task(args.task, **task_kwargs)
    samples = load_samples(task, args.limit, what="--limit")  # reads and checks the data
    out_f = open_rows_file(args.output, inputs=[args.data]) if args.output else None
    try:
        model = _load(args)
        if adopt_preferred_cache(args, model):
            settings = decode_settings(args)
        tags = {"settings": settings.describe()}

        def on_row(row: dict[str, Any]) -> None:
            if out_f is not None:
                out_f.write(json.dumps({**row, **tags}) + "\n")
                out_f.flush()

        res = evaluate(
            model,
            task,
            settings.config,
            samples=samples,
            batch_size=args.batch_size,
            on_row=on_row,
        )
    finally:
        if out_f is not None:
            out_f.close()
    summary = {"task": task.name, "settings": settings.describe(), **res.summary}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        s = res.summary
        print(f"{task.name}: {_settings_line(settings)}")
        print(
            f"  accuracy {s['accuracy']:.3f} (n={s['n']})  "
            f"tokens/s {s['tokens_per_s']:.1f}  NFE/sample {s['nfe_per_sample']:.1f}  "
            f"tokens/NFE {s['tokens_per_nfe']:.2f}  "
            f"token-forwards/sample {s['token_forwards_per_sample']:.0f}"
        )
        for k, v in s.items():
            if k.startswith("accuracy_"):
                print(f"  {k[9:]:<12} {v:.3f}")
    return 0


#: The rules the quickstart compares with one token per step, each at its own defaults.
QUICKSTART_POLICIES: tuple[str, ...] = ("threshold", "factor", "frechet")
#: The quickstart's baseline: ``fixed`` with one token per step.
QUICKSTART_BASELINE = "fixed"


def _short_label(ref: PolicyRef) -> str:
    """``threshold 0.9``: the rule and its parameter values (the quickstart's rows)."""
    values = " ".join(format_value(v) for _, v in sorted(ref.args.items()))
    return f"{ref.bare_name} {values}".strip()


def quickstart_settings(args: argparse.Namespace) -> list[tuple[str, Resolved]]:
    """The quickstart's rows as resolved settings: ``(label, settings)``, baseline first."""
    common = dict(
        cache=_cache_ref(args), gen_length=args.gen_length, block_length=args.block_length
    )
    rows = [
        ("one token per step", resolve(policy=QUICKSTART_BASELINE, steps=args.gen_length, **common))
    ]
    for name in QUICKSTART_POLICIES:
        settings = resolve(policy=name, **common)
        rows.append((_short_label(settings.policy_ref), settings))
    return rows


def plot_path(text: str, default_name: str = "quickstart.png") -> Path | None:
    """The PNG a ``--plot`` value names, checked writable before any work.

    ``''`` means no plot; a folder (existing, or written with a trailing ``/``) gets
    ``default_name`` inside it; a path without a suffix gets ``.png`` (what matplotlib
    would write anyway), so the path printed is the file written.

    Raises:
        CLIError: a suffix other than ``.png``.
        ValueError: a location that cannot be written
            ([`check_writable`][dlm_decode.trace_view.check_writable]).
    """
    if not text:
        return None
    path = Path(text)
    if path.is_dir() or text.endswith(("/", "\\")):
        path = path / default_name
    elif path.suffix == "":
        path = path.with_suffix(".png")
    elif path.suffix.lower() != ".png":
        raise CLIError(f"--plot {text!r} must be a .png file (or a folder, or '' for none)")
    return check_writable(path, "--plot")


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Compare the baseline, threshold, factor and Fréchet on the synthetic suite."""
    rows = quickstart_settings(args)
    plot = plot_path(args.plot)
    model = _load(args)
    if adopt_preferred_cache(args, model):
        rows = quickstart_settings(args)
    task = get_task("synthetic")
    samples = load_samples(task, args.limit, what="--limit")
    results = []
    for label, settings in rows:
        res = evaluate(model, task, settings.config, samples=samples, batch_size=args.batch_size)
        results.append((label, res.summary))
    base = results[0][1]
    lines = [
        f"synthetic held-out, n={base['n']}, model={args.model}, "
        f"cache={rows[0][1].cache_ref.label}, gen_length={args.gen_length}, "
        f"block_length={args.block_length}",
        "",
        "| setting | accuracy | tokens/s | NFE/sample | token-forwards/sample | tokens/NFE "
        "| speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, s in results:
        lines.append(
            f"| {label} | {s['accuracy']:.3f} | {s['tokens_per_s']:.1f} | "
            f"{s['nfe_per_sample']:.1f} | {s['token_forwards_per_sample']:.0f} | "
            f"{s['tokens_per_nfe']:.2f} | {s['tokens_per_s'] / base['tokens_per_s']:.2f}x |"
        )
    print("\n".join(lines))
    if plot is not None:
        _quickstart_plot(results, plot, f"{args.model} model")
        print(f"\nplot: {plot}")
    return 0


def _quickstart_plot(results: list[tuple[str, dict[str, Any]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, s) in enumerate(results):
        ax.scatter(s["tokens_per_s"], s["accuracy"], s=60)
        ax.annotate(  # labels alternate above and below, so close points stay readable
            label,
            (s["tokens_per_s"], s["accuracy"]),
            textcoords="offset points",
            xytext=(6, 4 if i % 2 == 0 else -12),
            fontsize=9,
        )
    ax.margins(x=0.15, y=0.15)
    ax.set_xlabel("tokens/s (response tokens)")
    ax.set_ylabel("exact match")
    ax.set_title(f"{title}, synthetic held-out: throughput vs accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dlm-decode``."""
    p = OneLineParser(
        prog="dlm-decode", description="Fast, pluggable decoding for masked diffusion LMs."
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("plugins", help="list registered policies, caches, models, tasks")
    sp.add_argument("--kind", choices=["policy", "cache", "model", "task"], default=None)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_plugins)

    sp = sub.add_parser("generate", help="generate from one prompt")
    _add_model_args(sp)
    _add_decode_args(sp, gen=64, block=16)
    sp.add_argument(
        "--trace",
        action="store_true",
        help="print each step's block canvas: tokens, _ for masks, the step's commits marked",
    )
    sp.add_argument(
        "--live", action="store_true", help="redraw the response in the terminal as it decodes"
    )
    sp.add_argument(
        "--html",
        default=None,
        metavar="PATH",
        help="write the trace viewer (one self-contained HTML file) here; implies tracing",
    )
    sp.add_argument("--chat", choices=["auto", "yes", "no"], default="auto")
    sp.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="an image for the prompt (repeatable; needs a multimodal model such as llada_v)",
    )
    sp.add_argument("prompt")
    sp.set_defaults(func=cmd_generate)

    sp = sub.add_parser("eval", help="evaluate on a task")
    _add_model_args(sp)
    _add_decode_args(sp, gen=64, block=16)
    sp.add_argument("--task", default="synthetic")
    sp.add_argument("--shots", type=nonnegative_int, default=None)
    sp.add_argument("--limit", type=positive_int, default=None)
    sp.add_argument("--data", default=None, help="local dataset file instead of the hub")
    sp.add_argument("--batch-size", type=positive_int, default=16)
    sp.add_argument("--output", default=None, help="append per-sample rows (JSONL) to this file")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("quickstart", help="the main job on the shipped tiny model")
    _add_model_args(sp)
    sp.add_argument("--limit", type=positive_int, default=200)
    _add_cache_args(sp)
    sp.add_argument("--gen-length", type=positive_int, default=64)
    sp.add_argument("--block-length", type=positive_int, default=16)
    sp.add_argument("--batch-size", type=positive_int, default=50)
    sp.add_argument("--plot", default="quickstart.png", help="PNG path ('' to skip)")
    sp.set_defaults(func=cmd_quickstart)

    sp = sub.add_parser("bench", help="benchmark ms per forward (NFE)")
    bench.add_arguments(sp)
    sp.set_defaults(func=bench.run)
    sp = sub.add_parser("ablate", help="run an ablation sweep from a YAML config")
    ablate_cli.add_arguments(sp)
    sp.set_defaults(func=ablate_cli.run)
    return p


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Show warnings meant for the user (a skipped plugin) as ``dlm-decode: warning: …``."""
    if issubclass(category, PluginLoadWarning):
        print(f"dlm-decode: warning: {message}", file=sys.stderr)
        return
    _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dlm-decode``; returns the exit code."""
    warnings.showwarning = _one_line_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (
        CLIError,
        UnknownPluginError,
        ValueError,
        FileNotFoundError,
        ValidationError,
        OSError,
    ) as exc:
        if args.debug:
            raise
        msg = str(exc).strip().splitlines()
        if isinstance(exc, ValidationError):
            msg = [
                "; ".join(
                    f"{'.'.join(str(x) for x in e['loc']) or 'config'}: {e['msg']}"
                    for e in exc.errors()
                )
            ]
        print(f"dlm-decode: error: {msg[0] if msg else type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dlm-decode: interrupted", file=sys.stderr)
        return 130
