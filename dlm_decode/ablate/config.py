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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dlm_decode.config import DecodeConfig

__all__ = [
    "AblationConfig",
    "AblationConfigError",
    "AuditSpec",
    "BaselineSpec",
    "CacheSpec",
    "CounterfactualSpec",
    "LengthSpec",
    "MatchedSpec",
    "ModelSpec",
    "PlotSpec",
    "PolicyRef",
    "PolicySpec",
    "RunSpec",
    "Setting",
    "TaskSpec",
    "WandbSpec",
    "expand_runs",
    "expand_settings",
    "load_config",
    "load_plugins",
    "policy_label",
    "validate_config",
]


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
    limit: int | None = Field(None, ge=1)
    data_path: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)

    def task_kwargs(self) -> dict[str, Any]:
        """Constructor arguments for ``get_task``."""
        kw = dict(self.args)
        if self.shots is not None:
            kw["shots"] = self.shots
        if self.data_path is not None:
            kw["data_path"] = self.data_path
        return kw


class CacheSpec(_Strict):
    """A cache and its params (a bare string ``dual`` is accepted in YAML)."""

    name: str
    args: dict[str, Any] = Field(default_factory=dict)


class LengthSpec(_Strict):
    """Generation and block length of a run."""

    gen_length: int = Field(ge=1)
    block_length: int = Field(ge=1)


class MatchedSpec(_Strict):
    """Matched pairs: for every margin δ, ``factor`` with ``f = 1 − δ`` beside ``frechet`` δ.

    With equal confidences the two rules coincide; on real profiles ``frechet`` commits at
    least as much (its heterogeneity bonus), which is what the Fast-dLLM++ paper compares.
    """

    margins: list[float] = Field(min_length=1)
    factor_policy: str = "factor"
    frechet_policy: str = "frechet"

    @field_validator("margins")
    @classmethod
    def _in_range(cls, v: list[float]) -> list[float]:
        bad = [m for m in v if not 0.0 <= m < 1.0]
        if bad:
            raise ValueError(f"every margin must lie in [0, 1) (so that f = 1 − δ > 0): {bad}")
        return v


class PolicySpec(_Strict):
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
    def _one_kind(self) -> PolicySpec:
        if (self.policy is None) == (self.matched is None):
            raise ValueError("give either 'policy' (with 'args') or 'matched', not both")
        if self.matched is not None and (self.args or self.steps is not None):
            raise ValueError("'matched' takes no 'args' or 'steps'")
        steps = self.steps if isinstance(self.steps, list) else [self.steps]
        if any(s is not None and s < 1 for s in steps):
            raise ValueError("steps must be ≥ 1")
        return self


class PolicyRef(_Strict):
    """A single policy setting (no grid)."""

    policy: str
    args: dict[str, Any] = Field(default_factory=dict)
    steps: int | None = Field(None, ge=1)


class BaselineSpec(_Strict):
    """Selects the baseline row that speed-up and NFE reduction are relative to.

    A run's baseline is the run with the same task, gen/block length and seed whose policy
    is ``policy`` and whose params include ``args``; its cache is ``cache``, or the run's own
    cache when ``cache`` is ``None``.
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
    driver: PolicyRef = Field(
        default_factory=lambda: PolicyRef(policy="frechet", args={"margin": 0.25})
    )
    policies: list[PolicyRef] | None = None
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
    cache: str = "none"
    policies: list[PolicyRef] | None = None


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
    profile_policy: PolicyRef = Field(
        default_factory=lambda: PolicyRef(policy="frechet", args={"margin": 0.25})
    )
    profile_steps: int = Field(3, ge=1, le=8)


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
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str = ""
    plugins: list[str] = Field(default_factory=list)
    model: ModelSpec = Field(default_factory=ModelSpec)
    tasks: list[TaskSpec] = Field(min_length=1)
    caches: list[CacheSpec] = Field(default_factory=lambda: [CacheSpec(name="dual")])
    lengths: list[LengthSpec] = Field(
        default_factory=lambda: [LengthSpec(gen_length=256, block_length=32)], min_length=1
    )
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    temperature: float = Field(0.0, ge=0.0)
    early_stop: bool = False
    batch_size: int = Field(16, ge=1)
    baseline: BaselineSpec | None = None
    policies: list[PolicySpec] = Field(min_length=1)
    counterfactual: CounterfactualSpec = Field(default_factory=CounterfactualSpec)
    audit: AuditSpec = Field(default_factory=AuditSpec)
    wandb: WandbSpec = Field(default_factory=WandbSpec)
    plots: PlotSpec = Field(default_factory=PlotSpec)

    @field_validator("caches", mode="before")
    @classmethod
    def _cache_strings(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": c} if isinstance(c, str) else c for c in v]
        return v


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
        load_plugins(cfg.plugins)
        problems = validate_config(cfg)
        if problems:
            raise AblationConfigError(problems, where)
    return cfg


def load_plugins(modules: Sequence[str]) -> None:
    """Register extra plugin modules (beside the installed entry points) in the registry.

    Args:
        modules: importable module names whose hook implementations to register.
    """
    if not modules:
        return
    from dlm_decode import registry

    extra = [(m, importlib.import_module(m)) for m in modules]
    reg = registry.get_registry()
    known = set(reg.sources.values())
    if all(m in known for m, _ in extra):
        return
    registry.reset_registry([*registry._entry_point_plugins(), *extra])


# --------------------------------------------------------------------------------------
# Grid expansion
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One expanded policy setting of the grid.

    Attributes:
        policy: the name as written in the config.
        args: params as written (one grid point).
        steps: the step budget as written (``None`` → default).
        family: family label for plots.
        source: YAML path of the grid entry it came from.
        arg_paths: YAML path of each param's value (for error messages).
    """

    policy: str
    args: dict[str, Any]
    steps: int | None
    family: str
    source: str
    arg_paths: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def label(self) -> str:
        """``frechet(margin=0.25)``."""
        return policy_label(self.policy, self.args, self.steps)


def policy_label(policy: str, args: dict[str, Any], steps: int | None = None) -> str:
    """A short readable label: ``threshold(threshold=0.9)``, ``fixed(steps=256)``."""
    parts = [f"{k}={_fmt(v)}" for k, v in sorted(args.items())]
    if steps is not None:
        parts.append(f"steps={steps}")
    return f"{policy}({', '.join(parts)})"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def expand_settings(cfg: AblationConfig) -> list[Setting]:
    """Expand the policy grid into settings (list values form a product; ``matched`` gives
    a factor and a frechet setting per margin). Duplicates are kept here; runs dedupe.

    Args:
        cfg: the config.

    Returns:
        The settings, in config order.
    """
    out: list[Setting] = []
    for i, spec in enumerate(cfg.policies):
        src = f"policies[{i}]"
        if spec.matched is not None:
            m = spec.matched
            for j, delta in enumerate(m.margins):
                f = round(1.0 - delta, 12)
                p = f"{src}.matched.margins[{j}]"
                out.append(
                    Setting(m.factor_policy, {"factor": f}, None, "factor", src, {"factor": p})
                )
                out.append(
                    Setting(
                        m.frechet_policy,
                        {"margin": float(delta)},
                        None,
                        "frechet",
                        src,
                        {"margin": p},
                    )
                )
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
                fam = spec.family or spec.policy.split(".v")[0]
                out.append(Setting(spec.policy, args, steps, fam, src, paths))
    return out


@dataclass(frozen=True)
class RunSpec:
    """One run of the sweep: policy × params × cache × task × gen/block × seed.

    Attributes:
        run_id: stable 12-hex id (hash of every field that changes outputs).
        task_index: index into ``config.tasks``.
        task: task name.
        setting: the policy setting.
        policy_key: versioned policy name (``frechet.v1``).
        policy_args: validated params, defaults filled in.
        cache: cache name as written; ``cache_key`` its versioned name.
        cache_args: validated cache params.
        gen_length: tokens generated per sample.
        block_length: tokens per block.
        steps: step budget passed to the decoder (``None`` when the policy needs none).
        seed: decode seed.
    """

    run_id: str
    task_index: int
    task: str
    setting: Setting
    policy_key: str
    policy_args: dict[str, Any]
    cache: str
    cache_key: str
    cache_args: dict[str, Any]
    gen_length: int
    block_length: int
    steps: int | None
    seed: int
    temperature: float
    early_stop: bool

    @property
    def label(self) -> str:
        """Readable run name: ``synthetic/frechet(margin=0.25)/dual/g64b16/s0``."""
        return (
            f"{self.task}/{self.setting.label}/{self.cache}/"
            f"g{self.gen_length}b{self.block_length}/s{self.seed}"
        )

    def decode_config(self) -> DecodeConfig:
        """The ``DecodeConfig`` of this run."""
        return DecodeConfig(
            policy=self.policy_key,
            policy_args=dict(self.policy_args),
            cache=self.cache_key,
            cache_args=dict(self.cache_args),
            gen_length=self.gen_length,
            block_length=self.block_length,
            steps=self.steps,
            temperature=self.temperature,
            seed=self.seed,
            early_stop=self.early_stop,
        )

    def describe(self) -> dict[str, Any]:
        """The run's fields as a flat JSON-able dict (rows, tables, W&B config)."""
        return {
            "run_id": self.run_id,
            "task": self.task,
            "family": self.setting.family,
            "policy": self.setting.policy,
            "policy_key": self.policy_key,
            "policy_args": dict(self.policy_args),
            "setting": self.setting.label,
            "cache": self.cache,
            "gen_length": self.gen_length,
            "block_length": self.block_length,
            "steps": self.steps,
            "seed": self.seed,
            "temperature": self.temperature,
            "early_stop": self.early_stop,
        }


def _resolved_steps(setting: Setting, requires: Sequence[str], gen_length: int) -> int | None:
    if setting.steps is not None:
        return setting.steps
    return gen_length if "steps" in requires else None


def _run_id(cfg: AblationConfig, payload: dict[str, Any]) -> str:
    ident = {
        "model": {"name": cfg.model.name, "dtype": cfg.model.dtype},
        **payload,
    }
    text = json.dumps(ident, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def expand_runs(cfg: AblationConfig) -> list[RunSpec]:
    """Expand the config into its runs (deduplicated by ``run_id``, config order kept).

    Order: task → gen/block → cache → policy setting → seed.

    Args:
        cfg: a config that passed :func:`validate_config`.

    Returns:
        The runs.
    """
    from dlm_decode.api import get_policy_class
    from dlm_decode.registry import get_registry, validate_params

    reg = get_registry()
    runs: list[RunSpec] = []
    seen: set[str] = set()
    settings = expand_settings(cfg)
    for ti, task in enumerate(cfg.tasks):
        for length in cfg.lengths:
            for cache in cfg.caches:
                ccls = reg.resolve("cache", cache.name)
                cargs = validate_params(ccls, cache.args).model_dump(mode="json")
                for st in settings:
                    pcls = get_policy_class(st.policy)
                    pargs = validate_params(pcls, st.args).model_dump(mode="json")
                    steps = _resolved_steps(st, pcls.requires, length.gen_length)
                    for seed in cfg.seeds:
                        payload = {
                            "task": {
                                "name": task.name,
                                "shots": task.shots,
                                "data_path": task.data_path,
                                "args": task.args,
                            },
                            "policy": f"{pcls.name}.v{pcls.version}",
                            "policy_args": pargs,
                            "cache": f"{ccls.name}.v{ccls.version}",
                            "cache_args": cargs,
                            "gen_length": length.gen_length,
                            "block_length": length.block_length,
                            "steps": steps,
                            "seed": seed,
                            "temperature": cfg.temperature,
                            "early_stop": cfg.early_stop,
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
                                policy_key=f"{pcls.name}.v{pcls.version}",
                                policy_args=pargs,
                                cache=cache.name,
                                cache_key=f"{ccls.name}.v{ccls.version}",
                                cache_args=cargs,
                                gen_length=length.gen_length,
                                block_length=length.block_length,
                                steps=steps,
                                seed=seed,
                                temperature=cfg.temperature,
                                early_stop=cfg.early_stop,
                            )
                        )
    return runs


# --------------------------------------------------------------------------------------
# Registry validation
# --------------------------------------------------------------------------------------


def _param_problems(cls: type, args: dict[str, Any], paths: dict[str, str], base: str) -> list[str]:
    try:
        cls.Params(**args)
    except ValidationError as exc:
        out = []
        for err in exc.errors():
            key = str(err["loc"][0]) if err["loc"] else ""
            where = paths.get(key, f"{base}.{key}" if key else base)
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(cls.Params.model_fields) or "none"
                out.append(f"{where}: unknown parameter of {cls.name} (allowed: {allowed})")
            else:
                out.append(f"{where}: {err['msg']}")
        return out
    return []


def _iter_refs(cfg: AblationConfig) -> Iterator[tuple[str, PolicyRef]]:
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
    from dlm_decode.registry import UnknownPluginError, get_registry

    reg = get_registry()
    problems: list[str] = []

    def resolve(kind: str, name: str, where: str) -> type | None:
        try:
            return reg.resolve(kind, name)
        except UnknownPluginError as exc:
            problems.append(f"{where}: {str(exc).split(' Run `')[0]}")
            return None

    for i, task in enumerate(cfg.tasks):
        resolve("task", task.name, f"tasks[{i}].name")
    for i, cache in enumerate(cfg.caches):
        ccls = resolve("cache", cache.name, f"caches[{i}].name")
        if ccls is not None:
            problems += _param_problems(ccls, cache.args, {}, f"caches[{i}].args")
    resolve("cache", cfg.audit.cache, "audit.cache")
    for i, length in enumerate(cfg.lengths):
        try:
            DecodeConfig(gen_length=length.gen_length, block_length=length.block_length)
        except ValidationError as exc:
            problems += [
                f"lengths[{i}]: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
            ]
    bad_entries: set[str] = set()
    for st in expand_settings(cfg):
        if st.source in bad_entries:
            continue
        matched = any(".matched." in p for p in st.arg_paths.values())
        where = f"{st.source}.matched" if matched else f"{st.source}.policy"
        pcls = resolve("policy", st.policy, where)
        if pcls is None:
            bad_entries.add(st.source)
            continue
        new = _param_problems(pcls, st.args, st.arg_paths, f"{st.source}.args")
        problems += [p for p in new if p not in problems]
        for length in cfg.lengths:
            steps = _resolved_steps(st, pcls.requires, length.gen_length)
            try:
                DecodeConfig(
                    gen_length=length.gen_length, block_length=length.block_length, steps=steps
                )
            except ValidationError as exc:
                if steps is not None and steps == st.steps:
                    for e in exc.errors():
                        msg = f"{st.source}.steps: {e['msg'].removeprefix('Value error, ')}"
                        if msg not in problems:
                            problems.append(msg)
    for where, ref in _iter_refs(cfg):
        pcls = resolve("policy", ref.policy, f"{where}.policy")
        if pcls is not None:
            problems += _param_problems(pcls, ref.args, {}, f"{where}.args")
    if cfg.baseline is not None and not problems:
        resolve("policy", cfg.baseline.policy, "baseline.policy")
        if not problems and not any(
            baseline_matches(cfg.baseline, r.policy_key, r.setting.policy, r.policy_args)
            for r in expand_runs(cfg)
        ):
            problems.append(
                f"baseline: no policy setting of the grid matches {cfg.baseline.policy} "
                f"{cfg.baseline.args or ''}".rstrip()
                + "; add it to 'policies' or change the selector"
            )
    return problems


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
