"""Evaluation tasks, registered through the ``register_tasks`` hook."""

from __future__ import annotations

from collections.abc import Callable

from dlm_decode.hookspecs import hookimpl
from dlm_decode.tasks.base import Sample, Task
from dlm_decode.tasks.codegen import HumanEvalTask, MbppTask
from dlm_decode.tasks.competition_math import Math500Task, MathTask
from dlm_decode.tasks.gsm8k import GSM8KTask
from dlm_decode.tasks.synthetic import SyntheticTask
from dlm_decode.tasks.visual_math import MathVerseTask, MathVistaTask

__all__ = ["Sample", "Task", "register_tasks"]

#: The built-in tasks: the benchmarks (GSM8K, MATH / MATH-500, HumanEval, MBPP) and the
#: synthetic suite of the shipped tiny model, and the multimodal MathVista / MathVerse.
BUILTIN_TASKS: tuple[type[Task], ...] = (
    GSM8KTask,
    MathTask,
    Math500Task,
    HumanEvalTask,
    MbppTask,
    SyntheticTask,
    MathVistaTask,
    MathVerseTask,
)


@hookimpl
def register_tasks(register: Callable[[type], None]) -> None:
    """Register the built-in tasks."""
    for cls in BUILTIN_TASKS:
        register(cls)
