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
``block_length``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401  (fills lm-eval's lazy registry before we add to it)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from dlm_decode.config import CacheRef, DecodeConfig, PolicyRef
from dlm_decode.decoder import Decoder
from dlm_decode.models.loading import load_model
from dlm_decode.settings import resolve
from dlm_decode.tasks.common import truncate_at

__all__ = ["DLMDecodeLM", "main"]

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
            dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
            if dev.startswith("cuda") and not torch.cuda.is_available():
                raise ValueError(
                    f"device {dev!r}: no CUDA device is available here; pass --device cpu "
                    f"(or device=cpu in --model_args)"
                )
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

    def config_for(self, gen_kwargs: dict[str, Any]) -> DecodeConfig:
        """The decode config of one request group (``max_gen_toks``, sampling)."""
        over: dict[str, Any] = {}
        block = self._base.block_length
        if self._gen_length is None:
            want = int(gen_kwargs.get("max_gen_toks", self._base.gen_length))
            over["gen_length"] = max(block, -(-want // block) * block)
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
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="dlm_decode", disable=disable_tqdm or self.rank)
        for idx in groups.values():
            gen_kwargs = dict(requests[idx[0]].args[1])
            until = gen_kwargs.get("until") or []
            if isinstance(until, str):
                until = [until]
            decoder = Decoder(self.model, self.config_for(gen_kwargs))
            encoded = {i: self._encode(requests[i].args[0]) for i in idx}
            order = sorted(idx, key=lambda i: -len(encoded[i]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                res = decoder.generate([encoded[i] for i in chunk])
                for i, text in zip(chunk, res.texts(self.model.tokenizer), strict=True):
                    text = truncate_at(text, until)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return [t if t is not None else "" for t in out]


def main(argv: Sequence[str] | None = None) -> None:
    """Run lm-eval's command line with the ``dlm_decode`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


register_model("dlm_decode")(DLMDecodeLM)
