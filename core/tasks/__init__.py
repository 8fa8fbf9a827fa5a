"""Tasks as plug-ins: one module per task family, each a :class:`~core.tasks.base.TaskSpec`.

A task spec owns everything training and serving must never disagree on: how labels are read and
checked, the label vocabulary, how raw outputs become scores and decisions, how a decision is shaped as
JSON, which metrics and baselines apply, how two backends are compared, and the request and response
models of the HTTP API. ``Task.X.spec`` is the one way in; nothing outside this package (and the
torch-side registry in ``training/recipe/torch_tasks.py``) branches on the task.

Adding a task: write a module here with a ``ScoringSpec`` or ``WritingSpec`` subclass, add its name to
:class:`Task` (core/tasks/base.py) and its spec to ``SPECS`` below, and add its torch side (peft task type, loss,
target dtype, what wraps the transformer) to ``training/recipe/torch_tasks.py`` (docs/development.md: "Adding a task").
"""

from __future__ import annotations

from core.tasks.base import LOWER_IS_BETTER, SPECS, Task, TaskSpec, is_better, postprocess, spec_for
from core.tasks.embedding import EmbeddingSpec
from core.tasks.generation import GenerationSpec
from core.tasks.sequence import ClassificationSpec, MultiLabelSpec, RegressionSpec
from core.tasks.token import TokenClassificationSpec

SPECS.update({Task.CLASSIFICATION: ClassificationSpec(), Task.MULTILABEL: MultiLabelSpec(),
              Task.REGRESSION: RegressionSpec(), Task.TOKEN_CLASSIFICATION: TokenClassificationSpec(),
              Task.GENERATION: GenerationSpec(), Task.EMBEDDING: EmbeddingSpec()})



def model_routes() -> dict[str, str]:
    """Every route that runs a model, with the kind of model that answers it (the first spec to name it)."""
    routes: dict[str, str] = {}
    for spec in SPECS.values():
        for route in spec.routes:
            routes.setdefault(route, spec.kind)
    return routes


__all__ = ["LOWER_IS_BETTER", "Task", "TaskSpec", "is_better", "model_routes", "postprocess", "spec_for"]
