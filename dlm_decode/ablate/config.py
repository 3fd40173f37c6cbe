"""The ablation config: a pydantic model of the YAML file, its grid expansion and validation.

A config names a model, tasks, caches, gen/block lengths, seeds and a policy grid. The
grid expands into *runs*; a run is one policy × params × cache × task × gen/block × seed.
Each run has a stable ``run_id`` (a hash of everything that changes its outputs, and
nothing that does not: the sample limit, the batch size and logging options are left out),
so a sweep can be resumed, extended with more samples, or extended with new settings.

Validation happens in two passes, both before any model loads:

1. structure (pydantic, ``extra="forbid"``): unknown keys, wrong types, out-of-range
   values;
2. the plugin registry: every policy, cache and task name must be registered and every
   policy/cache parameter must pass the plugin's own ``Params`` model.

Every problem is reported with its YAML path, e.g. ``policies[2].args.margin: Input should
be greater than or equal to 0``.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from dlm_decode.config import CacheRef, DecodeConfig, PolicyRef
from dlm_decode.evaluate import check_task_options
from dlm_decode.registry import (
    UnknownPluginError,
    entry_point_plugins,
    get_registry,
    reset_registry,
)
from dlm_decode.settings import Resolved, param_problems, plugin_class, resolve
from dlm_decode.tasks.base import check_limit

__all__ = [
    "AblationConfig",
    "AblationConfigError",
    "AuditSpec",
    "BaselineSpec",
    "CounterfactualSpec",
    "LengthSpec",
    "MatchedSpec",
    "ModelSpec",
    "PlotSpec",
    "PolicyGrid",
    "RunSpec",
    "Setting",
    "TaskSpec",
    "WandbSpec",
    "baseline_matches",
    "cache_matches",
    "check_batch_size",
    "check_sweep_name",
    "expand_runs",
    "expand_settings",
    "load_config",
    "load_plugins",
    "resolve_setting",
    "setting_label",
    "validate_config",
]

_DEFAULT_POLICY: str = DecodeConfig.model_fields["policy"].default
_DEFAULT_CACHE: str = DecodeConfig.model_fields["cache"].default


class AblationConfigError(ValueError):
    """An invalid ablation config; the message names the YAML path of every bad field."""

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"invalid ablation config {where}" + "; ".join(self.problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """Which model to load.

    Attributes:
        name: ``tiny``, a local checkpoint folder or a hub id.
        device: ``cpu``, ``cuda``, ``cuda:1``…; ``None`` → CUDA when available.
        dtype: ``float32``, ``bfloat16``, …; ``None`` → the checkpoint's default.
        threads: CPU threads for torch (``torch.set_num_threads``); ``None`` → torch's
            default. Small models on shared CPUs run fastest with 1.
    """

    name: str = "tiny"
    device: str | None = None
    dtype: str | None = None
    threads: int | None = Field(None, ge=1)


class TaskSpec(_Strict):
    """One evaluation task.

    Attributes:
        name: registered task name (``synthetic``, ``gsm8k``, …).
        shots: few-shot examples (passed to the task as ``shots``).
        limit: evaluate the first ``limit`` samples (``None`` → all).
        data_path: a local dataset file instead of the hub.
        args: any other constructor arguments of the task.
    """

    name: str
    shots: int | None = Field(None, ge=0)
    limit: int | None = None
    data_path: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("limit")
    @classmethod
    def _positive_limit(cls, v: int | None) -> int | None:
        try:
            return check_limit(v, "limit")
        except ValueError as exc:
            raise ValueError(str(exc).removeprefix("limit ")) from None

    def task_kwargs(self) -> dict[str, Any]:
        """Constructor arguments for ``get_task``."""
        kw = dict(self.args)
        if self.shots is not None:
            kw["shots"] = self.shots
        if self.data_path is not None:
            kw["data_path"] = self.data_path
        return kw


class LengthSpec(_Strict):
    """Generation and block length of a run."""

    gen_length: int = Field(ge=1)
    block_length: int = Field(ge=1)


class MatchedSpec(_Strict):
    """Matched settings: for every margin δ, each listed policy at the parameters its class
    says correspond to δ
    ([`params_for_margin`][dlm_decode.interfaces.CommitPolicy.params_for_margin]).

    The default pairs ``factor`` with ``f = 1 − δ`` and ``frechet`` with margin δ: with
    equal confidences the two rules coincide; on real profiles ``frechet`` commits at least
    as much (its heterogeneity bonus), which is what the Fast-dLLM++ paper compares.
    """

    margins: list[float] = Field(min_length=1)
    policies: list[str] = Field(default_factory=lambda: ["factor", "frechet"], min_length=1)

    @field_validator("margins")
    @classmethod
    def _in_range(cls, v: list[float]) -> list[float]:
        bad = [m for m in v if not 0.0 <= m < 1.0]
        if bad:
            raise ValueError(f"every margin must lie in [0, 1) (so that f = 1 − δ > 0): {bad}")
        return v


class PolicyGrid(_Strict):
    """One entry of the policy grid: either a policy with params, or ``matched`` pairs.

    Attributes:
        policy: registered policy name (``threshold``, ``frechet.v1``, a plugin's).
        args: params; a list value is a grid axis (lists of several keys form a product).
        steps: total denoising steps (``DecodeConfig.steps``); for policies that need a
            step budget (``fixed``) the default is ``gen_length``, i.e. one token per step.
        family: the family label used in plots (default: the policy name).
        matched: matched factor/frechet pairs instead of ``policy``.
    """

    policy: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    steps: int | list[int] | None = None
    family: str | None = None
    matched: MatchedSpec | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> PolicyGrid:
        if (self.policy is None) == (self.matched is None):
            raise ValueError("give either 'policy' (with 'args') or 'matched', not both")
        if self.matched is not None and (self.args or self.steps is not None):
            raise ValueError("'matched' takes no 'args' or 'steps'")
        steps = self.steps if isinstance(self.steps, list) else [self.steps]
        if any(s is not None and s < 1 for s in steps):
            raise ValueError("steps must be ≥ 1")
        return self


class Setting(_Strict):
    """One policy setting: a policy reference, its step budget and its plot family.

    Written in YAML flat, ``{policy: frechet, args: {margin: 0.2}, steps: 64}`` (or just a
    name); the grid's entries expand into settings too.

    Attributes:
        policy: the policy and its arguments as written (resolved per run).
        steps: the total step budget (``DecodeConfig.steps``); ``None`` → one token per
            step (``gen_length``) for a policy that needs a budget, else none.
        family: the family label in plots (default: the policy's bare name).
    """

    policy: PolicyRef
    steps: int | None = Field(None, ge=1)
    family: str | None = None
    _source: str = PrivateAttr("")
    _arg_paths: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"policy": {"name": value}}
        if isinstance(value, dict) and isinstance(value.get("policy"), str):
            value = dict(value)
            value["policy"] = {"name": value.pop("policy"), "args": value.pop("args", {})}
        return value

    @classmethod
    def at(
        cls,
        policy: PolicyRef,
        steps: int | None,
        family: str | None,
        source: str,
        arg_paths: dict[str, str] | None = None,
    ) -> Setting:
        """A setting that remembers the YAML path it came from (for error messages)."""
        st = cls(policy=policy, steps=steps, family=family)
        st._source, st._arg_paths = source, dict(arg_paths or {})
        return st

    @property
    def source(self) -> str:
        """YAML path of the entry this setting came from."""
        return self._source

    @property
    def arg_paths(self) -> dict[str, str]:
        """YAML path of each argument's value."""
        return self._arg_paths

    @property
    def family_label(self) -> str:
        """``family``, or the policy's bare name."""
        return self.family or self.policy.bare_name

    @property
    def label(self) -> str:
        """``frechet(margin=0.25)``, ``fixed(steps=64)``: the policy's label plus steps."""
        return setting_label(self.policy, self.steps)


def setting_label(policy: PolicyRef, steps: int | None) -> str:
    """A policy's [`label`][dlm_decode.config.PluginRef.label] with a step budget added:
    ``fixed(steps=64)``, ``threshold(threshold=0.9)``."""
    if steps is None:
        return policy.label
    args = {**policy.args, "steps": steps}
    return PolicyRef(name=policy.bare_name, args=args).label


class BaselineSpec(_Strict):
    """Selects the baseline row that speed-up and NFE reduction are relative to.

    A run's baseline is the run with the same task, gen/block length and seed whose policy
    is ``policy`` and whose params include ``args``; its cache is ``cache`` (a name, a
    versioned key or a label such as ``dual``), or the run's own cache (with its
    arguments) when ``cache`` is ``None``.
    """

    policy: str
    args: dict[str, Any] = Field(default_factory=dict)
    cache: str | None = None


class CounterfactualSpec(_Strict):
    """Counterfactual trace: one decode, every policy's count at every step.

    Attributes:
        enabled: run it after the sweep.
        driver: the policy that actually decodes.
        policies: the policies whose counts are recorded; ``None`` → every setting of the
            grid.
        samples: number of samples (from the start of each task).
    """

    enabled: bool = False
    driver: Setting = Field(default_factory=lambda: Setting(policy=PolicyRef(name=_DEFAULT_POLICY)))
    policies: list[Setting] | None = None
    samples: int = Field(2, ge=1)


class AuditSpec(_Strict):
    """Commit audit: re-decode each parallel commit one token at a time and compare.

    Attributes:
        enabled: run it after the sweep.
        samples: number of samples per task.
        every: audit every ``every``-th step of a decode.
        max_steps: at most this many audited steps per decode (``None`` → all).
        cache: cache of the audited decodes (``none`` isolates the commit rule from the
            cache's approximation).
        policies: settings to audit; ``None`` → every setting of the grid.
    """

    enabled: bool = False
    samples: int = Field(2, ge=1)
    every: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    cache: CacheRef = Field(default_factory=lambda: CacheRef(name="none"))
    policies: list[Setting] | None = None


class WandbSpec(_Strict):
    """Weights & Biases options.

    Attributes:
        enabled: log to W&B (``--no-wandb`` overrides).
        project: project name.
        entity: team or user; ``None`` → the default.
        mode: ``online``, ``offline`` or ``disabled``; ``None`` → ``WANDB_MODE`` if set,
            online when an API key is configured, otherwise offline.
        group: run group; default the sweep name.
        tags: extra tags.
    """

    enabled: bool = True
    project: str = "dlm-decode-ablations"
    entity: str | None = None
    mode: Literal["online", "offline", "disabled"] | None = None
    group: str | None = None
    tags: list[str] = Field(default_factory=list)


class PlotSpec(_Strict):
    """Which plots to draw.

    Attributes:
        enabled: draw the plots.
        example_sample: index of the sample whose decode the per-step plots show.
        profile_policy: the policy of the traced decode behind the profile plot.
        profile_steps: number of steps shown in the profile plot.
    """

    enabled: bool = True
    example_sample: int = Field(0, ge=0)
    profile_policy: Setting = Field(
        default_factory=lambda: Setting(policy=PolicyRef(name=_DEFAULT_POLICY))
    )
    profile_steps: int = Field(3, ge=1, le=8)


class PaperRow(_Strict):
    """One published row.

    Attributes:
        table: where it is published (``Table 1``, ``Figure 2``).
        task: the task name (``gsm8k``, ``math``, ``humaneval``, ``mbpp``).
        shots: the task's shots (``None`` matches any).
        gen_length: tokens generated.
        cache: the cache name (``none``, ``prefix``, ``dual``).
        policy: the policy's bare name (``threshold``, ``factor``, ``frechet``).
        args: policy arguments the run must have (e.g. ``{factor: 1.0}``); empty matches
            the policy at any arguments.
        accuracy: accuracy in percent, as published.
        tokens_per_s: throughput, as published.
        total_nfe: total NFE over the task, as published.
        tokens_per_nfe: tokens per NFE, as published.
    """

    table: str
    task: str
    shots: int | None = None
    gen_length: int = Field(ge=1)
    cache: str
    policy: str
    args: dict[str, Any] = Field(default_factory=dict)
    accuracy: float | None = None
    tokens_per_s: float | None = None
    total_nfe: int | None = None
    tokens_per_nfe: float | None = None


class PaperSpec(_Strict):
    """The ``paper:`` section of a sweep config.

    Attributes:
        source: the paper (and version) the figures come from.
        baseline: the policy the paper's ratios are relative to (``threshold``).
        rows: the published rows this config reproduces.
    """

    source: str
    baseline: str = "threshold"
    rows: list[PaperRow] = Field(min_length=1)


def _bare(policy_key: str) -> str:
    return policy_key.split(".v")[0]


def _args_match(want: dict[str, Any], have: dict[str, Any]) -> bool:
    return all(
        k in have
        and (have[k] == v or (_is_num(v) and _is_num(have[k]) and math.isclose(v, have[k])))
        for k, v in want.items()
    )


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class AblationConfig(_Strict):
    """An ablation sweep (the YAML file).

    Attributes:
        name: sweep name (default output folder ``runs/<name>``).
        description: free text.
        plugins: extra plugin modules to register (``my_pkg.plugin``), e.g. a custom task.
        model: the model.
        tasks: tasks to evaluate.
        caches: caches to compare.
        lengths: gen/block length pairs.
        seeds: decode seeds.
        temperature: 0 for greedy; > 0 samples (each sample then decodes alone, seeded
            from the seed and its id, so resuming cannot change its noise).
        early_stop: stop spending forwards on rows that emitted EOS.
        batch_size: prompts decoded together.
        baseline: the row speed-ups are relative to.
        policies: the policy grid.
        counterfactual: counterfactual trace options.
        audit: commit audit options.
        wandb: W&B options.
        plots: plot options.
        paper: published figures this sweep reproduces (see
            [`PaperSpec`][dlm_decode.ablate.config.PaperSpec]); the report ``paper.md``
            puts ours beside them.
    """

    name: str
    description: str = ""
    plugins: list[str] = Field(default_factory=list)
    model: ModelSpec = Field(default_factory=ModelSpec)
    tasks: list[TaskSpec] = Field(min_length=1)
    caches: list[CacheRef] = Field(
        default_factory=lambda: [CacheRef(name=_DEFAULT_CACHE)], min_length=1
    )
    lengths: list[LengthSpec] = Field(
        default_factory=lambda: [LengthSpec(gen_length=256, block_length=32)], min_length=1
    )
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    temperature: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    early_stop: bool = False
    batch_size: int = 16
    baseline: BaselineSpec | None = None
    policies: list[PolicyGrid] = Field(min_length=1)
    counterfactual: CounterfactualSpec = Field(default_factory=CounterfactualSpec)
    audit: AuditSpec = Field(default_factory=AuditSpec)
    wandb: WandbSpec = Field(default_factory=WandbSpec)
    plots: PlotSpec = Field(default_factory=PlotSpec)
    paper: PaperSpec | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_sweep_name(v)

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, v: int) -> int:
        try:
            return check_batch_size(v, "batch_size")
        except ValueError as exc:
            raise ValueError(str(exc).removeprefix("batch_size ")) from None


_SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def check_sweep_name(name: str) -> str:
    """Refuse a sweep name that is not a safe folder name (it names ``runs/<name>``).

    Args:
        name: the ``name`` of the config (or the file's stem).

    Returns:
        ``name``.

    Raises:
        ValueError: empty, ``.`` or ``..``, or a character other than letters, digits
            and ``._-`` (so no path separators).
    """
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"{name!r} is not a safe sweep name (it names the folder runs/<name>): use "
            f"letters, digits and . _ - only, not '.' or '..', e.g. 'my_sweep'"
        )
    return name


def check_batch_size(value: object, what: str = "batch_size") -> int:
    """Refuse a batch size that is not a positive integer (``0`` or ``-1`` decode nothing).

    Args:
        value: the batch size.
        what: its name in the message (``batch_size``, ``--batch-size``).

    Returns:
        ``value``.

    Raises:
        ValueError: not an integer ≥ 1.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{what} must be a positive integer (prompts decoded together), got {value!r}"
        )
    return value


# --------------------------------------------------------------------------------------
# Loading and error paths
# --------------------------------------------------------------------------------------


def _path(loc: Sequence[Any]) -> str:
    """``('policies', 2, 'args', 'margin')`` → ``policies[2].args.margin``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(config)"


def _pydantic_problems(exc: ValidationError, prefix: Sequence[Any] = ()) -> list[str]:
    problems = []
    for err in exc.errors():
        # Drop pydantic's internal union/function tags from the location.
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see docs/guides/ablations.md)"
        problems.append(f"{_path([*prefix, *loc])}: {msg}")
    return problems


def load_config(
    source: str | Path | dict[str, Any], *, validate_plugins: bool = True
) -> AblationConfig:
    """Read and validate an ablation config.

    Args:
        source: a YAML file path, or the already parsed mapping.
        validate_plugins: also check names and params against the plugin registry (after
            registering the config's ``plugins``).

    Returns:
        The validated config.

    Raises:
        AblationConfigError: every problem, each with its YAML path.
        FileNotFoundError: no such file.
    """
    where = None
    if isinstance(source, (str, Path)):
        where = str(source)
        text = Path(source).read_text(encoding="utf-8")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise AblationConfigError(
                [f"not valid YAML: {exc}".replace("\n", " ")], where
            ) from None
        if isinstance(data, dict) and "name" not in data:
            data["name"] = Path(source).stem
    else:
        data = dict(source)
    if not isinstance(data, dict):
        raise AblationConfigError(["the top level must be a mapping"], where)
    try:
        cfg = AblationConfig.model_validate(data)
    except ValidationError as exc:
        raise AblationConfigError(_pydantic_problems(exc), where) from None
    if validate_plugins:
        load_plugins(cfg.plugins, where)
        problems = validate_config(cfg)
        if problems:
            raise AblationConfigError(problems, where)
    return cfg


def load_plugins(modules: Sequence[str], source: str | None = None) -> None:
    """Register extra plugin modules (beside the installed entry points) in the registry.

    Args:
        modules: importable module names whose hook implementations to register.
        source: the config file, for error messages.

    Raises:
        AblationConfigError: a module cannot be imported (``plugins[i]`` and the reason).
    """
    if not modules:
        return
    extra, problems = [], []
    for i, m in enumerate(modules):
        try:
            extra.append((m, importlib.import_module(m)))
        except Exception as exc:  # ImportError, or whatever the module raised on import
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            problems.append(
                f"plugins[{i}]: cannot import plugin module {m!r} ({reason}); install the "
                f"package that provides it, put it on PYTHONPATH, or remove it"
            )
    if problems:
        raise AblationConfigError(problems, source)
    known = set(get_registry().sources.values())
    if all(m in known for m, _ in extra):
        return
    reset_registry([*entry_point_plugins(), *extra])


# --------------------------------------------------------------------------------------
# Grid expansion
# --------------------------------------------------------------------------------------


def expand_settings(cfg: AblationConfig) -> list[Setting]:
    """Expand the policy grid into settings (list values form a product; ``matched`` gives
    one setting per margin and listed policy). Duplicates are kept here; runs dedupe.

    Args:
        cfg: the config.

    Returns:
        The settings, in config order.

    Raises:
        AblationConfigError: a ``matched`` policy is unknown or has no margin mapping.
    """
    out: list[Setting] = []
    for i, spec in enumerate(cfg.policies):
        src = f"policies[{i}]"
        if spec.matched is not None:
            m = spec.matched
            for j, delta in enumerate(m.margins):
                p = f"{src}.matched.margins[{j}]"
                for name in m.policies:
                    args = _margin_args(name, float(delta), f"{src}.matched.policies")
                    ref = PolicyRef(name=name, args=args)
                    out.append(Setting.at(ref, None, None, src, dict.fromkeys(args, p)))
            continue
        assert spec.policy is not None
        keys = list(spec.args)
        axes = []
        for k in keys:
            v = spec.args[k]
            if isinstance(v, list):
                axes.append([(x, f"{src}.args.{k}[{j}]") for j, x in enumerate(v)])
            else:
                axes.append([(v, f"{src}.args.{k}")])
        steps_list = spec.steps if isinstance(spec.steps, list) else [spec.steps]
        for combo in itertools.product(*axes):
            args = {k: val for k, (val, _) in zip(keys, combo, strict=True)}
            paths = {k: p for k, (_, p) in zip(keys, combo, strict=True)}
            for steps in steps_list:
                ref = PolicyRef(name=spec.policy, args=args)
                out.append(Setting.at(ref, steps, spec.family, src, paths))
    return out


def _margin_args(name: str, delta: float, where: str) -> dict[str, Any]:
    try:
        cls = get_registry().resolve("policy", name)
    except UnknownPluginError as exc:
        raise AblationConfigError([f"{where}: {str(exc).split(' Run `')[0]}"]) from None
    args = cls.params_for_margin(delta)
    if args is None:
        raise AblationConfigError(
            [
                f"{where}: policy {name!r} does not say which parameters match a margin "
                f"(its class has no params_for_margin); list it under 'policies' instead"
            ]
        )
    return dict(args)


@dataclass(frozen=True)
class RunSpec:
    """One run of the sweep: a task and a resolved decode config (policy × params × cache ×
    gen/block × seed).

    Attributes:
        run_id: stable 12-hex id (hash of every field that changes outputs).
        task_index: index into ``config.tasks``.
        task: task name.
        setting: the policy setting of the grid, as written.
        config: the resolved [`DecodeConfig`][dlm_decode.config.DecodeConfig]
            (versioned keys, every parameter with its default).
        policy_ref: the resolved policy reference (its ``label`` names every argument).
        cache_ref: the resolved cache reference.
    """

    run_id: str
    task_index: int
    task: str
    setting: Setting
    config: DecodeConfig
    policy_ref: PolicyRef
    cache_ref: CacheRef

    # Read-only views of the config (nothing is stored twice).
    @property
    def policy_key(self) -> str:
        """Versioned policy name (``frechet.v1``)."""
        return self.config.policy

    @property
    def policy_args(self) -> dict[str, Any]:
        """Validated policy parameters, defaults filled in."""
        return self.config.policy_args

    @property
    def cache(self) -> str:
        """The cache's label: ``dual``, or ``name(k=v, …)`` with every argument."""
        return self.cache_ref.label

    @property
    def cache_key(self) -> str:
        """Versioned cache name (``dual.v1``)."""
        return self.config.cache

    @property
    def cache_args(self) -> dict[str, Any]:
        """Validated cache parameters, defaults filled in."""
        return self.config.cache_args

    @property
    def gen_length(self) -> int:
        """Tokens generated per sample."""
        return self.config.gen_length

    @property
    def block_length(self) -> int:
        """Tokens per block."""
        return self.config.block_length

    @property
    def steps(self) -> int | None:
        """Step budget passed to the decoder (``None`` when the policy needs none)."""
        return self.config.steps

    @property
    def seed(self) -> int:
        """Decode seed."""
        return self.config.seed

    @property
    def temperature(self) -> float:
        """Sampling temperature."""
        return self.config.temperature

    @property
    def early_stop(self) -> bool:
        """Whether finished rows stop spending forwards."""
        return self.config.early_stop

    @property
    def setting_label(self) -> str:
        """The policy's label with every argument (and steps when set)."""
        return setting_label(self.policy_ref, self.steps)

    @property
    def label(self) -> str:
        """Readable run name: ``synthetic/frechet(margin=0.25)/dual/g64b16/s0``."""
        return (
            f"{self.task}/{self.setting_label}/{self.cache}/"
            f"g{self.gen_length}b{self.block_length}/s{self.seed}"
        )

    def decode_config(self) -> DecodeConfig:
        """The run's ``DecodeConfig`` (a copy)."""
        return self.config.model_copy()

    def describe(self) -> dict[str, Any]:
        """The run's fields as a flat JSON-able dict (rows, tables, W&B config)."""
        return {
            "run_id": self.run_id,
            "task": self.task,
            "policy_family": self.setting.family_label,
            "policy": self.setting.policy.name,
            "policy_key": self.policy_key,
            "policy_args": dict(self.policy_args),
            "setting": self.setting_label,
            "cache": self.cache,
            "cache_key": self.cache_key,
            "cache_args": dict(self.cache_args),
            "gen_length": self.gen_length,
            "block_length": self.block_length,
            "steps": self.steps,
            "seed": self.seed,
            "temperature": self.temperature,
            "early_stop": self.early_stop,
        }


def _run_id(cfg: AblationConfig, payload: dict[str, Any]) -> str:
    ident = {
        "model": {"name": cfg.model.name, "dtype": cfg.model.dtype},
        **payload,
    }
    text = json.dumps(ident, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def expand_runs(cfg: AblationConfig) -> list[RunSpec]:
    """Expand the config into its runs (deduplicated by ``run_id``, config order kept).

    Order: task → gen/block → cache → policy setting → seed. Every run's decode config is
    resolved through [`resolve`][dlm_decode.settings.resolve].

    Args:
        cfg: a config that passed [`validate_config`][dlm_decode.ablate.config.validate_config].

    Returns:
        The runs.
    """
    runs: list[RunSpec] = []
    seen: set[str] = set()
    settings = expand_settings(cfg)
    for ti, task in enumerate(cfg.tasks):
        for length in cfg.lengths:
            for cache in cfg.caches:
                for st in settings:
                    for seed in cfg.seeds:
                        res = resolve_setting(
                            st,
                            cache=cache,
                            gen_length=length.gen_length,
                            block_length=length.block_length,
                            seed=seed,
                            temperature=cfg.temperature,
                            early_stop=cfg.early_stop,
                        )
                        dc = res.config
                        payload = {
                            "task": {
                                "name": task.name,
                                "shots": task.shots,
                                "data_path": task.data_path,
                                "args": task.args,
                            },
                            "policy": dc.policy,
                            "policy_args": dc.policy_args,
                            "cache": dc.cache,
                            "cache_args": dc.cache_args,
                            "gen_length": dc.gen_length,
                            "block_length": dc.block_length,
                            "steps": dc.steps,
                            "seed": dc.seed,
                            "temperature": dc.temperature,
                            "early_stop": dc.early_stop,
                        }
                        rid = _run_id(cfg, payload)
                        if rid in seen:
                            continue
                        seen.add(rid)
                        runs.append(
                            RunSpec(
                                run_id=rid,
                                task_index=ti,
                                task=task.name,
                                setting=st,
                                config=dc,
                                policy_ref=res.policy_ref,
                                cache_ref=res.cache_ref,
                            )
                        )
    return runs


def resolve_setting(setting: Setting, **fields: Any) -> Resolved:
    """Resolve a setting into decode settings: its policy, its step budget (one token per
    step when the policy needs one and none is given), and ``fields``.

    Args:
        setting: the policy setting.
        **fields: other [`resolve`][dlm_decode.settings.resolve] arguments (``cache``,
            ``gen_length``, …).
    """
    steps = setting.steps
    if steps is None:
        cls = plugin_class("policy", setting.policy.name)
        if "steps" in cls.requires:
            steps = fields.get("gen_length", DecodeConfig.model_fields["gen_length"].default)
    return resolve(policy=setting.policy, steps=steps, **fields)


# --------------------------------------------------------------------------------------
# Registry validation
# --------------------------------------------------------------------------------------


def _param_problems(cls: type, args: dict[str, Any], paths: dict[str, str], base: str) -> list[str]:
    out = []
    for key, msg in param_problems(cls, args):
        where = paths.get(key, f"{base}.{key}" if key else base)
        out.append(f"{where}: {msg}")
    return out


def _iter_refs(cfg: AblationConfig) -> Iterator[tuple[str, Setting]]:
    yield "counterfactual.driver", cfg.counterfactual.driver
    for i, ref in enumerate(cfg.counterfactual.policies or ()):
        yield f"counterfactual.policies[{i}]", ref
    for i, ref in enumerate(cfg.audit.policies or ()):
        yield f"audit.policies[{i}]", ref
    yield "plots.profile_policy", cfg.plots.profile_policy


def validate_config(cfg: AblationConfig) -> list[str]:
    """Check names and params against the plugin registry; nothing is loaded.

    Args:
        cfg: a structurally valid config.

    Returns:
        Problems, each ``"<yaml path>: <message>"``; empty when the config is valid.
    """
    problems: list[str] = []

    def lookup(kind: str, name: str, where: str) -> type | None:
        try:
            if kind == "task":
                return get_registry().resolve(kind, name)
            return plugin_class(kind, name)
        except UnknownPluginError as exc:
            problems.append(f"{where}: {str(exc).split(' Run `')[0]}")
            return None

    for i, task in enumerate(cfg.tasks):
        tcls = lookup("task", task.name, f"tasks[{i}].name")
        if tcls is not None:
            try:
                check_task_options(tcls, task.task_kwargs())
            except ValueError as exc:
                problems.append(f"tasks[{i}]: {exc}; remove it from the task's entry")
    for where, cache in [
        *((f"caches[{i}]", c) for i, c in enumerate(cfg.caches)),
        ("audit.cache", cfg.audit.cache),
    ]:
        ccls = lookup("cache", cache.name, f"{where}.name")
        if ccls is not None:
            problems += _param_problems(ccls, cache.args, {}, f"{where}.args")
    for i, length in enumerate(cfg.lengths):
        try:
            DecodeConfig(gen_length=length.gen_length, block_length=length.block_length)
        except ValidationError as exc:
            problems += [
                f"lengths[{i}]: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
            ]
    try:
        settings = expand_settings(cfg)
    except AblationConfigError as exc:
        return problems + exc.problems
    bad_entries: set[str] = set()
    for st in settings:
        if st.source in bad_entries:
            continue
        matched = any(".matched." in p for p in st.arg_paths.values())
        where = f"{st.source}.matched" if matched else f"{st.source}.policy"
        pcls = lookup("policy", st.policy.name, where)
        if pcls is None:
            bad_entries.add(st.source)
            continue
        new = _param_problems(pcls, st.policy.args, st.arg_paths, f"{st.source}.args")
        problems += [p for p in new if p not in problems]
        if st.steps is None:
            continue
        for length in cfg.lengths:
            try:
                DecodeConfig(
                    gen_length=length.gen_length, block_length=length.block_length, steps=st.steps
                )
            except ValidationError as exc:
                for e in exc.errors():
                    msg = f"{st.source}.steps: {e['msg'].removeprefix('Value error, ')}"
                    if msg not in problems:
                        problems.append(msg)
    for where, ref in _iter_refs(cfg):
        pcls = lookup("policy", ref.policy.name, f"{where}.policy")
        if pcls is not None:
            problems += _param_problems(pcls, ref.policy.args, {}, f"{where}.args")
    if cfg.baseline is not None and not problems:
        lookup("policy", cfg.baseline.policy, "baseline.policy")
        if not problems and not any(
            baseline_matches(cfg.baseline, r.policy_key, r.setting.policy.name, r.policy_args)
            for r in expand_runs(cfg)
        ):
            problems.append(
                f"baseline: no policy setting of the grid matches {cfg.baseline.policy} "
                f"{cfg.baseline.args or ''}".rstrip()
                + "; add it to 'policies' or change the selector"
            )
    if cfg.paper is not None and not problems:
        problems += unmatched_paper_rows(cfg, expand_runs(cfg))
    return problems


def cache_matches(selector: str, ref: CacheRef) -> bool:
    """Whether a cache selector (a name, versioned key or label) names ``ref``."""
    return selector in (ref.label, ref.key, ref.bare_name, ref.name)


def baseline_matches(sel: BaselineSpec, policy_key: str, policy: str, args: dict[str, Any]) -> bool:
    """Whether a run's policy matches the baseline selector (cache is checked apart)."""
    name = sel.policy
    if "." in name:
        if name != policy_key:
            return False
    elif name != policy_key.split(".v")[0] and name != policy:
        return False
    for k, v in sel.args.items():
        if k not in args:
            return False
        a = args[k]
        if isinstance(v, (int, float)) and isinstance(a, (int, float)):
            if not math.isclose(float(v), float(a), rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif v != a:
            return False
    return True


def match_run(
    cfg: AblationConfig,
    runs: Sequence[RunSpec],
    row: PaperRow,
    policy: str | None = None,
    args: dict[str, Any] | None = None,
) -> RunSpec | None:
    """The first run reproducing ``row``: same task, shots (when the row gives them),
    generation length, cache name and policy, with the row's policy arguments.

    Args:
        cfg: the config (tasks' shots).
        runs: the sweep's runs.
        row: the published row.
        policy: match this policy instead of the row's (its baseline).
        args: with these arguments instead of the row's.

    Returns:
        The run, or ``None``.
    """
    policy = row.policy if policy is None else policy
    args = row.args if args is None else args
    for run in runs:
        if (
            run.task == row.task
            and (row.shots is None or cfg.tasks[run.task_index].shots == row.shots)
            and run.gen_length == row.gen_length
            and run.cache_ref.name.split(".v")[0] == row.cache
            and _bare(run.policy_key) == policy
            and _args_match(args, run.policy_args)
        ):
            return run
    return None


def unmatched_paper_rows(cfg: AblationConfig, runs: Sequence[RunSpec]) -> list[str]:
    """Problems (``"paper.rows[i]: …"``) for published rows no run of the sweep
    reproduces, so a dry run catches a config that cannot fill its own report."""
    if cfg.paper is None:
        return []
    return [
        f"paper.rows[{i}]: no run matches task {row.task}, shots {row.shots}, gen_length "
        f"{row.gen_length}, cache {row.cache}, policy {row.policy} {row.args or ''}".rstrip()
        + "; add it to the sweep or drop the row"
        for i, row in enumerate(cfg.paper.rows)
        if match_run(cfg, runs, row) is None
    ]
