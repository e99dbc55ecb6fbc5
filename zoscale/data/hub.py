"""The suite's data sets by hub name, through ``datasets.load_dataset``, where a network exists.

``data.path=hub`` loads the task's data set under the name the anchors use (MeZO: ``glue/sst2``,
``super_glue`` configs, ``squad``, ``drop``; ZO-Bench: ``winogrande/winogrande_m``);
``data.path=hub:<name>`` or ``hub:<name>/<config>`` names another. The hub's rows become the same
records :mod:`zoscale.data.formats` reads from the distributed files (the field names agree for
GLUE, SuperGLUE and WinoGrande; SQuAD's ``answers.text`` and DROP's ``answers_spans.spans`` become
``answers``), so one template serves both. No network here: the tests replace
``datasets.load_dataset`` with in-memory data sets of the hub's layout.
"""

from __future__ import annotations

from typing import Any

__all__ = ["HUB_NAMES", "is_hub", "read_hub_split"]

Record = tuple[dict[str, Any], str]
#: Task -> (hub data set, config).
HUB_NAMES: dict[str, tuple[str, str | None]] = {
    "sst2": ("glue", "sst2"), "rte": ("super_glue", "rte"), "cb": ("super_glue", "cb"),
    "boolq": ("super_glue", "boolq"), "wsc": ("super_glue", "wsc.fixed"), "wic": ("super_glue", "wic"),
    "multirc": ("super_glue", "multirc"), "copa": ("super_glue", "copa"), "record": ("super_glue", "record"),
    "squad": ("squad", None), "drop": ("drop", None), "winogrande": ("winogrande", "winogrande_m"),
}


def is_hub(path: str | None) -> bool:
    return path is not None and (path == "hub" or path.startswith("hub:"))


def _name(path: str, dataset: str | None) -> tuple[str, str | None]:
    if path == "hub":
        if dataset not in HUB_NAMES:
            raise ValueError("data.path=hub: no hub name is known for this task; use data.path=hub:<name>[/<config>]")
        return HUB_NAMES[dataset]
    name = path[len("hub:"):]
    if not name:
        raise ValueError("data.path=hub: needs a name after the colon, e.g. hub:super_glue/rte")
    base, _, config = name.partition("/")
    if not base or "/" in config:
        raise ValueError(f"data.path={path}: expected hub:<name> or hub:<name>/<config>")
    return base, config or None


def _as_record(row: dict[str, Any]) -> dict[str, Any]:
    """The distributed files' field names for the hub's nested answer columns."""
    row = dict(row)
    if isinstance(row.get("answers"), dict) and "text" in row["answers"]:  # SQuAD
        row["answers"] = list(row["answers"]["text"])
    if isinstance(row.get("answers_spans"), dict):  # DROP
        row["answers"] = list(row.pop("answers_spans").get("spans", []))
    return row


def read_hub_split(path: str, dataset: str | None, split: str) -> list[Record]:
    """Records of ``split`` (``train`` or ``validation``) of the hub data set ``path`` names."""
    import datasets  # deferred: importing datasets costs about a second

    name, config = _name(path, dataset)
    label = f"{name}/{config}" if config else name
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # no network, an unknown name or config: datasets raises many kinds
        raise ValueError(f"data.path={path}: could not load {label} split {split!r} from the hub: {err}") from None
    records = [(_as_record(row), f"{label}[{split}][{i}]") for i, row in enumerate(rows)]
    if not records:
        raise ValueError(f"data.path={path}: {label} split {split!r} has no rows")
    return records
