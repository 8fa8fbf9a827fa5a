"""Label values: parsing them from data, and the ordered label set stored in the artifact.

The label set and its order come from the training split only and are written to the manifest;
everything afterwards (validation, test, posted data in the service) is mapped through that stored
order and a label the model never saw is an error, never a silent new class.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from core.tasks import Task


class LabelError(ValueError):
    """A single label value is not acceptable; the caller adds where it was found."""


def _scalar_class(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
        raise LabelError(f"class label {value!r} is not an integer or a string")
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise LabelError("empty label")
        return value
    raise LabelError(f"class label {value!r} has type {type(value).__name__}; expected a string or an integer")


def parse_label(task: Task, value: Any, delimiter: str | None = None) -> str | list[str] | float:
    """Normalise one raw label: a class name, a list of class names, or a float.

    Raises:
        LabelError: the value is missing or not of the kind the task needs.
    """
    if value is None:
        raise LabelError("missing label")
    if task is Task.CLASSIFICATION:
        return _scalar_class(value)
    if task is Task.MULTILABEL:
        if isinstance(value, str):
            if delimiter is None:
                raise LabelError(
                    f"multi-label value {value!r} is a string; give a list per row or set data.label_delimiter"
                )
            value = [part for part in value.split(delimiter) if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise LabelError(f"multi-label value {value!r} is not a list of labels")
        names = [_scalar_class(v) for v in value]
        if len(set(names)) != len(names):
            raise LabelError(f"multi-label value {value!r} repeats a label")
        return names
    # regression
    if isinstance(value, bool):
        raise LabelError(f"regression target {value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LabelError(f"regression target {value!r} is not a number") from None
    if not math.isfinite(number):
        raise LabelError(f"regression target {value!r} is not finite")
    return number


def label_set(task: Task, values: Iterable[str | list[str]]) -> list[str]:
    """The ordered label names seen in training data: numeric order if all are integers, else sorted."""
    if task is Task.REGRESSION:
        raise ValueError("regression has no label set")
    seen: set[str] = set()
    for value in values:
        seen.update(value if isinstance(value, list) else [value])
    if all(_is_int(name) for name in seen):
        return sorted(seen, key=int)
    return sorted(seen)


def _is_int(name: str) -> bool:
    try:
        int(name)
    except ValueError:
        return False
    return True


def to_targets(task: Task, values: Sequence[Any], labels: Sequence[str] | None) -> np.ndarray:
    """Encode parsed labels as model targets: class ids, multi-hot rows, or floats.

    Raises:
        LabelError: a label is not in ``labels``; the message lists the unknown ones.
    """
    if task is Task.REGRESSION:
        return np.asarray(values, dtype=np.float32)
    assert labels is not None
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({name for v in values for name in (v if isinstance(v, list) else [v])} - index.keys())
    if unknown:
        raise LabelError(f"unknown label(s) {unknown}; the model knows {list(labels)}")
    if task is Task.CLASSIFICATION:
        return np.asarray([index[v] for v in values], dtype=np.int64)
    multi_hot = np.zeros((len(values), len(labels)), dtype=np.float32)
    for row, names in enumerate(values):
        multi_hot[row, [index[n] for n in names]] = 1.0
    return multi_hot
