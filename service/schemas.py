"""Request and response types of the HTTP API (they become the OpenAPI schema at /docs.json)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)

from core.tasks.embedding import Embedding
from core.tasks.generation import Generation
from core.tasks.sequence import (
    ClassPrediction,
    MultiLabelPrediction,
    RegressionPrediction,
)
from core.tasks.token import EntitySpan, TokenPrediction


class Example(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: StrictStr | None = Field(None, description="The text to score (or `tokens`, for token models).")
    input: StrictStr | None = Field(None, description="Generation models: the input to write from (the same as "
                                    "`text`).")
    query: StrictStr | None = Field(None, description="Embedding models: the query (the same as `text`).")
    positive: StrictStr | None = Field(None, description="Embedding models: the document the query should find "
                                       "first; the posted examples' positives are the corpus ranked.")
    reference: StrictStr | None = Field(None, description="Generation models: the text the model should write.")
    text_pair: StrictStr | None = Field(None, description="The second text, for models trained on text pairs.")
    label: StrictStr | StrictInt | StrictFloat | None = Field(
        None, description="The true label: a class name (classification) or a number (regression).")
    labels: list[StrictStr | StrictInt] | None = Field(None, description="The true labels (multi-label).")
    entities: list[EntitySpan] | None = Field(None, description="The true entities of `text` (token models).")
    tokens: list[StrictStr] | None = Field(None, description="The text as tokens, instead of `text` (token models).")
    tags: list[StrictStr] | None = Field(None, description="One tag per token (BIO, IOB1 or BIOES), instead of "
                                          "`entities` (token models).")


class EvaluationPart(BaseModel):
    """Which part of an evaluation posted in parts a request is (service/parts.py)."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr = Field(pattern=r"^[A-Za-z0-9_-]{8,64}$", description="The evaluation's id, chosen by the client "
                          "(8 to 64 letters, digits, - or _), the same on each of its parts.")
    index: StrictInt = Field(ge=0, description="0 for the first part, then 1, 2, ...: parts are posted in order, one "
                             "at a time.")
    last: StrictBool = Field(description="true on the part that ends the evaluation: it is answered with the report "
                             "of all the parts' examples, as one request holding them all would be.")
    examples: int | None = Field(None, description="In the answer: the examples the evaluation holds so far.")


class WorstExample(BaseModel):
    index: int = Field(description="The example's position among those evaluated (over all parts, in order).")
    prediction: Any = Field(description="The model's decision, as /predict gives it: a label, labels, a value, "
                            "entities (start, end, label) or a text.")
    loss: float = Field(description="How badly the model answered it (`by` says how); higher is worse.")


class WorstExamples(BaseModel):
    by: str = Field(description="What the loss measures.")
    examples: list[WorstExample] = Field(description="The examples of highest loss, worst first (at most 10).")


class PredictResponse(BaseModel):
    predictions: list[ClassPrediction | MultiLabelPrediction | RegressionPrediction | TokenPrediction | Embedding] = Field(
        description="One prediction per text, in request order.")
    model: str = Field(description="The model served, as name:version.")
    backend: str = Field(description="onnx-int8 | onnx | torch-cuda | torch-cpu")


class EvaluateResponse(BaseModel):
    n: int = Field(description="Examples scored.")
    metrics: dict[str, float] = Field(description="Task metrics on the posted examples (same code as training; "
                                      "macro averages over the labels present in the posted targets).")
    intervals: dict[str, list[float]] = Field(
        description="95% interval [low, high] of each metric: exact binomial for proportions (accuracy), a "
                    "percentile bootstrap over the examples otherwise (none below 20 examples; notes say so).")
    training_metrics: dict[str, float] = Field(
        description="Test metrics recorded when the model was trained, like for like: macro averages recomputed "
                    "over the labels present here where the posted targets lack some.")
    delta: dict[str, float] = Field(description="metrics minus training_metrics, for metrics in both.")
    drift: list[str] = Field(description="Metrics whose interval excludes the training figure: the only differences "
                             "these examples can tell from chance.")
    macro_over: list[str] | None = Field(None, description="The labels (or entity types) macro averages are over.")
    per_class: dict[str, dict[str, float]] | None = Field(None, description="Precision, recall, F1, support per label.")
    confusion_matrix: list[list[int]] | None = Field(
        None, description="Rows: true class, columns: predicted class, in the model's label order (classification).")
    worst: WorstExamples | None = Field(None, description="The examples the model answered worst, to read first "
                                        "(every task but embedding).")
    part: EvaluationPart | None = Field(None, description="For a part of an evaluation in parts: which one, and how "
                                        "many examples the evaluation holds so far.")
    notes: list[str] = Field(default_factory=list, description="Metrics left out or recomputed, labels absent, and "
                             "why.")
    model: str
    backend: str


class EmbedResponse(BaseModel):
    embeddings: list[list[float]] = Field(description="One unit vector per text, in request order (dot product = "
                                          "cosine similarity).")
    dimensions: int = Field(description="The length of each vector.")
    truncated: list[int] = Field(default_factory=list, description="Indices of the texts longer than the model "
                                 "reads: only their first max_length tokens were embedded.")
    model: str = Field(description="The model served, as name:version.")
    backend: str = Field(description="onnx-int8 | onnx | torch-cuda | torch-cpu")


class RankedText(BaseModel):
    index: int = Field(description="The candidate's position in the request.")
    score: float = Field(description="Cosine similarity to the query.")
    text: str = Field(description="The candidate.")


class RankResponse(BaseModel):
    results: list[RankedText] = Field(description="Candidates by decreasing similarity to the query (top_k of them).")
    model: str = Field(description="The model served, as name:version.")
    backend: str = Field(description="onnx-int8 | onnx | torch-cuda | torch-cpu")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"] = Field(description="Who says it; the last message is the user's.")
    content: StrictStr = Field(description="What is said.")


class GenerateResponse(BaseModel):
    generations: list[Generation] = Field(description="One generation per prompt (or conversation), in request order.")
    model: str = Field(description="The model served, as name:version.")
    backend: str = Field(description="onnx | torch-cuda | torch-cpu")
