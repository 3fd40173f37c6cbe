"""The whole plugin contract: every hook a ``dlm_decode`` plugin may implement.

A plugin is a module (or object) named by an entry point in the group ``dlm_decode``::

    [project.entry-points.dlm_decode]
    my_policies = "my_package.plugin"

Each hook receives a ``register`` callback from the host and calls it once per class it
provides. Hooks run once per process, when the registry is built; the decoding loop only
ever calls the registered classes' methods. The built-in policies (``policies``), caches
(``caches``) and models (``dlm_decode.models``) register through these same hooks.

Validation at load time: a hook implementation whose name matches no spec below is
rejected (pluggy ``check_pending``); a registered class that does not subclass the right
base is rejected with ``TypeError``; a name registered twice with the same version is
rejected with ``ValueError``. An installed third-party plugin that fails any of these (or
whose import or hook raises) is skipped, all its classes with it, with one
[`PluginLoadWarning`][dlm_decode.registry.PluginLoadWarning]; a failing built-in is an
error.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT = "dlm_decode"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Decorate plugin functions with this marker.
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- Stage 1: components of a decode ----------------------------------------------------


@hookspec
def register_commit_policies(register: Callable[[type], None]) -> None:
    """Register commit policies.

    Results are not combined: implementations return ``None``; all of them run.

    Args:
        register: call ``register(PolicyClass)`` for each
            [`CommitPolicy`][dlm_decode.interfaces.CommitPolicy] subclass. The class sets
            ``name``, ``version`` and a pydantic ``Params`` model with ``extra="forbid"``.
    """


@hookspec
def register_caches(register: Callable[[type], None]) -> None:
    """Register KV-cache strategies.

    All implementations run; they return ``None``.

    Args:
        register: call ``register(CacheClass)`` for each
            [`Cache`][dlm_decode.interfaces.Cache] subclass (``name``, ``version``, ``Params``).
    """


@hookspec
def register_models(register: Callable[[type], None]) -> None:
    """Register model architectures.

    All implementations run; they return ``None``.

    Args:
        register: call ``register(ModelClass)`` for each
            [`Model`][dlm_decode.interfaces.Model] subclass. Its ``config_model_types`` lists
            the ``config.json`` ``model_type`` values it loads.
    """


# --- Stage 2: evaluation -------------------------------------------------------------


@hookspec
def register_tasks(register: Callable[[type], None]) -> None:
    """Register evaluation tasks.

    All implementations run; they return ``None``.

    Args:
        register: call ``register(TaskClass)`` for each
            [`Task`][dlm_decode.tasks.base.Task] subclass (``name``, ``version``).
    """
