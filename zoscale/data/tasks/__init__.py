"""Tasks: how a raw record becomes a prompt and candidates, and how a model is trained and scored on it.

Three families, each as MeZO formulates it: classification, multiple choice and generation
(:mod:`.classification`, :mod:`.multiple_choice`, :mod:`.generation`); the seed papers' suite and
the built-in real tasks in :mod:`.suite`; a user's own task from the config in :mod:`.custom`.
The trainer asks :func:`build_task` for the configured :class:`Task` and never branches on it.
"""

from __future__ import annotations

from typing import Any

from zoscale.data.tasks.classification import Classification
from zoscale.data.tasks.custom import CustomTemplate, custom_spec
from zoscale.data.tasks.encoding import Encoder, Example, left_pad
from zoscale.data.tasks.forward import label_logits, last_logits, option_logprobs
from zoscale.data.tasks.generation import Generation, greedy_decode
from zoscale.data.tasks.metrics import best_em_f1, normalize_answer
from zoscale.data.tasks.multiple_choice import MultipleChoice
from zoscale.data.tasks.registry import FAMILIES, TASKS, Family, Task, TaskSpec, build_family, register_task, task_spec

__all__ = [
    "FAMILIES", "TASKS", "Classification", "CustomTemplate", "Encoder", "Example", "Family", "Generation",
    "MultipleChoice", "Task", "TaskSpec", "best_em_f1", "build_task", "greedy_decode", "label_logits", "last_logits",
    "left_pad", "normalize_answer", "option_logprobs", "register_task", "task_spec",
]


def build_task(data: Any) -> Task:
    """The task a ``DataConfig`` describes (``data.task`` and its options), checked before any data loads."""
    options = {"objective": data.objective, "max_new_tokens": data.max_new_tokens}
    words = tuple(data.label_words) if data.label_words is not None else None
    if data.task == "custom":
        if data.template is None:
            raise ValueError("data.task=custom needs data.template (a prompt with {field} placeholders)")
        family = data.family or "classification"
        template = CustomTemplate(
            template=data.template, family=family, label_field=data.label_field, label_words=words,
            labels=tuple(data.labels) if data.labels is not None else None,
            candidates_field=data.candidates_field, answer_field=data.answer_field)
        return Task(custom_spec(template), build_family(family, options))
    custom_keys = [k for k in ("template", "candidates_field", "answer_field", "labels") if getattr(data, k) is not None]
    if custom_keys:
        raise ValueError(f"data.{custom_keys[0]} applies to data.task=custom only (data.task is {data.task!r})")
    spec = task_spec(data.task)
    if data.family is not None and data.family != spec.family:
        raise ValueError(f"task {spec.name!r} is {spec.family}; data.family={data.family!r} does not apply")
    if words is not None and spec.family != "classification":
        raise ValueError(f"data.label_words applies to classification tasks; {spec.name!r} is {spec.family}")
    if words is not None and (len(words) < 2 or len(set(words)) != len(words)):
        raise ValueError(f"data.label_words must be at least two distinct words, got {list(words)}")
    return Task(spec, build_family(spec.family, options), label_words=words)
