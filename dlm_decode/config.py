"""A decode's settings as data: [`DecodeConfig`][dlm_decode.config.DecodeConfig] (every
knob of a decode, validated before anything touches a device) and the typed plugin
references [`PolicyRef`][dlm_decode.config.PolicyRef] and
[`CacheRef`][dlm_decode.config.CacheRef].

Nothing here looks at the plugin registry; [`dlm_decode.settings`][dlm_decode.settings]
resolves these into ready objects.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "MIN_TEMPERATURE",
    "SEED_MAX",
    "CacheRef",
    "DecodeConfig",
    "PluginRef",
    "PolicyRef",
    "format_value",
    "parse_args",
]


def format_value(value: Any) -> str:
    """How a label writes an argument's value: floats to 12 significant digits (``0.25``,
    never ``0.25000000000000006``), everything else as ``str``."""
    if isinstance(value, float):
        return f"{value:.12g}"
    return str(value)


def parse_args(items: Sequence[str] | None, what: str = "--policy-arg") -> dict[str, Any]:
    """Parse ``["margin=0.25", "eta=0.05"]`` into ``{"margin": 0.25, "eta": 0.05}``.

    Values are read as JSON (numbers, booleans, lists) and fall back to plain strings.

    Args:
        items: ``key=value`` strings.
        what: how to name the option in errors.

    Raises:
        ValueError: an item without ``=`` or without a key.
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} expects key=value (e.g. {what} name=1), got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


class PluginRef(BaseModel):
    """A reference to a registered plugin and its arguments.

    Attributes:
        name: the name as written: ``frechet``, ``frechet.v1`` or a plugin's name.
        args: the plugin's parameters; after resolution validated, with every default.
        key: the versioned registry key (``frechet.v1``), set by
            [`resolve_plugin`][dlm_decode.settings.resolve_plugin]; ``None`` before.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: ``policy`` or ``cache``.
    kind: ClassVar[str] = ""

    name: str = Field(min_length=1)
    args: dict[str, Any] = Field(default_factory=dict)
    key: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return cls._split(value)
        return value

    @classmethod
    def _split(cls, text: str) -> dict[str, Any]:
        name, _, rest = text.strip().partition(":")
        args = parse_args([a for a in rest.split(",") if a], what=f"{cls.kind} argument")
        return {"name": name.strip(), "args": args}

    @classmethod
    def parse(cls, value: Any) -> PluginRef:
        """A reference from ``"name"``, ``"name:k=v,k=v"``, a dict or a reference.

        Raises:
            ValueError: an argument without ``=``.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, PluginRef):
            return cls(name=value.name, args=dict(value.args), key=value.key)
        if isinstance(value, str):  # parse here, so a bad argument is a plain ValueError
            return cls.model_validate(cls._split(value))
        return cls.model_validate(value)

    @property
    def resolved(self) -> bool:
        """Whether the key and validated arguments are filled in."""
        return self.key is not None

    @property
    def bare_name(self) -> str:
        """The name without its version: ``frechet`` for ``frechet.v1``."""
        name = self.key or self.name
        head, _, version = name.rpartition(".v")
        return head if head and version.isdigit() else name

    @property
    def label(self) -> str:
        """A stable, readable label with every argument: ``frechet(margin=0.25)``, ``dual``.

        Arguments are sorted by name, ``None`` (an option left unset) is left out; a
        resolved reference holds every default, so the label of two references differs
        exactly when their plugin or arguments do.
        """
        shown = {k: v for k, v in self.args.items() if v is not None}  # None: not set
        if not shown:
            return self.bare_name
        parts = ", ".join(f"{k}={format_value(v)}" for k, v in sorted(shown.items()))
        return f"{self.bare_name}({parts})"

    def describe(self) -> dict[str, Any]:
        """``name``, ``key``, ``args`` and ``label`` as a JSON-able dict."""
        return {"name": self.name, "key": self.key, "args": dict(self.args), "label": self.label}

    def __str__(self) -> str:
        return self.label


class PolicyRef(PluginRef):
    """A reference to a commit policy: ``PolicyRef(name="threshold", args={"threshold": 0.8})``
    or ``PolicyRef.parse("threshold:threshold=0.8")``."""

    kind: ClassVar[str] = "policy"


class CacheRef(PluginRef):
    """A reference to a cache: ``CacheRef(name="dual")`` or ``CacheRef.parse("dual")``."""

    kind: ClassVar[str] = "cache"


SEED_MAX = 2**63 - 1
"""The largest seed (``torch.Generator.manual_seed`` takes 64-bit seeds)."""

MIN_TEMPERATURE = 1e-6
"""The smallest temperature above 0: below it, ``logits / temperature`` overflows float64
for denormal values (every positive logit becomes ``inf`` and the first one wins), and
sampling is argmax up to rounding anyway; ``0`` is argmax."""


class DecodeConfig(BaseModel):
    """The fields of [`generate`][dlm_decode.decoder.generate]; what experiments serialize.

    ``policy`` and ``cache`` may also be given as a
    [`PolicyRef`][dlm_decode.config.PolicyRef] / [`CacheRef`][dlm_decode.config.CacheRef]
    (or ``"name:k=v"``), which fills in the matching ``*_args`` field.

    Attributes:
        policy: commit policy name (``frechet``, ``frechet.v1``, a plugin's name, …).
        policy_args: the policy's parameters (validated by its pydantic ``Params``); empty
            means the policy's own defaults.
        cache: ``none``, ``prefix``, ``dual`` or a plugin's name.
        cache_args: the cache's parameters (empty: the cache's defaults).
        gen_length: tokens to generate per row; a multiple of ``block_length``.
        block_length: tokens per semi-autoregressive block.
        steps: total denoising steps over all blocks (LLaDA's meaning); required by
            ``fixed``, a multiple of the number of blocks. Other policies ignore it.
        temperature: 0 for argmax; a finite value ≥ ``MIN_TEMPERATURE`` (1e-6) for
            Gumbel-max sampling (float64 noise).
        seed: seed of the Gumbel noise, ``0 ≤ seed ≤ 2**63 − 1``.
        early_stop: once a row has committed EOS and every earlier position is decided,
            fill the rest with EOS and stop spending forwards on it.
        max_steps_per_block: the most steps a block may take before the decode stops with
            an error naming the policy; ``None`` → the policy's
            [`step_budget`][dlm_decode.interfaces.CommitPolicy.step_budget]
            (``block_length``, or ``4 × block_length`` for a policy that revokes).
        trace: record each step's sorted confidence profile and commits.
        profile: synchronize the device around forwards to time them apart from selection.
    """

    model_config = ConfigDict(extra="forbid")

    policy: str = "frechet"
    policy_args: dict[str, Any] = Field(default_factory=dict)
    cache: str = "dual"
    cache_args: dict[str, Any] = Field(default_factory=dict)
    gen_length: int = Field(256, ge=1)
    block_length: int = Field(32, ge=1)
    steps: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    early_stop: bool = False
    max_steps_per_block: int | None = Field(None, ge=1)
    trace: bool = False
    profile: bool = False

    @field_validator("temperature")
    @classmethod
    def _sampling_temperature(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature {value!r} is between 0 and {MIN_TEMPERATURE}, where sampling "
                f"overflows and is argmax anyway; use 0 for argmax or a value ≥ {MIN_TEMPERATURE}"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _split_refs(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for field, ref_type in (("policy", PolicyRef), ("cache", CacheRef)):
            value = data.get(field)
            if isinstance(value, PluginRef) or (isinstance(value, str) and ":" in value):
                ref = ref_type.parse(value)
                if data.get(f"{field}_args"):
                    raise ValueError(
                        f"{field} {value!r} carries its arguments; do not also give {field}_args"
                    )
                data[field] = ref.key or ref.name
                data[f"{field}_args"] = dict(ref.args)
        return data

    @model_validator(mode="after")
    def _check_lengths(self) -> DecodeConfig:
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length={self.gen_length} is not a multiple of "
                f"block_length={self.block_length}; choose e.g. gen_length="
                f"{-(-self.gen_length // self.block_length) * self.block_length}"
            )
        if self.steps is not None:
            blocks = self.num_blocks
            if self.steps % blocks:
                raise ValueError(
                    f"steps={self.steps} is not a multiple of the number of blocks "
                    f"({blocks} = gen_length {self.gen_length} / block_length "
                    f"{self.block_length}); use steps={blocks * max(1, self.steps // blocks)}"
                )
            if self.steps // blocks > self.block_length:
                raise ValueError(
                    f"steps={self.steps} gives {self.steps // blocks} steps per block, more "
                    f"than block_length={self.block_length} tokens; use at most "
                    f"steps={blocks * self.block_length}"
                )
        return self

    @property
    def policy_ref(self) -> PolicyRef:
        """The policy and its arguments as a [`PolicyRef`][dlm_decode.config.PolicyRef]."""
        return PolicyRef(name=self.policy, args=dict(self.policy_args))

    @property
    def cache_ref(self) -> CacheRef:
        """The cache and its arguments as a [`CacheRef`][dlm_decode.config.CacheRef]."""
        return CacheRef(name=self.cache, args=dict(self.cache_args))

    @property
    def num_blocks(self) -> int:
        """Number of blocks, ``gen_length // block_length``."""
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int | None:
        """``steps // num_blocks``, or ``None`` without a step budget."""
        return None if self.steps is None else self.steps // self.num_blocks
