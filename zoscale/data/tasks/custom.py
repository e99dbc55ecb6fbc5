"""A user's own task from the config, no code: a template with ``{field}`` placeholders and a family.

    data.task=custom data.family=classification data.template="{premise}\\nQuestion: {hypothesis}?\\n"
    data.label_words='["Yes", "No", "Maybe"]' data.labels='["entailment", "contradiction", "neutral"]'

* classification: ``label_words`` (one candidate per class, appended to the prompt verbatim: give
  the leading space where the model expects one), ``label_field`` holding the class, and
  ``labels``, the field's raw value of each class in class order (default: the class index
  ``0..k-1``).
* multiple_choice: ``candidates_field`` holding each record's list of options, ``label_field`` the
  index of the right one.
* generation: ``answer_field`` holding the answer (a string) or the acceptable answers (a list);
  the model is trained on ``" <first answer>\\n"``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from zoscale.data.tasks.encoding import Example
from zoscale.data.tasks.fields import class_index, texts
from zoscale.data.tasks.registry import TaskSpec

__all__ = ["CustomTemplate", "custom_spec"]


def _placeholders(template: str) -> list[str]:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ValueError(f"data.template {template!r} is not a valid template: {e}") from None
    if not names:
        raise ValueError(f"data.template {template!r} names no {{field}}")
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise ValueError(f"data.template {template!r}: placeholders must be plain field names, got {bad}")
    return names


@dataclass(frozen=True)
class CustomTemplate:
    """Renders a record through ``template`` and reads the family's fields; see the module docstring."""

    template: str
    family: str
    label_field: str = "label"
    label_words: tuple[str, ...] | None = None
    labels: tuple[Any, ...] | None = None
    candidates_field: str | None = None
    answer_field: str | None = None

    def __post_init__(self) -> None:
        _placeholders(self.template)
        need = {"classification": "label_words", "multiple_choice": "candidates_field", "generation": "answer_field"}
        if self.family not in need:
            raise ValueError(f"data.family must be one of {sorted(need)} for a custom task, got {self.family!r}")
        if getattr(self, need[self.family]) is None:
            raise ValueError(f"a custom {self.family} task needs data.{need[self.family]}")
        if self.family == "classification":
            if len(self.label_words) < 2 or len(set(self.label_words)) != len(self.label_words):
                raise ValueError(f"data.label_words must be at least two distinct words, got {list(self.label_words)}")
            if self.labels is not None and len(self.labels) != len(self.label_words):
                raise ValueError(f"data.labels has {len(self.labels)} values for {len(self.label_words)} label words")

    def prompt(self, record: dict[str, Any], where: str) -> str:
        values = {}
        for name in _placeholders(self.template):
            if name not in record or record[name] is None:
                raise ValueError(f"{where}: data.template names field {name!r}, which the record lacks "
                                 f"(fields: {sorted(record)})")
            value = record[name]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise ValueError(f"{where}: field {name!r} must be text or a number, got {value!r}")
            values[name] = value
        return self.template.format_map(values)

    def __call__(self, record: dict[str, Any], where: str) -> Example:
        prompt = self.prompt(record, where)
        if self.family == "classification":
            names = self.labels if self.labels is not None else tuple(range(len(self.label_words)))
            label = class_index(record, self.label_field, where, names, allow_index=self.labels is None)
            return Example(prompt, self.label_words, (label,), where=where)
        if self.family == "multiple_choice":
            candidates = tuple(texts(record, self.candidates_field, where))
            label = class_index(record, self.label_field, where, tuple(range(len(candidates))))
            return Example(prompt, candidates, (label,), where=where)
        answers = texts(record, self.answer_field, where)
        return Example(prompt, (f" {answers[0]}\n",), (0,), answers=tuple(answers), where=where)


def custom_spec(template: CustomTemplate) -> TaskSpec:
    """An unregistered spec for a custom task (its data comes from ``data.path``)."""
    return TaskSpec(name="custom", family=template.family, template=template)
