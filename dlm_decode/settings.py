"""One home for a decode's settings: typed plugin references and the one function that
resolves them.

A *reference* names a plugin and its arguments: [`PolicyRef`][dlm_decode.settings.PolicyRef]
for a commit policy, [`CacheRef`][dlm_decode.settings.CacheRef] for a cache. Once resolved it
also carries the versioned registry key (``frechet.v1``) and the validated arguments with
every default filled in, and its [`label`][dlm_decode.settings.PluginRef.label] names every
argument, so two differently configured plugins never share a label.

[`resolve_plugin`][dlm_decode.settings.resolve_plugin] is the only place in the package that
looks a policy or cache up in the registry and validates its parameters, and
[`resolve`][dlm_decode.settings.resolve] the only place that turns a
[`DecodeConfig`][dlm_decode.config.DecodeConfig] into ready objects and checks what a policy
``requires``. Every entry point (``generate``, ``Decoder``, the CLI, ``bench``, the lm-eval
adapter, sweeps, counterfactual traces and audits, the quickstart) goes through them, so a
name, an argument and a label mean the same thing everywhere.

Example:
    >>> from dlm_decode.settings import PolicyRef, resolve_plugin
    >>> ref, policy = resolve_plugin(PolicyRef.parse("frechet_robust:margin=0.2"))
    >>> ref.key, ref.label
    ('frechet_robust.v1', 'frechet_robust(eta=0.05, margin=0.2)')
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from pydantic import BaseModel, ValidationError

from dlm_decode.config import CacheRef, DecodeConfig, PluginRef, PolicyRef
from dlm_decode.interfaces import Cache, CommitPolicy
from dlm_decode.registry import get_registry

__all__ = [
    "CacheLike",
    "CacheRef",
    "PluginRef",
    "PolicyLike",
    "PolicyRef",
    "Resolved",
    "param_problems",
    "plugin_class",
    "resolve",
    "resolve_plugin",
    "validate_params",
]


#: What may name a policy: a name, ``"name:k=v"``, a reference, a dict or a ready object.
PolicyLike: TypeAlias = str | PolicyRef | Mapping[str, Any] | CommitPolicy
#: What may name a cache: a name, ``"name:k=v"``, a reference, a dict or a ready object.
CacheLike: TypeAlias = str | CacheRef | Mapping[str, Any] | Cache

_REF_TYPES: dict[str, tuple[type[PluginRef], type]] = {
    "policy": (PolicyRef, CommitPolicy),
    "cache": (CacheRef, Cache),
}


def plugin_class(kind: str, name: str) -> type:
    """The registered class of a ``policy`` or ``cache`` called ``name`` (or ``name.vN``).

    Raises:
        dlm_decode.registry.UnknownPluginError: an unknown name ("did you mean …").
    """
    return get_registry().resolve(kind, name)


def param_problems(cls: type, params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What is wrong with ``params`` for ``cls.Params``: ``(parameter, message)`` pairs,
    empty when they are valid. Messages name the fix (the allowed names, the bound)."""
    try:
        cls.Params(**dict(params))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(cls.Params.model_fields) or "none"
                problems.append((loc, f"unknown parameter of {cls.name} (allowed: {allowed})"))
            else:
                problems.append((loc, f"{err['msg']} (got {err.get('input')!r})"))
        return problems
    return []


def validate_params(cls: type, params: Mapping[str, Any]) -> BaseModel:
    """Validate ``params`` against ``cls.Params``; errors name the field and the fix.

    Raises:
        ValueError: unknown or invalid parameters, each named, with the allowed names.
    """
    problems = param_problems(cls, params)
    if problems:
        text = "; ".join(f"{loc or '(params)'}: {msg}" for loc, msg in problems)
        raise ValueError(f"invalid parameters for {cls.name}.v{cls.version}: {text}")
    return cls.Params(**dict(params))


def _ref_of_object(kind: str, obj: Any) -> PluginRef:
    ref_type = _REF_TYPES[kind][0]
    return ref_type(name=obj.key, args=dict(obj.params.model_dump(mode="json")), key=obj.key)


def resolve_plugin(
    spec: Any, kind: str | None = None, args: Mapping[str, Any] | None = None
) -> tuple[PluginRef, Any]:
    """Resolve one policy or cache: look it up, validate its arguments, build it.

    The only function that looks policies and caches up in the registry.

    Args:
        spec: a name (``"frechet"``, ``"frechet.v1"``, ``"frechet:margin=0.2"``), a
            [`PolicyRef`][dlm_decode.settings.PolicyRef] /
            [`CacheRef`][dlm_decode.settings.CacheRef], a dict, or a ready
            [`CommitPolicy`][dlm_decode.interfaces.CommitPolicy] /
            [`Cache`][dlm_decode.interfaces.Cache] object (used as it is).
        kind: ``"policy"`` or ``"cache"``; inferred from a reference or object.
        args: arguments that override those in ``spec`` (not allowed with an object).

    Returns:
        The resolved reference (key, validated arguments with defaults) and the object.

    Raises:
        dlm_decode.registry.UnknownPluginError: an unknown name ("did you mean …").
        ValueError: invalid arguments, or arguments given with a ready object.
    """
    if kind is None:
        if isinstance(spec, (PolicyRef, CommitPolicy)):
            kind = "policy"
        elif isinstance(spec, (CacheRef, Cache)):
            kind = "cache"
        else:
            raise ValueError(f"resolve_plugin({spec!r}): say kind='policy' or kind='cache'")
    ref_type, base = _REF_TYPES[kind]
    if isinstance(spec, base):
        if args:
            raise ValueError(
                f"{kind} arguments {dict(args)} were given with a ready {kind} object "
                f"{spec!r}; build the object with them, or pass its name instead"
            )
        return _ref_of_object(kind, spec), spec
    ref = ref_type.parse(spec)
    merged = {**ref.args, **dict(args or {})}
    cls = plugin_class(kind, ref.name)
    params = validate_params(cls, merged)
    key = f"{cls.name}.v{cls.version}"
    resolved = ref_type(name=ref.name, args=params.model_dump(mode="json"), key=key)
    return resolved, cls(params)


@dataclass(frozen=True)
class Resolved:
    """A decode's settings, resolved once: the objects the loop calls and their references.

    Attributes:
        config: the config with ``policy``/``cache`` set to the versioned keys and their
            arguments validated with every default filled in.
        policy: the commit policy object.
        cache: the cache object.
        policy_ref: the policy's resolved reference.
        cache_ref: the cache's resolved reference.
    """

    config: DecodeConfig
    policy: CommitPolicy
    cache: Cache
    policy_ref: PolicyRef
    cache_ref: CacheRef

    def describe(self) -> dict[str, Any]:
        """The settings as a JSON-able dict (what a run reports)."""
        return {
            **self.config.model_dump(mode="json"),
            "policy_label": self.policy_ref.label,
            "cache_label": self.cache_ref.label,
        }


def resolve(
    config: DecodeConfig | None = None,
    *,
    policy: PolicyLike | None = None,
    policy_args: Mapping[str, Any] | None = None,
    cache: CacheLike | None = None,
    cache_args: Mapping[str, Any] | None = None,
    **fields: Any,
) -> Resolved:
    """Resolve a decode's settings: the one place that builds the policy and the cache and
    checks what the policy ``requires`` of the config.

    Args:
        config: a [`DecodeConfig`][dlm_decode.config.DecodeConfig]; default one built from
            ``fields``.
        policy: overrides ``config.policy``: a name, ``"name:k=v"``, a reference, a dict
            or a ready object.
        policy_args: arguments for a named ``policy`` (or for ``config.policy``).
        cache: overrides ``config.cache``, in the same forms.
        cache_args: arguments for a named ``cache`` (or for ``config.cache``).
        **fields: other ``DecodeConfig`` fields (``gen_length``, ``steps``, …).

    Returns:
        A [`Resolved`][dlm_decode.settings.Resolved].

    Raises:
        dlm_decode.registry.UnknownPluginError: an unknown policy or cache.
        ValueError: invalid arguments, or a config field the policy needs is not set.
        pydantic.ValidationError: an invalid config field.
    """
    base = config if config is not None else DecodeConfig()
    update = dict(fields)
    pol_spec: Any = policy if policy is not None else base.policy_ref
    if policy is None and policy_args is not None:
        pol_spec = PolicyRef(name=base.policy)  # new arguments replace the config's
    cache_spec: Any = cache if cache is not None else base.cache_ref
    if cache is None and cache_args is not None:
        cache_spec = CacheRef(name=base.cache)
    pref, pol = resolve_plugin(pol_spec, "policy", policy_args)
    cref, cch = resolve_plugin(cache_spec, "cache", cache_args)
    update.update(policy=pref.key, policy_args=pref.args, cache=cref.key, cache_args=cref.args)
    cfg = DecodeConfig.model_validate({**base.model_dump(), **update})
    for need in getattr(pol, "requires", ()):
        if getattr(cfg, need, None) is None:
            hint = (
                f" (e.g. {need}={cfg.gen_length} for one token per step)" if need == "steps" else ""
            )
            raise ValueError(f"policy {pref.key!r} needs {need!r} to be set{hint}")
    return Resolved(cfg, pol, cch, pref, cref)
