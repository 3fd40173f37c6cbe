"""Evaluation tasks, registered through the ``register_tasks`` hook."""

from __future__ import annotations

from collections.abc import Callable

from dlm_decode.hookspecs import hookimpl
from dlm_decode.tasks.base import Sample, Task

__all__ = ["Sample", "Task", "register_tasks"]


@hookimpl
def register_tasks(register: Callable[[type], None]) -> None:
    """Register the built-in tasks."""
    for cls in _builtin_tasks():
        register(cls)


def _builtin_tasks() -> list[type[Task]]:
    tasks: list[type[Task]] = []
    # Benchmarks: GSM8K, MATH / MATH-500, HumanEval, MBPP.
    from dlm_decode.tasks.codegen import HumanEvalTask, MbppTask
    from dlm_decode.tasks.competition_math import Math500Task, MathTask
    from dlm_decode.tasks.gsm8k import GSM8KTask

    tasks += [GSM8KTask, MathTask, Math500Task, HumanEvalTask, MbppTask]
    # The synthetic suite of the shipped tiny model.
    from dlm_decode.tasks.synthetic import SyntheticTask

    tasks.append(SyntheticTask)
    return tasks
