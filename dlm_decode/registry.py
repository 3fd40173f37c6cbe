"""The plugin registry, built once per process from entry points and built-ins.

Names are versioned: ``frechet.v1``. The bare name ``frechet`` resolves to the newest
version registered by the plugin that *owns* the name, its first registrant (the built-ins
own theirs). A version another plugin registers under a name it does not own is reachable
only by its versioned key (``frechet.v2``), and registering it warns
([`PluginNameWarning`][dlm_decode.registry.PluginNameWarning]).

Set ``DLM_DECODE_PLUGINS`` to restrict which *external* plugins load: unset loads every
entry point in the group ``dlm_decode``; a comma-separated list loads only those
entry-point names; an empty string loads none. Built-ins always load.

The process-wide registry imports the built-ins at once and third-party plugins only when
they are needed: when a lookup misses among the names already loaded, when plugins are
listed, or when every entry is read (``entries``, ``sources``, ``names``). Each import is
bounded by ``DLM_DECODE_PLUGIN_TIMEOUT`` seconds (default 30). A third-party plugin that
fails (its import raises or times out, its hook raises, it registers a bad class or a
duplicate) is skipped with one [`PluginLoadWarning`][dlm_decode.registry.PluginLoadWarning]
and everything else keeps working; asking for a name only it could provide raises an
[`UnknownPluginError`][dlm_decode.registry.UnknownPluginError] that names it and its error,
and a plugin named in ``DLM_DECODE_PLUGINS`` that fails raises
[`PluginLoadError`][dlm_decode.registry.PluginLoadError]. A failing built-in is always an
error.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import math
import os
import re
import threading
import warnings
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
    "BUILTIN_OWNER",
    "BUILTIN_PLUGINS",
    "DEFAULT_TIMEOUT_S",
    "ENV_VAR",
    "TIMEOUT_ENV_VAR",
    "PluginLoadError",
    "PluginLoadFailure",
    "PluginLoadWarning",
    "PluginNameWarning",
    "Registry",
    "UnknownPluginError",
    "check_plugin_class",
    "entry_point_plugins",
    "get_registry",
    "reset_registry",
]

ENV_VAR = "DLM_DECODE_PLUGINS"
#: Seconds one third-party plugin's import may take before it is skipped.
TIMEOUT_ENV_VAR = "DLM_DECODE_PLUGIN_TIMEOUT"
DEFAULT_TIMEOUT_S = 30.0
ENTRY_POINT_GROUP = "dlm_decode"
#: The owner of every name the built-ins register.
BUILTIN_OWNER = "dlm_decode"

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
_MAX_ERROR_CHARS = 300


class UnknownPluginError(KeyError):
    """An unknown plugin name; the message suggests the closest registered names, or names
    the plugin that would have provided it and why it failed to load."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0])


class PluginLoadError(ValueError):
    """A plugin named in ``DLM_DECODE_PLUGINS`` failed to load (one-line message naming the
    plugin, its error and the fix)."""


class PluginLoadWarning(UserWarning):
    """A third-party plugin was skipped because it failed to load; the one-line message
    names the plugin, its distribution, the error and the fix."""


class PluginNameWarning(PluginLoadWarning):
    """A plugin registered a version under a name another plugin owns: that version is
    reachable only by its versioned key, never by the bare name."""


@dataclass(frozen=True)
class PluginLoadFailure:
    """Why one third-party plugin was skipped.

    Attributes:
        plugin: the entry-point name (the plugin's name).
        distribution: ``"name version"`` of the installed distribution, if known.
        error: ``"ErrorType: message"`` on one line.
        provides: ``(kind, name)`` pairs the plugin tried to register before it failed
            (empty when its import failed).
        required: the plugin is named in ``DLM_DECODE_PLUGINS``, so its failure is an error.
    """

    plugin: str
    distribution: str | None
    error: str
    provides: tuple[tuple[str, str], ...] = ()
    required: bool = False

    @property
    def who(self) -> str:
        """``plugin 'x' (distribution x-pkg 1.0)``."""
        dist = f" (distribution {self.distribution})" if self.distribution else ""
        return f"plugin {self.plugin!r}{dist}"

    def could_provide(self, kind: str, name: str) -> bool:
        """Whether this plugin registers (or, when its import failed, is named) ``name``."""
        if self.provides:
            return (kind, name) in self.provides
        return self.plugin.replace("-", "_") == name.replace("-", "_")


@dataclass(frozen=True)
class _Candidate:
    """A third-party entry point, found but not imported yet."""

    name: str
    load: Callable[[], Any]
    distribution: str | None
    owner: str
    required: bool


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    if len(text) > _MAX_ERROR_CHARS:
        text = text[: _MAX_ERROR_CHARS - 1] + "…"
    return text


def _error_text(exc: BaseException) -> str:
    msg = _one_line(str(exc))
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


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
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
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


# --------------------------------------------------------------------------------------
# Finding and importing entry points
# --------------------------------------------------------------------------------------


def _allow_list() -> set[str] | None:
    """The entry-point names ``DLM_DECODE_PLUGINS`` allows; ``None`` when it is unset."""
    env = os.environ.get(ENV_VAR)
    if env is None:
        return None
    return {s.strip() for s in env.split(",") if s.strip()}


def _timeout_from_env() -> float:
    """``DLM_DECODE_PLUGIN_TIMEOUT`` in seconds (default 30).

    Raises:
        ValueError: it is not a positive number.
    """
    raw = os.environ.get(TIMEOUT_ENV_VAR, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(
            f"{TIMEOUT_ENV_VAR}={raw!r} is not a number of seconds > 0; set it to e.g. "
            f"{TIMEOUT_ENV_VAR}=60, or unset it for the default {DEFAULT_TIMEOUT_S:g} s"
        )
    return value


def _distribution(ep: importlib.metadata.EntryPoint) -> tuple[str | None, str | None]:
    """``("name version", normalised name)`` of the distribution that declares ``ep``."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    try:
        name = dist.name
        version = dist.version
    except Exception:  # broken metadata: the plugin is still known by its entry point
        return None, None
    if not name:
        return None, None
    return f"{name} {version}", re.sub(r"[-_.]+", "-", name).lower()


def _discover() -> tuple[list[_Candidate], list[str]]:
    """The third-party entry points ``DLM_DECODE_PLUGINS`` allows (not imported), and the
    names it lists that no entry point has. Built-ins are recognised by their module (the
    entry point's value), never by name alone."""
    allowed = _allow_list()
    try:
        eps = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception as exc:  # unreadable metadata must not stop the built-ins
        warnings.warn(
            f"could not read the installed {ENTRY_POINT_GROUP!r} entry points "
            f"({_error_text(exc)}); only the built-in plugins load. Reinstall the "
            f"distribution whose metadata is broken, or set {ENV_VAR}= to load none",
            PluginLoadWarning,
            stacklevel=3,
        )
        eps = []
    found: list[_Candidate] = []
    seen: set[str] = set()
    for ep in eps:
        if BUILTIN_PLUGINS.get(ep.name) == ep.value:
            continue
        seen.add(ep.name)
        if allowed is not None and ep.name not in allowed:
            continue
        label, dist_name = _distribution(ep)
        found.append(
            _Candidate(
                name=ep.name,
                load=ep.load,
                distribution=label,
                owner=dist_name or f"entry point {ep.name}",
                required=allowed is not None,
            )
        )
    missing = sorted(allowed - seen) if allowed is not None else []
    if missing:
        installed = ", ".join(sorted(seen)) or "(none)"
        warnings.warn(
            f"{ENV_VAR} names {', '.join(repr(m) for m in missing)}, but no installed "
            f"plugin has that entry-point name (installed: {installed}); fix the spelling "
            f"or install the plugin",
            PluginLoadWarning,
            stacklevel=3,
        )
    return found, missing


def _import(cand: _Candidate, timeout: float) -> tuple[Any, str | None]:
    """Import one entry point in a daemon thread, waiting at most ``timeout`` seconds.

    Returns:
        ``(plugin, None)``, or ``(None, error text)`` when the import raised or timed out.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["plugin"] = cand.load()
        except BaseException as exc:  # SystemExit in a plugin must not end the host
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"dlm_decode plugin {cand.name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return None, (
            f"importing it took longer than {timeout:g} s ({TIMEOUT_ENV_VAR}; raise it if "
            f"the plugin is just slow)"
        )
    if "error" in box:
        return None, _error_text(box["error"])
    return box["plugin"], None


def _fix_hint(plugin: str, others: Iterable[str]) -> str:
    rest = sorted(set(others) - {plugin})
    limit = f"{ENV_VAR}={','.join(rest)}" if rest else f'{ENV_VAR}=""'
    return f"uninstall it or fix it; {limit} limits which plugins load"


def _failure_warning(failure: PluginLoadFailure, others: Iterable[str]) -> str:
    return f"skipped dlm_decode {failure.who}: {failure.error}; {_fix_hint(failure.plugin, others)}"


def _failure_error(failure: PluginLoadFailure) -> str:
    return (
        f"dlm_decode {failure.who}, named in {ENV_VAR}, failed to load: {failure.error}; "
        f"fix it or uninstall it, or remove it from {ENV_VAR}"
    )


@dataclass
class _Scan:
    """What the last [`entry_point_plugins`][dlm_decode.registry.entry_point_plugins] call
    loaded, so that a registry built from its result treats those plugins as installed
    third-party plugins (skipped with a warning when they fail)."""

    loaded: list[tuple[Any, _Candidate]] = field(default_factory=list)
    failures: list[PluginLoadFailure] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def match(self, source: str, plugin: Any) -> _Candidate | None:
        return next((c for p, c in self.loaded if p is plugin and c.name == source), None)


_last_scan = _Scan()


def _describe(plugin: Any) -> str:
    """``module x.y`` or ``x.Y object``: short enough for a one-line message."""
    if isinstance(plugin, ModuleType):
        return f"module {plugin.__name__}"
    name = getattr(plugin, "__qualname__", None) or type(plugin).__qualname__
    return f"{getattr(plugin, '__module__', '?')}.{name}"


def _is_builtin(source: str, plugin: Any) -> bool:
    return BUILTIN_PLUGINS.get(source) == getattr(plugin, "__name__", None)


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------


class Registry:
    """All registered plugin classes, by kind, name and version.

    Build one with [`build`][dlm_decode.registry.Registry.build] (explicit plugins, all
    imported) or [`from_entry_points`][dlm_decode.registry.Registry.from_entry_points]
    (the built-ins now, installed plugins when needed).
    """

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, dict[int, type]]] = {k: {} for k in _KINDS}
        self._sources: dict[tuple[str, str, int], str] = {}
        self._owner: dict[tuple[str, str], str] = {}  # (kind, name) → owner
        self._first: dict[tuple[str, str], str] = {}  # (kind, name) → first source
        self._source_owner: dict[str, str] = {}
        self._plugins: dict[str, Any] = {}
        self._pending: list[_Candidate] = []
        self._failures: dict[str, PluginLoadFailure] = {}
        self._third_party: list[str] = []
        self._timeout = DEFAULT_TIMEOUT_S
        self._lock = threading.RLock()

    # -- building -----------------------------------------------------------------
    @classmethod
    def build(cls, plugins: Iterable[tuple[str, Any]]) -> Registry:
        """Build a registry from ``(source name, plugin module/object)`` pairs, in order.

        A failing plugin passed here raises, except one that
        [`entry_point_plugins`][dlm_decode.registry.entry_point_plugins] loaded from an
        installed distribution: that one is skipped with a
        [`PluginLoadWarning`][dlm_decode.registry.PluginLoadWarning].

        Args:
            plugins: the pairs; the same object twice is registered once.

        Raises:
            TypeError: a misspelled hook or a bad class.
            ValueError: two plugins share a name, or a key is registered twice.
            PluginLoadError: a plugin named in ``DLM_DECODE_PLUGINS`` failed.
        """
        reg = cls()
        scan = _last_scan
        from_scan = False
        for source, plugin in plugins:
            cand = scan.match(source, plugin)
            if cand is not None:
                from_scan = True
                reg._add(source, plugin, cand.owner, cand.distribution, True, cand.required)
            elif _is_builtin(source, plugin):
                reg._add(source, plugin, BUILTIN_OWNER)
            else:
                reg._add(source, plugin, source)
        if from_scan:
            reg._third_party = list(scan.names)
            for failure in scan.failures:
                reg._failures.setdefault(failure.plugin, failure)
        reg._raise_required()
        return reg

    @classmethod
    def from_entry_points(cls) -> Registry:
        """The built-ins, imported now, and the installed plugins ``DLM_DECODE_PLUGINS``
        allows, imported the first time they are needed (each within
        ``DLM_DECODE_PLUGIN_TIMEOUT`` seconds). The environment is read here.

        Raises:
            ValueError: ``DLM_DECODE_PLUGIN_TIMEOUT`` is not a positive number.
        """
        reg = cls()
        candidates, _ = _discover()
        if candidates:
            reg._timeout = _timeout_from_env()
        for name, module in BUILTIN_PLUGINS.items():
            reg._add(name, importlib.import_module(module), BUILTIN_OWNER)
        reg._pending = candidates
        reg._third_party = [c.name for c in candidates]
        return reg

    def _add(
        self,
        source: str,
        plugin: Any,
        owner: str,
        distribution: str | None = None,
        tolerant: bool = False,
        required: bool = False,
    ) -> None:
        """Register one plugin's classes, all or none. A ``tolerant`` plugin that fails is
        recorded and skipped; any other failure raises."""
        if any(p is plugin for p in self._plugins.values()):
            return
        staged: list[tuple[str, type]] = []
        try:
            if source in self._plugins:
                raise ValueError(
                    f"two plugins share the entry-point name {source!r} "
                    f"({_describe(self._plugins[source])} and {_describe(plugin)}); rename one "
                    f"of them"
                )
            self._collect(source, plugin, staged)
            self._check(source, staged)
        except Exception as exc:
            if not tolerant:
                raise
            provides = tuple(
                dict.fromkeys(
                    (kind, c.name)
                    for kind, c in staged
                    if isinstance(getattr(c, "name", None), str)
                )
            )
            self._fail(
                PluginLoadFailure(source, distribution, _error_text(exc), provides, required)
            )
            return
        self._plugins[source] = plugin
        self._source_owner[source] = owner
        for kind, klass in staged:
            self._commit(kind, klass, source, owner, distribution)

    @staticmethod
    def _collect(source: str, plugin: Any, staged: list[tuple[str, type]]) -> None:
        """Run the plugin's hooks, appending what they register to ``staged``."""
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        try:
            pm.register(plugin, name=source)
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise TypeError(
                f"{_one_line(str(exc))}. Known hooks: "
                + ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("register_")))
            ) from exc
        for kind, (hook_name, _) in _KINDS.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():

                def register(klass: type, kind: str = kind) -> None:
                    staged.append((kind, klass))
                    check_plugin_class(kind, klass, source)

                impl.function(register=register)

    def _check(self, source: str, staged: list[tuple[str, type]]) -> None:
        """Every staged class passes the checks and no key is taken."""
        seen: set[tuple[str, str, int]] = set()
        for kind, klass in staged:
            check_plugin_class(kind, klass, source)  # again: a hook may swallow the error
            name, version = klass.name, getattr(klass, "version", 1)
            key = (kind, name, version)
            if key in seen:
                raise ValueError(
                    f"plugin {source!r} registers {kind} '{name}.v{version}' twice; "
                    f"register each class once, or bump the version of one of them"
                )
            if key in self._sources:
                raise ValueError(
                    f"duplicate {kind} '{name}.v{version}': registered by "
                    f"{self._sources[key]!r} and again by {source!r}; bump the version "
                    f"or rename one of them"
                )
            seen.add(key)

    def _commit(
        self, kind: str, klass: type, source: str, owner: str, distribution: str | None
    ) -> None:
        name, version = klass.name, getattr(klass, "version", 1)
        self._entries[kind].setdefault(name, {})[version] = klass
        self._sources[(kind, name, version)] = source
        first = self._first.setdefault((kind, name), source)
        if self._owner.setdefault((kind, name), owner) == owner:
            return
        who = "the built-ins" if self._owner[(kind, name)] == BUILTIN_OWNER else repr(first)
        dist = f" (distribution {distribution})" if distribution else ""
        warnings.warn(
            f"plugin {source!r}{dist} registers {kind} '{name}.v{version}' under the name "
            f"{name!r}, which belongs to {who}: the bare name {name!r} still means "
            f"'{name}.v{self._default_version(kind, name)}'; ask for '{name}.v{version}' to "
            f"use this one, or give the class a name of its own",
            PluginNameWarning,
            stacklevel=2,
        )

    def _fail(self, failure: PluginLoadFailure) -> None:
        self._failures[failure.plugin] = failure
        if not failure.required:
            warnings.warn(
                _failure_warning(failure, self._third_party), PluginLoadWarning, stacklevel=2
            )

    def _load_pending(self) -> None:
        """Import and register every third-party plugin not loaded yet, in entry-point
        order (so a name's owner does not depend on which lookup came first)."""
        with self._lock:
            while self._pending:
                cand = self._pending.pop(0)
                plugin, error = _import(cand, self._timeout)
                if error is not None:
                    self._fail(
                        PluginLoadFailure(cand.name, cand.distribution, error, (), cand.required)
                    )
                    continue
                self._add(cand.name, plugin, cand.owner, cand.distribution, True, cand.required)

    def _raise_required(self) -> None:
        for failure in self._failures.values():
            if failure.required:
                raise PluginLoadError(_failure_error(failure))

    def _ensure_loaded(self) -> None:
        self._load_pending()
        self._raise_required()

    # -- views ----------------------------------------------------------------------
    @property
    def entries(self) -> dict[str, dict[str, dict[int, type]]]:
        """Kind → name → version → class, every plugin loaded (read-only by convention).

        Raises:
            PluginLoadError: a plugin named in ``DLM_DECODE_PLUGINS`` failed to load.
        """
        with self._lock:
            self._ensure_loaded()
            return self._entries

    @property
    def sources(self) -> dict[tuple[str, str, int], str]:
        """``(kind, name, version)`` → the entry-point name of the plugin that registered it.

        Raises:
            PluginLoadError: a plugin named in ``DLM_DECODE_PLUGINS`` failed to load.
        """
        with self._lock:
            self._ensure_loaded()
            return self._sources

    @property
    def failures(self) -> list[PluginLoadFailure]:
        """The third-party plugins that were skipped (every plugin loaded first)."""
        with self._lock:
            self._load_pending()
            return list(self._failures.values())

    def owner(self, kind: str, name: str) -> str | None:
        """Who owns the bare ``name``: ``"dlm_decode"`` for the built-ins, else the
        distribution (or entry-point name) of its first registrant; ``None`` if unknown."""
        with self._lock:
            if (kind, name) not in self._owner:
                self._load_pending()
            return self._owner.get((kind, name))

    def matching(self, kind: str, predicate: Callable[[type], bool]) -> list[type]:
        """The classes a bare name means (each name's default version) that satisfy
        ``predicate``, for lookups by something other than a name (a model's
        ``config_model_types``).

        The plugins imported so far (the built-ins first) are searched first; the other
        installed plugins are imported only when none of those matches, so a built-in's
        match never imports, or is overridden by, a third-party plugin.

        Args:
            kind: ``policy``, ``cache``, ``model`` or ``task``.
            predicate: called with each class.

        Returns:
            The matching classes, in name order (empty when none).
        """
        with self._lock:
            for load in (False, True):
                if load:
                    self._ensure_loaded()
                found = [
                    self._entries[kind][n][self._default_version(kind, n)]
                    for n in sorted(self._entries[kind])
                ]
                found = [c for c in found if predicate(c)]
                if found:
                    return found
            return []

    # -- lookup -------------------------------------------------------------------
    def _default_version(self, kind: str, name: str) -> int:
        owner = self._owner[(kind, name)]
        versions = self._entries[kind][name]
        return max(
            v for v in versions if self._source_owner[self._sources[(kind, name, v)]] == owner
        )

    def _find(self, kind: str, m: re.Match[str] | None) -> type | None:
        if m is None or m["name"] not in self._entries[kind]:
            return None
        versions = self._entries[kind][m["name"]]
        if m["version"] is None:
            return versions[self._default_version(kind, m["name"])]
        return versions.get(int(m["version"]))

    def resolve(self, kind: str, key: str) -> type:
        """Class for ``name`` or ``name.vN``.

        A bare name means the newest version its owner registered; ``name.vN`` means that
        version, whoever registered it. Third-party plugins are imported only when the
        key is not among the classes already loaded.

        Args:
            kind: ``policy``, ``cache``, ``model`` or ``task``.
            key: ``frechet`` or ``frechet.v1``.

        Raises:
            UnknownPluginError: unknown kind, name or version; the message suggests close
                names, or names the plugin that failed to load and would provide it.
            PluginLoadError: a plugin named in ``DLM_DECODE_PLUGINS`` failed to load.
        """
        if kind not in _KINDS:
            raise UnknownPluginError(f"unknown plugin kind {kind!r}; kinds: {', '.join(_KINDS)}")
        m = _KEY_RE.match(key)
        with self._lock:
            found = self._find(kind, m)
            if found is not None:
                return found
            self._ensure_loaded()
            found = self._find(kind, m)
            if found is not None:
                return found
            raise self._unknown(kind, key, m)

    def resolve_key(self, kind: str, key: str) -> str:
        """The versioned key (``frechet.v1``) that ``key`` resolves to.

        Raises:
            UnknownPluginError: as [`resolve`][dlm_decode.registry.Registry.resolve].
        """
        klass = self.resolve(kind, key)
        return f"{klass.name}.v{getattr(klass, 'version', 1)}"

    def _unknown(self, kind: str, key: str, m: re.Match[str] | None) -> UnknownPluginError:
        name = m["name"] if m is not None else key
        failed = list(self._failures.values())
        culprit = next((f for f in failed if f.could_provide(kind, name)), None)
        if culprit is not None:
            verb = "comes from" if culprit.provides else "would come from"
            return UnknownPluginError(
                f"{kind} {key!r} {verb} dlm_decode {culprit.who}, which failed to load: "
                f"{culprit.error}; {_fix_hint(culprit.plugin, self._third_party)}"
            )
        maybe = [f for f in failed if not f.provides]
        note = ""
        if maybe:
            note = (
                " Plugins that failed to load and may provide it: "
                + "; ".join(f"{f.plugin!r} ({f.error})" for f in maybe)
                + "."
            )
        known = self._entries[kind]
        if m is not None and m["name"] in known:
            return UnknownPluginError(
                f"unknown {kind} version {key!r}; available: "
                + ", ".join(f"{m['name']}.v{x}" for x in sorted(known[m["name"]]))
                + "."
                + note
            )
        names = sorted(known)
        close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return UnknownPluginError(
            f"unknown {kind} {key!r}.{hint} Registered: {', '.join(names) or '(none)'}.{note} "
            f"Run `dlm-decode plugins` to list them."
        )

    def names(self, kind: str) -> list[str]:
        """Bare names registered for ``kind``, sorted (every plugin loaded)."""
        with self._lock:
            self._ensure_loaded()
            return sorted(self._entries[kind])

    def listing(self) -> list[dict[str, Any]]:
        """One dict per registered class: kind, name, version, key, whether the bare name
        means it (``default``), params schema, requirements, source and summary."""
        with self._lock:
            self._ensure_loaded()
            rows = []
            for kind, by_name in self._entries.items():
                for name in sorted(by_name):
                    default = self._default_version(kind, name)
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
                                "default": version == default,
                                "params": fields,
                                "requires": list(getattr(klass, "requires", ())),
                                "source": self._sources[(kind, name, version)],
                                "doc": (klass.__doc__ or "").strip().splitlines()[0]
                                if klass.__doc__
                                else "",
                            }
                        )
            return rows


def entry_point_plugins() -> list[tuple[str, Any]]:
    """``(entry-point name, loaded plugin)`` for the built-ins and the allowed plugins, all
    imported now (each third-party import within ``DLM_DECODE_PLUGIN_TIMEOUT`` seconds).

    A third-party plugin whose import fails or times out is left out with a
    [`PluginLoadWarning`][dlm_decode.registry.PluginLoadWarning];
    [`Registry.build`][dlm_decode.registry.Registry.build] on the result remembers it, and
    skips (with a warning) a returned plugin whose hooks fail.

    Raises:
        PluginLoadError: a plugin named in ``DLM_DECODE_PLUGINS`` failed to import.
        ValueError: ``DLM_DECODE_PLUGIN_TIMEOUT`` is not a positive number.
    """
    global _last_scan
    candidates, _ = _discover()
    timeout = _timeout_from_env() if candidates else DEFAULT_TIMEOUT_S
    out: list[tuple[str, Any]] = [
        (name, importlib.import_module(module)) for name, module in BUILTIN_PLUGINS.items()
    ]
    scan = _Scan(names=[c.name for c in candidates])
    for cand in candidates:
        plugin, error = _import(cand, timeout)
        if error is None:
            out.append((cand.name, plugin))
            scan.loaded.append((plugin, cand))
            continue
        failure = PluginLoadFailure(cand.name, cand.distribution, error, (), cand.required)
        if failure.required:
            raise PluginLoadError(_failure_error(failure))
        warnings.warn(_failure_warning(failure, scan.names), PluginLoadWarning, stacklevel=2)
        scan.failures.append(failure)
    _last_scan = scan
    return out


_lock = threading.Lock()
_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use (see
    [`Registry.from_entry_points`][dlm_decode.registry.Registry.from_entry_points])."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = Registry.from_entry_points()
        return _registry


def reset_registry(plugins: Iterable[tuple[str, ModuleType | Any]] | None = None) -> Registry:
    """Rebuild the process-wide registry (for tests and notebooks).

    Args:
        plugins: explicit ``(name, plugin)`` pairs, added to the built-ins; ``None`` to
            reload from entry points (reading ``DLM_DECODE_PLUGINS`` now).
    """
    global _registry
    with _lock:
        if plugins is None:
            _registry = Registry.from_entry_points()
        else:
            base = [(n, importlib.import_module(m)) for n, m in BUILTIN_PLUGINS.items()]
            _registry = Registry.build([*base, *plugins])
        return _registry
