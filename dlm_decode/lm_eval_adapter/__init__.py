"""An lm-evaluation-harness model backed by the dlm_decode Decoder (optional extra ``eval``).

Importing this module registers the model name ``dlm_decode`` with lm-eval. Generative
tasks (``output_type: generate_until``: GSM8K, MATH, HumanEval, MBPP, …) run through
[`Decoder`][dlm_decode.decoder.Decoder], batched; log-likelihood tasks are not supported
(a masked diffusion model has no left-to-right likelihood to score choices with).

Command line (this module imports the adapter, then runs lm-eval's own CLI)::

    python -m dlm_decode.lm_eval_adapter --model dlm_decode \\
        --model_args model=GSAI-ML/LLaDA-8B-Instruct,policy=frechet,margin=0.25,cache=dual,\\
gen_length=256,block_length=32 \\
        --tasks gsm8k --num_fewshot 5 --batch_size 8

(``python -m dlm_decode.lm_eval_adapter`` imports this package once, registering the
model, then runs ``__main__``: lm-eval's own command line.)

Python::

    import lm_eval
    import dlm_decode.lm_eval_adapter  # registers "dlm_decode"

    lm_eval.simple_evaluate(model="dlm_decode", model_args="model=tiny", tasks=["gsm8k"])

Model arguments (``--model_args``): ``model`` (``tiny``, a folder or a hub id), ``device``,
``dtype``, every [`DecodeConfig`][dlm_decode.config.DecodeConfig] field (``policy``,
``cache``, ``gen_length``, ``block_length``, ``steps``, ``temperature``, ``seed``,
``early_stop``), cache parameters as ``cache.NAME=value``, and the policy's parameters by
name (``margin=0.25``, ``threshold=0.9``, …; omitted ones take the policy's defaults).
``gen_length`` defaults to each request's ``max_gen_toks`` rounded up to a multiple of
``block_length``; with neither, to the configured default, lowered to the largest multiple
of ``block_length`` that fits after the group's longest prompt within the model's maximum
length. An explicit length that does not fit, a ``max_gen_toks`` below 1, and
``gen_kwargs`` of the wrong type are one-line ``ValueError`` s before that group decodes.
``python -m dlm_decode.lm_eval_adapter`` passes ``--device`` to lm-eval when it is not
given (``cpu`` without CUDA), so ``results.json`` records the device that ran.

Decode metrics: every ``generate_until`` call adds its NFE, token-forwards, response tokens
and decode time to the model's counters
([`DLMDecodeLM.decode_metrics`][dlm_decode.lm_eval_adapter.DLMDecodeLM.decode_metrics]).
At the end of ``python -m dlm_decode.lm_eval_adapter`` they are written to
``dlm_decode_metrics.json`` beside lm-eval's output (in ``--output_path``, or the folder of
an ``--output_path`` ending in ``.json``; the current folder without one) and summed up in
one line on stderr; from Python, call
[`write_decode_metrics`][dlm_decode.lm_eval_adapter.DLMDecodeLM.write_decode_metrics].
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (fills lm-eval's lazy registry before we add to it)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from dlm_decode.config import CacheRef, DecodeConfig, PolicyRef
from dlm_decode.decoder import Decoder
from dlm_decode.models.loading import load_model, resolve_device
from dlm_decode.settings import resolve
from dlm_decode.tasks.common import truncate_at

__all__ = [
    "METRICS_FILE",
    "DLMDecodeLM",
    "check_gen_kwargs",
    "main",
    "metrics_path",
    "metrics_summary",
    "with_device",
]

#: The decode metrics' file name (written beside lm-eval's output).
METRICS_FILE = "dlm_decode_metrics.json"
#: The decode counters of every adapter model built (small dicts, not the models), so
#: ``main`` finds those of the model lm-eval built and dropped.
_COUNTERS: list[dict[str, Any]] = []

_NOT_GENERATIVE = (
    "masked diffusion models are evaluated generatively here; use generate_until tasks "
    "(output_type: generate_until)"
)
#: DecodeConfig fields a user may set through model args (the rest are internal).
_CONFIG_FIELDS = (
    "policy",
    "cache",
    "gen_length",
    "block_length",
    "steps",
    "temperature",
    "seed",
    "early_stop",
)


class DLMDecodeLM(LM):
    """lm-eval model that generates with a dlm_decode [`Decoder`][dlm_decode.decoder.Decoder].

    Args:
        model: ``tiny``, a checkpoint folder or a Hugging Face hub id; or an already loaded
            [`Model`][dlm_decode.interfaces.Model].
        device: ``cpu``, ``cuda``, ``cuda:1`` … (default: CUDA when available).
        dtype: weight dtype name (default: the checkpoint's).
        batch_size: prompts decoded together (lm-eval's ``--batch_size``; ``auto`` is read
            as 1).
        max_batch_size: accepted for lm-eval compatibility; unused.
        **kwargs: ``DecodeConfig`` fields (``policy``, ``cache``, ``gen_length``,
            ``block_length``, ``steps``, ``temperature``, ``seed``, ``early_stop``), cache
            parameters as ``cache.NAME``, and anything else as a policy parameter.

    Raises:
        ValueError: unknown policy/cache or invalid parameters (checked before the model
            loads).
    """

    def __init__(
        self,
        model: Any = "tiny",
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        fields = {k: kwargs.pop(k) for k in _CONFIG_FIELDS if k in kwargs}
        cache_args = {
            k.split(".", 1)[1]: kwargs.pop(k) for k in list(kwargs) if k.startswith("cache.")
        }
        defaults = DecodeConfig.model_fields
        policy = PolicyRef(
            name=str(fields.pop("policy", defaults["policy"].default)), args=dict(kwargs)
        )
        cache = CacheRef(name=str(fields.pop("cache", defaults["cache"].default)), args=cache_args)
        self._gen_length: int | None = fields.pop("gen_length", None)
        if self._gen_length:
            fields["gen_length"] = self._gen_length
        try:
            self.settings = resolve(policy=policy, cache=cache, **fields)
        except ValueError as exc:
            if "needs 'steps'" in str(exc):
                raise ValueError(
                    f"policy {policy.name!r} needs the model arg steps=… (e.g. steps="
                    f"{self._gen_length or defaults['gen_length'].default})"
                ) from None
            raise
        self._base = self.settings.config
        try:
            self.batch_size = max(1, int(batch_size))
        except (TypeError, ValueError):
            self.batch_size = 1
        if isinstance(model, str):
            try:
                dev = resolve_device(device)
            except ValueError as exc:
                raise ValueError(f"{exc} (--device, or device=… in --model_args)") from None
            self.model = load_model(model, device=dev, dtype=dtype)
            self._name = model
        else:
            self.model = model
            self._name = type(model).__name__
        if self.model.tokenizer is None:
            raise ValueError(
                f"model {self._name!r} has no tokenizer; lm-eval needs text in and out "
                f"(put tokenizer.json in the checkpoint folder)"
            )
        self._device = self.model.device
        self._counts = {
            "generate_until_calls": 0,
            "requests": 0,
            "nfe": 0,
            "token_forwards": 0,
            "response_tokens": 0,
            "decode_s": 0.0,
            "model": self._name,
            "settings": self.settings.describe(),
        }
        _COUNTERS.append(self._counts)

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, Any] | None = None
    ) -> DLMDecodeLM:
        """Build from ``key=value,…`` model args; they override lm-eval's own settings."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> DLMDecodeLM:
        """Build from a dict of model args merged over lm-eval's (``batch_size``, ``device``).

        lm-eval always passes ``device`` (``cuda:0`` by default); ``device`` in the model
        args takes precedence instead of clashing with it.
        """
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    # -- configuration --------------------------------------------------------------------

    def config_for(self, gen_kwargs: dict[str, Any], prompt_length: int = 0) -> DecodeConfig:
        """The decode config of one request group (``max_gen_toks``, sampling).

        Args:
            gen_kwargs: the group's lm-eval generation arguments.
            prompt_length: the group's longest prompt, in tokens (what must fit beside the
                generated positions within the model's maximum length).

        Raises:
            ValueError: ``gen_kwargs`` of the wrong type, ``max_gen_toks`` below 1, or a
                requested length that does not fit after the prompt.
        """
        check_gen_kwargs(gen_kwargs)
        over: dict[str, Any] = {}
        block = self._base.block_length
        room = self.model.max_length - prompt_length  # positions left for generation
        fits = room // block * block
        if self._gen_length is not None:
            want, what = self._gen_length, f"gen_length={self._gen_length}"
        elif "max_gen_toks" in gen_kwargs:
            want = -(-gen_kwargs["max_gen_toks"] // block) * block
            what = f"max_gen_toks={gen_kwargs['max_gen_toks']} (rounded up to {want})"
        else:  # nothing asked: the default, lowered to what fits
            want, what = min(self._base.gen_length, max(fits, block)), None
        if want > room:
            raise ValueError(
                f"{what or f'gen_length {want}'} does not fit after a {prompt_length}-token "
                f"prompt within {self._name}'s maximum length {self.model.max_length}; "
                f"use gen_length={fits} or less in --model_args"
                if fits >= block
                else f"a {prompt_length}-token prompt leaves no room for one block of "
                f"{block} within {self._name}'s maximum length {self.model.max_length}; "
                f"use fewer shots or a smaller block_length"
            )
        if want != self._base.gen_length:
            over["gen_length"] = want
        temp = gen_kwargs.get("temperature")
        if gen_kwargs.get("do_sample") and temp:
            over["temperature"] = float(temp)
        if not over:
            return self._base
        cfg = self._base.model_copy(update=over)
        return DecodeConfig.model_validate(cfg.model_dump())

    # -- lm-eval API ------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        """Identifies the tokenizer in lm-eval's request cache keys."""
        return self._name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The tokenizer's chat template (``""`` when it has none)."""
        return getattr(self.model.tokenizer, "chat_template", None) or ""

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render a chat with the tokenizer's template (for ``--apply_chat_template``)."""
        return self.model.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list:
        """Not supported: raises ``NotImplementedError``."""
        raise NotImplementedError(_NOT_GENERATIVE)

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list:
        """Not supported: raises ``NotImplementedError``."""
        raise NotImplementedError(_NOT_GENERATIVE)

    def _encode(self, context: str) -> list[int]:
        tok = self.model.tokenizer
        bos = getattr(tok, "bos_token", None)
        # A chat-templated context already starts with BOS; do not add a second one.
        add = not (bos and context.startswith(bos))
        ids = list(tok.encode(context, add_special_tokens=add))
        return ids or [self.model.pad_token_id]

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Generate for every request and cut each text at its ``until`` strings.

        Requests are grouped by generation arguments and decoded ``batch_size`` at a time
        (longest prompts first); results come back in request order.

        Args:
            requests: lm-eval ``Instance`` objects with ``args = (context, gen_kwargs)``.
            disable_tqdm: hide the progress bar.

        Returns:
            One continuation per request.
        """
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            args = getattr(req, "args", None)
            if not (isinstance(args, tuple) and len(args) == 2 and isinstance(args[0], str)):
                raise ValueError(
                    f"request {i}: generate_until expects args (context: str, gen_kwargs: "
                    f"dict), got {args!r:.60}"
                )
            check_gen_kwargs(args[1], where=f"request {i}")
            groups.setdefault(repr(sorted(args[1].items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="dlm_decode", disable=disable_tqdm or self.rank)
        for idx in groups.values():
            gen_kwargs = dict(requests[idx[0]].args[1])
            until = gen_kwargs.get("until") or []
            if isinstance(until, str):
                until = [until]
            encoded = {i: self._encode(requests[i].args[0]) for i in idx}
            longest = max(len(v) for v in encoded.values())
            decoder = Decoder(self.model, self.config_for(gen_kwargs, longest))
            order = sorted(idx, key=lambda i: -len(encoded[i]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                res = decoder.generate([encoded[i] for i in chunk])
                self._count(res)
                for i, text in zip(chunk, res.texts(self.model.tokenizer), strict=True):
                    text = truncate_at(text, until)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        self._counts["generate_until_calls"] += 1
        return [t if t is not None else "" for t in out]

    # -- decode metrics ---------------------------------------------------------------------

    def _count(self, res: Any) -> None:
        c = self._counts
        c["requests"] += int(res.sequences.shape[0])
        c["nfe"] += int(res.nfe)
        c["token_forwards"] += int(res.token_forwards)
        c["response_tokens"] += int(res.response_lengths().sum())
        c["decode_s"] += float(res.timings["total_s"])

    def decode_metrics(self) -> dict[str, Any]:
        """The decode's cost over every ``generate_until`` call so far.

        Returns:
            ``nfe`` (model forwards), ``tokens_per_nfe`` (response tokens per forward),
            ``token_forwards`` (positions the forwards computed), ``tokens_per_s``
            (response tokens per second of decoding), the raw counts (``requests``,
            ``response_tokens``, ``decode_s``, ``generate_until_calls``), the model and
            the decode settings.
        """
        return _metrics(self._counts)

    def write_decode_metrics(self, path: str | Path | None = None) -> Path:
        """Write [`decode_metrics`][dlm_decode.lm_eval_adapter.DLMDecodeLM.decode_metrics] as
        JSON.

        Args:
            path: the file, or a folder to write ``dlm_decode_metrics.json`` in (default:
                the current folder).

        Returns:
            The file written.
        """
        out = Path.cwd() / METRICS_FILE if path is None else Path(path)
        if out.is_dir() or out.suffix != ".json":
            out = out / METRICS_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        return _write_metrics(self.decode_metrics(), out)


def _metrics(counts: dict[str, Any]) -> dict[str, Any]:
    c = dict(counts)
    c["tokens_per_nfe"] = c["response_tokens"] / c["nfe"] if c["nfe"] else 0.0
    c["tokens_per_s"] = c["response_tokens"] / c["decode_s"] if c["decode_s"] else 0.0
    return c


def _write_metrics(metrics: dict[str, Any], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    return out


def check_gen_kwargs(gen_kwargs: Any, where: str = "gen_kwargs") -> None:
    """Check lm-eval generation arguments before decoding.

    Args:
        gen_kwargs: a request's generation arguments.
        where: the request, for messages.

    Raises:
        ValueError: not a dict; ``until`` not a string or list of strings;
            ``max_gen_toks`` not an integer ≥ 1; ``temperature`` not a finite number ≥ 0;
            ``do_sample`` not a bool.
    """
    if not isinstance(gen_kwargs, dict):
        raise ValueError(
            f"{where}: gen_kwargs must be a dict such as {{'until': ['\\n'], "
            f"'max_gen_toks': 256}}, got {type(gen_kwargs).__name__}"
        )
    until = gen_kwargs.get("until")
    if until is not None and not (
        isinstance(until, str)
        or (isinstance(until, (list, tuple)) and all(isinstance(u, str) for u in until))
    ):
        raise ValueError(f"{where}: until must be a string or a list of strings, got {until!r}")
    if "max_gen_toks" in gen_kwargs:
        n = gen_kwargs["max_gen_toks"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(
                f"{where}: max_gen_toks must be an integer ≥ 1 (tokens to generate), got {n!r}"
            )
    temp = gen_kwargs.get("temperature")
    if temp is not None and (
        isinstance(temp, bool)
        or not isinstance(temp, (int, float))
        or not math.isfinite(temp)
        or temp < 0
    ):
        raise ValueError(f"{where}: temperature must be a finite number ≥ 0, got {temp!r}")
    sample = gen_kwargs.get("do_sample")
    if sample is not None and not isinstance(sample, bool):
        raise ValueError(f"{where}: do_sample must be true or false, got {sample!r}")


def with_device(argv: Sequence[str]) -> list[str]:
    """lm-eval's arguments with ``--device`` added when absent (lm-eval would record its
    own default, ``cuda:0``, in ``results.json`` even for a CPU run).

    A ``device=`` in ``--model_args`` wins, as in
    [`DLMDecodeLM`][dlm_decode.lm_eval_adapter.DLMDecodeLM]; otherwise the device is
    ``cuda`` when one is available, else ``cpu``.
    """
    args = list(argv)
    if any(a == "--device" or a.startswith("--device=") for a in args):
        return args
    model_args = next(
        (args[i + 1] for i, a in enumerate(args[:-1]) if a == "--model_args"),
        next((a.split("=", 1)[1] for a in args if a.startswith("--model_args=")), ""),
    )
    given = [kv.split("=", 1)[1] for kv in model_args.split(",") if kv.startswith("device=")]
    return [*args, "--device", given[0] if given else resolve_device(None)]


def metrics_path(argv: Sequence[str]) -> Path:
    """Where ``main`` writes the decode metrics for lm-eval arguments ``argv``: in
    ``--output_path`` (a folder), beside it (a ``.json`` file), or in the current folder."""
    args = list(argv)
    given = next(
        (args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--output_path", "-o")),
        next((a.split("=", 1)[1] for a in args if a.startswith("--output_path=")), None),
    )
    if not given:
        return Path.cwd() / METRICS_FILE
    out = Path(given)
    return (out.parent if out.suffix == ".json" else out) / METRICS_FILE


def metrics_summary(metrics: dict[str, Any]) -> str:
    """One line: ``dlm_decode metrics: 40 requests, NFE 312, 5.13 tokens/NFE, …``."""
    return (
        f"dlm_decode metrics: {metrics['requests']} requests, NFE {metrics['nfe']}, "
        f"{metrics['tokens_per_nfe']:.2f} tokens/NFE, {metrics['token_forwards']} "
        f"token-forwards, {metrics['tokens_per_s']:.1f} tokens/s"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run lm-eval's command line with the ``dlm_decode`` model registered (and
    ``--device`` filled in, see [`with_device`][dlm_decode.lm_eval_adapter.with_device]),
    then write the decode metrics beside lm-eval's output
    ([`metrics_path`][dlm_decode.lm_eval_adapter.metrics_path]) and print their summary."""
    from lm_eval.__main__ import cli_evaluate

    args = with_device(sys.argv[1:] if argv is None else argv)
    sys.argv = [sys.argv[0], *args]
    first = len(_COUNTERS)
    try:
        cli_evaluate()
    finally:
        for counts in [c for c in _COUNTERS[first:] if c["nfe"]]:
            metrics = _metrics(counts)
            path = _write_metrics(metrics, metrics_path(args))
            print(f"{metrics_summary(metrics)} (written to {path})", file=sys.stderr)


register_model("dlm_decode")(DLMDecodeLM)
