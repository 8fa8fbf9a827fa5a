"""Evaluations posted in parts: a labelled file larger than one request allows is posted as numbered parts of one
evaluation, and the last part is answered with the report of all of them, exactly as one request would be (the
metrics, their intervals and the worst examples over every example). The service keeps each part's targets and
the model's outputs, not its texts, until the last part or until the evaluation goes idle.

An evaluation lives in the process that received its parts: behind several workers or replicas without sticky
routing, post the whole file to one of them or score it offline (`tuneserve evaluate ARTIFACT --data FILE`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from core.metrics import joined
from service.requests import RequestError


class PartError(RequestError):
    """A part that does not continue the evaluation it names (HTTP 409)."""

    status = 409


@dataclass
class Parted:
    """One evaluation's parts so far."""

    model: Any  # the ServedModel that scored them: a model removed and added again starts over
    targets: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    examples: int = 0
    touched: float = field(default_factory=time.monotonic)

    @property
    def parts(self) -> int:
        return len(self.targets)


class PartedEvaluations:
    """The evaluations in parts a service holds, bounded in examples, in number and in idle time.

    Args:
        max_examples: the most examples one evaluation may hold over all its parts.
        max_open: the most evaluations held at once; more get 409 until one ends or goes idle.
        idle_seconds: an evaluation whose next part does not come within this long is dropped.
    """

    def __init__(self, max_examples: int, max_open: int = 16, idle_seconds: float = 600.0) -> None:
        self.max_examples, self.max_open, self.idle_seconds = max_examples, max_open, idle_seconds
        self._open: dict[tuple[str, str], Parted] = {}
        self._lock = threading.Lock()

    def check(self, model: Any, name: str, part_id: str, index: int, examples: int) -> None:
        """Refuse, before the model runs, a part that cannot continue its evaluation.

        Raises:
            PartError: the first part of an evaluation already open, a later part of one that is not (never begun,
                ended, dropped when idle, or begun on another process), a part out of order, too many examples
                over all parts, or too many evaluations open.
        """
        with self._lock:
            self._refuse(model, name, part_id, index, examples)

    def _refuse(self, model: Any, name: str, part_id: str, index: int, examples: int) -> None:
        self._drop_idle()
        held = self._open.get((name, part_id))
        if index == 0:
            if held is not None:
                raise PartError(f"part.id: evaluation {part_id!r} is already open (part 0 came before); give each "
                                "evaluation a new id")
            if len(self._open) >= self.max_open:
                raise PartError(f"part: {len(self._open)} evaluations in parts are open, this service's limit; "
                                f"post again when one ends (an idle one ends after {self.idle_seconds:g} s)")
        elif held is None or held.model is not model:
            raise PartError(f"part.id: no evaluation {part_id!r} of model {name!r} is open here: its part 0 was "
                            f"not posted, it ended, it was idle for over {self.idle_seconds:g} s, the model was "
                            "replaced, or part 0 went to another process; post the file again from part 0")
        elif index != held.parts:
            raise PartError(f"part.index: {index}, but evaluation {part_id!r} expects part {held.parts} next; "
                            "post the parts in order, one at a time")
        total = examples + (held.examples if held is not None and index > 0 else 0)
        if total > self.max_examples:
            raise PartError(f"part: {total:,} examples over this evaluation's parts, over the limit of "
                            f"{self.max_examples:,} (TUNESERVE_MAX_PARTED_EXAMPLES); score a larger file "
                            "offline with `tuneserve evaluate ARTIFACT --data FILE`")

    def add(self, model: Any, name: str, part_id: str, index: int, last: bool, targets: Any, outputs: Any
            ) -> tuple[Any, Any, int] | int:
        """Keep one part. Returns the examples held so far for a part that is not the last; for the last, the targets
        and outputs of all the parts as one, and how many parts there were (the evaluation is then closed).

        Raises:
            PartError: as :meth:`check` (another request for the same evaluation may have come in between).
        """
        with self._lock:
            self._refuse(model, name, part_id, index, len(targets))
            held = self._open.setdefault((name, part_id), Parted(model)) if index == 0 else self._open[(name, part_id)]
            held.targets.append(targets)
            held.outputs.append(outputs)
            held.examples += len(targets)
            held.touched = time.monotonic()
            if not last:
                return held.examples
            del self._open[(name, part_id)]
        return joined(held.targets), joined(held.outputs), held.parts

    def forget(self, name: str) -> None:
        """Drop the open evaluations of a model that is no longer served."""
        with self._lock:
            for key in [key for key in self._open if key[0] == name]:
                del self._open[key]

    def _drop_idle(self) -> None:
        now = time.monotonic()
        for key in [key for key, held in self._open.items() if now - held.touched > self.idle_seconds]:
            del self._open[key]
