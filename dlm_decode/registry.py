"""The plugin registry, built once per process from entry points and built-ins.

Names are versioned: ``frechet.v1``; the bare name ``frechet`` resolves to the newest
version. Set ``DLM_DECODE_PLUGINS`` to restrict which *external* plugins load: unset loads
every entry point in the group ``dlm_decode``; a comma-separated list loads only those
entry-point names; an empty string loads none. Built-ins always load.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy
from pydantic import BaseModel

from dlm_decode import hookspecs
from dlm_decode.interfaces import Cache, CommitPolicy, Model
from dlm_decode.tasks.base import Task

__all__ = [
    "BUILTIN_PLUGINS",
    "ENV_VAR",
    "Registry",
    "UnknownPluginError",
    "check_plugin_class",
    "entry_point_plugins",
    "get_registry",
    "reset_registry",
]

ENV_VAR = "DLM_DECODE_PLUGINS"
ENTRY_POINT_GROUP = "dlm_decode"

#: Entry-point name → module of the plugins that ship with the distribution.
BUILTIN_PLUGINS: dict[str, str] = {
    "dlm_decode.policies": "dlm_decode.policies",
    "dlm_decode.caches": "dlm_decode.caches",
    "dlm_decode.models": "dlm_decode.models",
    "dlm_decode.tasks": "dlm_decode.tasks",
}

_KINDS: dict[str, tuple[str, type]] = {
    # kind → (hook name, base class)
    "policy": ("register_commit_policies", CommitPolicy),
    "cache": ("register_caches", Cache),
    "model": ("register_models", Model),
    "task": ("register_tasks", Task),
}

_NAME_RE = re.compile(r"^[a-z][a-z0-9_\-]*$")
_KEY_RE = re.compile(r"^(?P<name>[a-z][a-z0-9_\-]*)(\.v(?P<version>\d+))?$")


class UnknownPluginError(KeyError):
    """An unknown plugin name; the message suggests the closest registered names."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0])


def check_plugin_class(kind: str, cls: Any, source: str = "(direct)") -> None:
    """The load-time checks every registered class passes (and that
    [`dlm_decode.testing`][dlm_decode.testing] runs on a plugin author's class).

    Args:
        kind: ``policy``, ``cache``, ``model`` or ``task``.
        cls: the class to check.
        source: the plugin that registers it, for messages.

    Raises:
        TypeError: not a subclass of the kind's base, a bad ``name`` or ``version``, or a
            ``Params`` model that is not a pydantic model with ``extra="forbid"``.
    """
    base = _KINDS[kind][1]
    if not isinstance(cls, type) or not issubclass(cls, base):
        raise TypeError(
            f"plugin {source!r} registered {cls!r} as a {kind}, but it is not a "
            f"subclass of {base.__module__}.{base.__qualname__}; subclass it and "
            f"register the class (not an instance)"
        )
    name = getattr(cls, "name", None)
    version = getattr(cls, "version", 1)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise TypeError(
            f"plugin {source!r}: {cls.__qualname__}.name must be a lower-case "
            f"identifier such as 'my_rule', got {name!r}"
        )
    if not isinstance(version, int) or version < 1:
        raise TypeError(
            f"plugin {source!r}: {cls.__qualname__}.version must be an int ≥ 1, got {version!r}"
        )
    params = getattr(cls, "Params", None)
    if kind in ("policy", "cache"):
        if not (isinstance(params, type) and issubclass(params, BaseModel)):
            raise TypeError(
                f"plugin {source!r}: {cls.__qualname__}.Params must be a pydantic "
                f"BaseModel subclass"
            )
        if params.model_config.get("extra") != "forbid":
            raise TypeError(
                f"plugin {source!r}: {cls.__qualname__}.Params must set "
                f"model_config = ConfigDict(extra='forbid') so typos in "
                f"parameters are errors"
            )


@dataclass
class Registry:
    """All registered plugin classes, by kind, name and version."""

    entries: dict[str, dict[str, dict[int, type]]] = field(
        default_factory=lambda: {k: {} for k in _KINDS}
    )
    sources: dict[tuple[str, str, int], str] = field(default_factory=dict)

    # -- building -----------------------------------------------------------------
    def _register(self, kind: str, source: str) -> Callable[[type], None]:
        def register(cls: type) -> None:
            check_plugin_class(kind, cls, source)
            name, version = cls.name, getattr(cls, "version", 1)
            versions = self.entries[kind].setdefault(name, {})
            if version in versions:
                other = self.sources[(kind, name, version)]
                raise ValueError(
                    f"duplicate {kind} '{name}.v{version}': registered by {other!r} and "
                    f"again by {source!r}; bump the version or rename one of them"
                )
            versions[version] = cls
            self.sources[(kind, name, version)] = source

        return register

    @classmethod
    def build(cls, plugins: Iterable[tuple[str, Any]]) -> Registry:
        """Build a registry from ``(source name, plugin module/object)`` pairs."""
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        for source, plugin in plugins:
            if pm.is_registered(plugin):
                continue
            if pm.has_plugin(source):
                raise ValueError(
                    f"two plugins share the entry-point name {source!r} "
                    f"({pm.get_plugin(source)!r} and {plugin!r}); rename one of them"
                )
            pm.register(plugin, name=source)
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise TypeError(
                f"{exc}. Known hooks: "
                + ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("register_")))
            ) from exc
        reg = cls()
        for kind, (hook_name, _) in _KINDS.items():
            hook = getattr(pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                impl.function(register=reg._register(kind, impl.plugin_name))
        return reg

    # -- lookup -------------------------------------------------------------------
    def resolve(self, kind: str, key: str) -> type:
        """Class for ``name`` or ``name.vN`` (bare name → newest version)."""
        m = _KEY_RE.match(key)
        known = self.entries[kind]
        if m is not None and m["name"] in known:
            versions = known[m["name"]]
            if m["version"] is None:
                return versions[max(versions)]
            v = int(m["version"])
            if v in versions:
                return versions[v]
            raise UnknownPluginError(
                f"unknown {kind} version {key!r}; available: "
                + ", ".join(f"{m['name']}.v{x}" for x in sorted(versions))
            )
        names = self.names(kind)
        close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownPluginError(
            f"unknown {kind} {key!r}.{hint} Registered: {', '.join(names) or '(none)'}. "
            f"Run `dlm-decode plugins` to list them."
        )

    def names(self, kind: str) -> list[str]:
        """Bare names registered for ``kind``, sorted."""
        return sorted(self.entries[kind])

    def listing(self) -> list[dict[str, Any]]:
        """One dict per registered class: kind, name, version, params schema, source."""
        rows = []
        for kind, by_name in self.entries.items():
            for name in sorted(by_name):
                for version, klass in sorted(by_name[name].items()):
                    params = getattr(klass, "Params", None)
                    fields = {}
                    if isinstance(params, type) and issubclass(params, BaseModel):
                        fields = {k: f.default for k, f in params.model_fields.items()}
                    rows.append(
                        {
                            "kind": kind,
                            "name": name,
                            "version": version,
                            "key": f"{name}.v{version}",
                            "params": fields,
                            "requires": list(getattr(klass, "requires", ())),
                            "source": self.sources[(kind, name, version)],
                            "doc": (klass.__doc__ or "").strip().splitlines()[0]
                            if klass.__doc__
                            else "",
                        }
                    )
        return rows


def entry_point_plugins() -> list[tuple[str, Any]]:
    """``(entry-point name, loaded plugin)`` for the built-ins and the allowed plugins.

    The built-ins are recognised by their module (the entry point's value), never by
    name alone, so a third-party entry point that happens to share a built-in's name is
    treated as the third-party plugin it is.
    """
    allowed_env = os.environ.get(ENV_VAR)
    allowed = None
    if allowed_env is not None:
        allowed = {s.strip() for s in allowed_env.split(",") if s.strip()}
    out: list[tuple[str, Any]] = []
    seen_builtin: set[str] = set()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        builtin = BUILTIN_PLUGINS.get(ep.name) == ep.value
        if builtin:
            seen_builtin.add(ep.name)
        elif allowed is not None and ep.name not in allowed:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must say who it is
            raise ImportError(
                f"could not load dlm_decode plugin {ep.name!r} ({ep.value}): {exc}. "
                f"Fix or uninstall it, or set {ENV_VAR} to the plugins you want."
            ) from exc
        out.append((ep.name, plugin))
    # Running from a source tree that was never installed: load built-ins directly.
    for name, module in BUILTIN_PLUGINS.items():
        if name not in seen_builtin:
            out.append((name, importlib.import_module(module)))
    return out


_lock = threading.Lock()
_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = Registry.build(entry_point_plugins())
        return _registry


def reset_registry(plugins: Iterable[tuple[str, ModuleType | Any]] | None = None) -> Registry:
    """Rebuild the process-wide registry (for tests and notebooks).

    Args:
        plugins: explicit ``(name, plugin)`` pairs, added to the built-ins; ``None`` to
            reload from entry points.
    """
    global _registry
    with _lock:
        base = [(n, importlib.import_module(m)) for n, m in BUILTIN_PLUGINS.items()]
        if plugins is None:
            _registry = Registry.build(entry_point_plugins())
        else:
            _registry = Registry.build([*base, *plugins])
        return _registry
