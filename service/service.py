"""The tuneserve BentoML service: /predict (or /generate), /evaluate, /metadata and /models over one fine-tuned
artifact or a set of them.

Run it with ``bentoml serve`` from the repository root (bentofile.yaml names this class). The model comes
from the BentoML store (``TUNESERVE_MODEL``, default ``sentiment-lora-onnx:latest``) so that ``bentoml build``
packages it, or from an artifact directory (``TUNESERVE_ARTIFACT``); ``TUNESERVE_MODELS`` serves several, and each
request names its own in its ``model`` field (service/models.py). Each endpoint validates, calls the
backend, and shapes the answer with core/ code: post-processing, labels, prompts and metrics are the trainer's
own. A generation model writes text at /generate (JSON, or server-sent events with ``"stream": true``); the
others answer /predict. The service is ready only after the backend has reproduced the outputs PyTorch gave at
export.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Annotated

import anyio.to_thread
import bentoml
import numpy as np
from pydantic import Field, StrictBool, StrictStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from core.errors import ArtifactError, ConfigError
from core.manifest import Manifest, read_manifest
from core.metrics import Evaluation
from core.report import assessed, report
from core.shared_base import SHARED_DIR, STORED_BASE_FILE
from service.backends import (
    SHARED_BACKEND,
    SharedBases,
    choose_backend,
    cpu_threads,
    shared_base_of,
)
from service.docs import About, api_document, docs_routes
from service.generation import (
    MAX_STOP_CHARS,
    MAX_STOPS,
    EventStream,
    check_prompt_count,
    check_token_budget,
    decoding_options,
    prompt_token_ids,
    stream_events,
)
from service.logs import quiet_client_errors
from service.middleware import (
    BearerAuthMiddleware,
    BodyLimitMiddleware,
    ErrorShapeMiddleware,
    JsonOnlyMiddleware,
)
from service.models import (
    ModelSet,
    ServedModel,
    Source,
    load_model,
    model_name,
    sources,
    sources_of,
)
from service.parts import PartedEvaluations
from service.requests import (
    RequestError,
    check_messages_size,
    check_pairs,
    check_texts,
    examples_to_inputs,
)
from service.schemas import (
    EmbedResponse,
    EvaluateResponse,
    EvaluationPart,
    Example,
    GenerateResponse,
    Message,
    PredictResponse,
    RankedText,
    RankResponse,
)
from service.scorer import NonFiniteOutputs, Scorer
from service.startup import (
    checked_settings,
    stop_server,
    watch_workers,
    worker_of_server,
)
from service.web import web_routes
from service.writer import Writer

logger = logging.getLogger("bentoml.tuneserve")  # under bentoml's logger, so `bentoml serve` shows it
# In the `bentoml serve` process, before any worker starts: a wrong setting or model ends it here, in one line.
SETTINGS = checked_settings()
watch_workers()
quiet_client_errors()
# The limits in force when the service starts are part of its OpenAPI schema; they are checked again at
# request time (check_texts), which names the limit in the message.
Text = Annotated[StrictStr, Field(max_length=SETTINGS.max_chars)]
Stop = Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Conversation = Annotated[list[Message], Field(min_length=1)]
MODEL_FIELD = ("The served model to use, by name (GET /models lists them); optional where the service serves one "
               "model.")


def _store_tags() -> list[str]:
    """The store tags the settings name, and those of the base graphs their entries keep apart (once for the models
    over one base, training/publish/register.py): class attributes of the service (below), so that `bentoml build`
    packages them. Empty where the settings are wrong: the serving process has already said so (checked_settings),
    and a worker says so when it loads."""
    try:
        tags = [source.tag for source in sources(SETTINGS) if source.tag]
    except ConfigError:
        return []
    return tags + list(dict.fromkeys(base for tag in tags if (base := _stored_base_tag(tag))))


def _stored_base_tag(tag: str) -> str | None:
    """The tag of the entry holding the base graph of store entry ``tag``, if it keeps its base graph apart."""
    try:
        entry = Path(bentoml.models.get(tag).path)
    except (bentoml.exceptions.BentoMLException, ValueError):
        return None  # the worker says what is wrong with it when it loads
    pointer = next(entry.glob(f"*/{SHARED_DIR}/{STORED_BASE_FILE}"), None)  # onnx/shared/base.store-tag
    return pointer.read_text().strip() if pointer else None


STORED = {tag: f"stored_model_{i}" for i, tag in enumerate(_store_tags())}  # store tag -> the class attribute


def _with_stored_models(cls):
    for tag, attribute in STORED.items():
        setattr(cls, attribute, bentoml.models.BentoModel(tag))
    return cls


class NotForThisModel(RequestError):
    """The route exists for other kinds of model; the one named has no such resource (404)."""

    status = 404


def _bad_request(exc: Exception) -> JSONResponse:
    retry = getattr(exc, "retry_after", None)
    return JSONResponse({"error": str(exc)}, status_code=getattr(exc, "status", 400),
                        headers={"Retry-After": str(retry)} if retry else None)


def _not_finite() -> JSONResponse:
    # A broken model, not a bad request; JSON must never carry NaN or Infinity.
    return JSONResponse({"error": "the model produced non-finite outputs for this input"}, status_code=500)


def _serving_versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("tuneserve", "bentoml", "onnxruntime", "transformers", "tokenizers", "torch"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


async def _metadata(request: Request) -> JSONResponse:
    service = bentoml.get_current_service()
    try:
        served = service.models.get(request.query_params.get("model"))
    except RequestError as exc:
        return _bad_request(exc)
    return JSONResponse(service.metadata(served))


async def _models(request: Request) -> JSONResponse:
    """GET: the models served; POST: add one (one route, so that its Allow header names both methods)."""
    if request.method == "POST":
        return await _add_model(request)
    return JSONResponse({"models": [served.summary() for served in bentoml.get_current_service().models]})


def _admin_refusal() -> JSONResponse | None:
    if SETTINGS.api_key is None:  # the key guards every /models route; without one, nobody may change the set
        return JSONResponse({"error": "adding and removing models needs TUNESERVE_API_KEY set (the key then guards "
                                      "these routes)", "field": None}, status_code=403)
    return None


async def _add_model(request: Request) -> JSONResponse:
    """POST /models {"source": DIRECTORY or TAG, "name": optional}: load, self-test and add a model while serving."""
    if (refusal := _admin_refusal()) is not None:
        return refusal
    try:
        body = await request.json()
    except ValueError:
        return _bad_request(RequestError("body: not JSON; send {\"source\": DIRECTORY or TAG, \"name\": optional}"))
    try:
        if not isinstance(body, dict) or not isinstance(body.get("source"), str) or not body["source"].strip():
            raise RequestError('source: give an artifact directory or a store tag, as {"source": "..."}')
        unknown = sorted(set(body) - {"source", "name"})
        if unknown:
            raise RequestError(f"{unknown[0]}: unknown field; this route takes name, source")
        name = body.get("name")
        if name is not None and (not isinstance(name, str) or not name.strip() or "," in name or "=" in name):
            raise RequestError("name: a model name is a non-empty string without ',' or '='")
        entry = f"{name}={body['source']}" if name else body["source"]
        return await bentoml.get_current_service().add_model(entry)
    except RequestError as exc:
        return _bad_request(exc)


async def _remove_model(request: Request) -> JSONResponse:
    """DELETE /models/{name}: stop serving a model (requests already waiting for it get 404)."""
    if (refusal := _admin_refusal()) is not None:
        return refusal
    try:
        return bentoml.get_current_service().remove_model(request.path_params["name"])
    except RequestError as exc:
        return _bad_request(exc)


@bentoml.service(name="tuneserve", traffic={"timeout": SETTINGS.timeout, "max_concurrency": SETTINGS.max_concurrency},
                 http={"port": 3000},
                 logging={"access": {"enabled": SETTINGS.access_log}})
@_with_stored_models  # each store model a class attribute; none for artifact directories, which the store does not hold
class Tuneserve:
    def __init__(self) -> None:
        try:
            self._load()
        except Exception as exc:
            if not worker_of_server():
                raise
            if not isinstance(exc, ArtifactError | ConfigError):  # not a known mistake: its traceback to the log
                logger.exception("the model could not be loaded")
            # one line, and the server stops instead of starting this worker again every few seconds
            stop_server(str(exc) if isinstance(exc, ArtifactError | ConfigError)
                        else f"the model could not be loaded: {type(exc).__name__}: {exc}")

    def _load(self) -> None:
        self.settings = SETTINGS
        located = [self._located(source) for source in sources(self.settings)]
        # Models over one base share its graph (each adds its adapter and head): the bases two or more models need.
        needed = Counter(shared_base_of(read_manifest(source.directory)) for source in located)
        self.shared_bases = {base for base, count in needed.items() if base is not None and count > 1}
        self.bases = SharedBases(self.settings.threads or cpu_threads())
        self.models = ModelSet.of([load_model(source, self.settings, self._build) for source in located])
        self.parted = PartedEvaluations(self.settings.max_parted_examples)
        for served in self.models:
            logger.info("serving %s (%s) as %r with backend %s; self-test passed on %d examples (%s) in %.2f s",
                        served.tag, served.manifest.task.value, served.name, served.backend.name,
                        served.engine.selftest["examples"], served.engine.measured, served.startup_seconds)

    async def add_model(self, entry: str) -> JSONResponse:
        """Load, self-test and add the model ``entry`` names (``[NAME=]DIRECTORY`` or ``[NAME=]TAG``), off the event
        loop: the other models keep answering meanwhile. A model that fails stays out, with its reason in the log
        and the answer.

        Raises:
            RequestError: the entry names no artifact.
        """
        try:
            [source] = sources_of(entry, f"source {entry}", many=False)
            if source.tag is not None:  # not packaged with the service: the store's own copy
                source = source.located(Path(bentoml.models.get(source.tag).path))
        except (ConfigError, bentoml.exceptions.BentoMLException, ValueError) as exc:
            raise RequestError(str(exc).splitlines()[0]) from None
        try:
            pending = model_name(source, read_manifest(source.directory))
        except ArtifactError as exc:
            return JSONResponse({"error": f"source: {exc}", "field": "source"}, status_code=422)
        if len(self.models) + len(self.models.loading) >= self.settings.max_models:
            return JSONResponse({"error": f"model: this service serves {len(self.models)} models, its limit "
                                          f"(TUNESERVE_MAX_MODELS={self.settings.max_models}); remove one first",
                                 "field": "model"}, status_code=409)
        if pending in self.models.names or pending in self.models.loading:
            return JSONResponse({"error": f"model: {pending!r} is served already (or being added); remove it first "
                                          f"(DELETE /models/{pending})", "field": "model"}, status_code=409)
        self.models.loading.add(pending)
        try:
            served = await anyio.to_thread.run_sync(load_model, source, self.settings, self._build)
            self.models.add(served)
        except (ArtifactError, ConfigError) as exc:
            logger.warning("model %s not added: %s", pending, exc)
            return JSONResponse({"error": f"model {pending!r} not added: {exc}", "field": "source"}, status_code=422)
        except Exception as exc:  # an unexpected failure of one model must not take the service down
            logger.exception("model %s not added", pending)
            return JSONResponse({"error": f"model {pending!r} not added: {type(exc).__name__}: {exc}",
                                 "field": "source"}, status_code=422)
        finally:
            self.models.loading.discard(pending)
        logger.info("added %s (%s) as %r with backend %s in %.2f s", served.tag, served.manifest.task.value,
                    served.name, served.backend.name, served.startup_seconds)
        return JSONResponse({"added": served.summary()}, status_code=201)

    def remove_model(self, name: str) -> JSONResponse:
        """Raises:
            RequestError: no such model, or it is the last one served."""
        if len(self.models) == 1 and name in self.models.names:
            raise RequestError(f"model: {name!r} is the only model served; add another before removing it")
        served = self.models.remove(name)
        self.parted.forget(name)
        served.close()
        logger.info("removed %r", name)
        return JSONResponse({"removed": name})

    def _located(self, source: Source) -> Source:
        """A store model's directory: the one BentoML resolved for this worker (in a Bento, the one packaged)."""
        return source.located(Path(getattr(self, STORED[source.tag]).path)) if source.tag else source

    def _build(self, directory: Path, manifest: Manifest) -> tuple:
        base = shared_base_of(manifest)  # a model added later joins a base already open
        sharing = self.settings.backend == SHARED_BACKEND or base in self.shared_bases or base in self.bases.open
        backend = choose_backend(directory, manifest, backend=self.settings.backend, device=self.settings.device,
                                 threads=self.settings.threads, batch_size=self.settings.forward_batch_size,
                                 bases=self.bases if sharing else None)
        # The one place the service asks what kind of model it serves: a writer or a scorer (service/writer.py,
        # service/scorer.py), each with its self-test and its pooled passes; the routes below ask the spec's routes.
        return backend, (Writer if manifest.task.spec.writes else Scorer)(backend, manifest, self.settings)

    def _serving(self, model: str | None, route: str, usage: str = "") -> ServedModel:
        """The model a request names, if it answers ``route``.

        Raises:
            UnknownModel: no such model is served.
            NotForThisModel: the model has no such route (``usage``: what it is not, after its task).
        """
        served = self.models.get(model)
        if route not in served.spec.routes:
            raise NotForThisModel(f"{route}: {served.name} is a {served.manifest.task.value} model{usage}: "
                                  f"{served.spec.usage}")
        return served

    @property
    def batcher(self):
        """The first model's pooled passes (their sizes are what load tests read)."""
        return self.models.first.engine.batcher

    def __is_ready__(self) -> bool:
        # The constructor raises unless every model's self-test passed, so an instance is a ready service.
        return len(self.models) > 0

    @bentoml.api
    async def predict(
        self,
        texts: list[Text] = Field(min_length=1, max_length=SETTINGS.max_texts, description="Texts to classify or score."),
        text_pairs: list[Text] | None = Field(None, min_length=1, max_length=SETTINGS.max_texts,
                                              description="Second texts, one per text (pair models only)."),
        top_k: int | None = Field(None, ge=1, description="Classification: keep the k most likely labels in scores."),
        model: StrictStr | None = Field(None, description=MODEL_FIELD),
    ) -> PredictResponse:
        """Predict labels (or values) for texts."""
        try:
            served = self._serving(model, "/predict")
            check_texts("texts", texts, self.settings, limit=self.settings.max_texts)
            check_pairs(served.manifest, texts, text_pairs, "text_pairs")
            if text_pairs is not None:
                check_texts("text_pairs", text_pairs, self.settings, limit=self.settings.max_texts)
        except RequestError as exc:
            return _bad_request(exc)
        try:
            scores, truncated = await served.engine.scores_and_truncation(texts, text_pairs)
        except NonFiniteOutputs:
            return _not_finite()
        except RequestError as exc:  # the model was removed while the request waited
            return _bad_request(exc)
        predictions = served.spec.shape(served.manifest, scores, top_k=top_k)
        if truncated is not None:  # say which texts were longer than the model reads
            for prediction, cut in zip(predictions, truncated):
                prediction["truncated"] = cut
        return PredictResponse(predictions=predictions, model=served.tag, backend=served.backend.name)

    @bentoml.api
    async def evaluate(
        self,
        examples: list[Example] = Field(min_length=1, max_length=SETTINGS.max_examples,
                                        description="Labelled examples: text (and text_pair), with label or labels."),
        model: StrictStr | None = Field(None, description=MODEL_FIELD),
        part: EvaluationPart | None = Field(
            None, description="Post more examples than one request allows as numbered parts of one evaluation: the "
                              "last part is answered with the report of them all, exactly as one request would be "
                              "(parts are held in this process; not for embedding models)."),
    ) -> EvaluateResponse:
        """Score the model on posted labelled data, beside the test metrics recorded at training time."""
        try:
            served = self.models.get(model)
            texts, pairs, targets = examples_to_inputs(served.manifest, examples, self.settings)
            if part is None:
                evaluation = await served.engine.evaluate(texts, pairs, targets)
            else:
                evaluation, part = await self._evaluate_part(served, part, texts, pairs, targets)
        except RequestError as exc:
            return _bad_request(exc)
        except NonFiniteOutputs:
            return _not_finite()
        body = EvaluateResponse(**report(served.manifest, evaluation), part=part, model=served.tag,
                                backend=served.backend.name)
        # Tables the task does not fill are left out, as its documented schema (service/docs.py) leaves them out.
        return JSONResponse(body.model_dump(mode="json", exclude_none=True))

    async def _evaluate_part(self, served: ServedModel, part: EvaluationPart, texts: list[str],
                             pairs: list[str] | None, targets) -> tuple[Evaluation, EvaluationPart]:
        """One part of an evaluation in parts (service/parts.py): the report of all the parts for the last one, the
        metrics of this part alone (no intervals) for the others.

        Raises:
            RequestError: the model ranks (its evaluation cannot be split), or the part does not continue its
                evaluation (409).
        """
        if served.spec.ranked_corpus(targets) is not None:
            raise RequestError("part: an embedding model's evaluation ranks every query against every document of "
                               "one request, so it cannot be posted in parts; post the examples in one request")
        self.parted.check(served, served.name, part.id, part.index, len(texts))
        outputs = await served.engine.judge(texts, pairs, targets)
        held = self.parted.add(served, served.name, part.id, part.index, part.last, targets, outputs)
        manifest = served.manifest
        if part.last:
            every_target, every_output, parts = held
            evaluation = await anyio.to_thread.run_sync(assessed, manifest, every_target, every_output)
            evaluation.notes.append(f"evaluation {part.id!r} was posted in {parts} parts: every figure is over all "
                                    f"{evaluation.n:,} examples")
            return evaluation, part.model_copy(update={"examples": evaluation.n})
        evaluation = await anyio.to_thread.run_sync(lambda: served.spec.evaluate(
            targets, outputs, manifest.labels, threshold=manifest.decision_threshold))
        evaluation.notes.append(f"part {part.index} of evaluation {part.id!r}: the metrics of this part alone, "
                                f"without intervals; {held:,} examples held so far, and the last part is answered "
                                "for all of them")
        return evaluation, part.model_copy(update={"examples": held})

    @bentoml.api
    async def generate(
        self,
        prompts: list[Text] | None = Field(
            None, min_length=1, max_length=SETTINGS.max_texts,
            description="Inputs, each put in the model's prompt exactly as in training (or, with raw, whole prompts)."),
        messages: list[Conversation] | None = Field(
            None, min_length=1, max_length=SETTINGS.max_texts,
            description="Instead of prompts: conversations, each rendered with the model's chat template and "
                        "answered as the assistant's next turn."),
        raw: StrictBool = Field(False, description="Use each prompt as it is: the caller built the whole prompt (it is "
                                                   "tokenized as training tokenizes one)."),
        max_new_tokens: int | None = Field(
            None, ge=1, le=SETTINGS.max_new_tokens,
            description="The most tokens to write per prompt (default: what the model was evaluated with; at most 4 "
                        "times that)."),
        temperature: float | None = Field(None, ge=0, le=2, description="0 or absent: greedy decoding; otherwise "
                                                                         "sampling at this temperature."),
        # ge, not gt: OpenAPI 3.0 (the docs BentoML serves) has no numeric exclusiveMinimum; 0 is refused below.
        top_p: float | None = Field(None, ge=0, le=1, description="Sampling: keep the most likely tokens up to this "
                                                                  "probability mass, above 0 (default 1: all)."),
        top_k: int | None = Field(None, ge=0, description="Sampling: keep the k most likely tokens (0 or absent: all)."),
        stop: list[Stop] | None = Field(None, max_length=MAX_STOPS,
                                        description="Strings that end a generation; the text is cut where one begins."),
        seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Sampling: the same seed and request give the "
                                                                       "same text."),
        stream: StrictBool = Field(False, description="Answer with server-sent events (one prompt only): "
                                                      '{"text": chunk} per chunk, then {"finish_reason", "tokens"}, '
                                                      "then [DONE]."),
        model: StrictStr | None = Field(None, description=MODEL_FIELD),
    ) -> GenerateResponse:
        """Write text for each prompt (generation models only)."""
        try:
            served = self._serving(model, "/generate", ", which does not write text")
            if prompts is not None:
                check_texts("prompts", prompts, self.settings, limit=self.settings.max_texts)
            if messages is not None:
                check_messages_size(messages, self.settings)
            decoding = decoding_options(served.manifest, self.settings, max_new_tokens=max_new_tokens,
                                        temperature=temperature, top_p=top_p, top_k=top_k, stop=stop)
            field = "prompts" if prompts is not None else "messages"
            check_prompt_count(field, len(prompts if prompts is not None else messages or ()),
                               decoding.max_new_tokens, self.settings)
            backend = served.backend
            ids = await anyio.to_thread.run_sync(lambda: prompt_token_ids(
                backend.prompter, prompts=prompts, messages=messages, raw=raw,
                max_new_tokens=decoding.max_new_tokens, max_positions=backend.max_positions,
                encoder_decoder=backend.layout.encoder_decoder))
            check_token_budget(field, ids, decoding.max_new_tokens, self.settings)
            if stream and len(ids) != 1:
                raise RequestError(f"stream: streams one prompt at a time; this request has {len(ids)}")
        except RequestError as exc:
            return _bad_request(exc)
        if stream:
            return EventStream(stream_events(backend.stream(ids[0], seed=seed, **decoding.kwargs())))
        generations = await served.engine.generate(ids, decoding, seed)
        return GenerateResponse(generations=served.spec.shape(served.manifest, generations), model=served.tag,
                                backend=backend.name)

    @bentoml.api
    async def embed(
        self,
        texts: list[Text] = Field(min_length=1, max_length=SETTINGS.max_texts, description="Texts to embed."),
        dimensions: int | None = Field(None, ge=1, description="Keep each vector's first N dimensions, normalised "
                                                               "again (shorter vectors, some quality lost)."),
        model: StrictStr | None = Field(None, description=MODEL_FIELD),
    ) -> EmbedResponse:
        """Embed texts as unit vectors (embedding models only)."""
        try:
            served = self._serving(model, "/embed", ", which does not embed text")
            check_texts("texts", texts, self.settings, limit=self.settings.max_texts)
            vectors, cut = await served.engine.scores_and_truncation(texts, None)
            if dimensions is not None and dimensions > vectors.shape[1]:
                raise RequestError(f"dimensions: {dimensions} is more than the model's {vectors.shape[1]}")
        except RequestError as exc:
            return _bad_request(exc)
        except NonFiniteOutputs:
            return _not_finite()
        if dimensions is not None:
            vectors = served.spec.scores(vectors[:, :dimensions])
        return EmbedResponse(embeddings=vectors.tolist(), dimensions=vectors.shape[1],
                             truncated=[i for i, was_cut in enumerate(cut) if was_cut], model=served.tag,
                             backend=served.backend.name)

    @bentoml.api
    async def rank(
        self,
        query: Text = Field(description="The text to find documents for."),
        candidates: list[Text] = Field(min_length=1, max_length=SETTINGS.max_texts,
                                       description="The documents to order by similarity to the query."),
        top_k: int | None = Field(None, ge=1, description="Return only the k most similar (default: all)."),
        model: StrictStr | None = Field(None, description=MODEL_FIELD),
    ) -> RankResponse:
        """Order candidate documents by cosine similarity to a query (embedding models only)."""
        try:
            served = self._serving(model, "/rank", ", which does not embed text")
            check_texts("query", [query], self.settings, limit=1)
            check_texts("candidates", candidates, self.settings, limit=self.settings.max_texts)
        except RequestError as exc:
            return _bad_request(exc)
        try:
            vectors = await served.engine.scores([query, *candidates])
        except NonFiniteOutputs:
            return _not_finite()
        except RequestError as exc:
            return _bad_request(exc)
        similarity = vectors[1:] @ vectors[0]
        order = np.argsort(-similarity, kind="stable")[:top_k]
        return RankResponse(results=[RankedText(index=int(i), score=float(similarity[i]), text=candidates[i])
                                     for i in order], model=served.tag, backend=served.backend.name)

    def metadata(self, served: ServedModel) -> dict:
        m = served.manifest
        return {
            "model": served.tag, "name": served.name, "task": m.task.value, "labels": m.labels,
            "text_fields": m.text_fields, "label_field": m.label_field, "label_key": m.task.spec.label_key,
            "label_delimiter": m.provenance.config.get("data", {}).get("label_delimiter"),
            "max_length": m.max_length, "threshold": m.threshold, "thresholds": m.thresholds,
            "calibration": m.calibration.model_dump() if m.calibration else None,
            "stride": m.stride, "aggregation": m.aggregation,
            "base_model": m.base_model, "method": m.method, "primary_metric": m.primary_metric,
            "metrics": m.metrics, "baselines": m.baselines, "parity": {n: p.model_dump(mode="json") for n, p in m.export.parity.items()} if m.export else None,
            "int8": m.export.int8.model_dump(mode="json") if m.export else None, "backend": served.backend.name,
            "execution_provider": getattr(served.backend, "provider", None), "selftest": served.engine.selftest,
            "startup_seconds": round(served.startup_seconds, 3), "models_served": self.models.names,
            "versions": {"trained_with": m.provenance.packages, "serving": _serving_versions()},
            "limits": {"max_texts": self.settings.max_texts, "max_chars": self.settings.max_chars,
                       "max_examples": self.settings.max_examples, "max_body_bytes": self.settings.max_body_bytes,
                       **served.engine.limits()},
            "generation": served.engine.metadata(),
        }

    def about(self) -> About:
        """What the API documents (/docs.json and the page at /) say about the model served (the first, of several)."""
        served = self.models.first
        return About(manifest=served.manifest, model_tag=served.tag, backend=served.backend.name,
                     provider=getattr(served.backend, "provider", None),
                     tuneserve_version=_serving_versions().get("tuneserve"), settings=self.settings)


def _api_document() -> dict:
    return api_document(Tuneserve.openapi_spec.asdict(), bentoml.get_current_service().about())


# Mounted at the root, ahead of BentoML's own / and /docs.json: its passive mount claims only the paths routed here.
api_app = Starlette(routes=[Route("/metadata", _metadata, methods=["GET"]),
                            Route("/models", _models, methods=["GET", "POST"]),
                            Route("/models/{name:path}", _remove_model, methods=["DELETE"]),
                            *docs_routes(_api_document),
                            *web_routes(lambda name: bentoml.get_current_service().models.get(name).directory)])
Tuneserve.mount_asgi_app(api_app, path="/")
# The first added is the outermost: auth, then media type, then size, all before BentoML reads the body.
if SETTINGS.api_key is not None:
    Tuneserve.add_asgi_middleware(BearerAuthMiddleware, api_key=SETTINGS.api_key.get_secret_value())
Tuneserve.add_asgi_middleware(JsonOnlyMiddleware)
Tuneserve.add_asgi_middleware(BodyLimitMiddleware, max_bytes=SETTINGS.max_body_bytes,
                              fields={api.route: frozenset(api.input_spec.model_fields) for api in Tuneserve.apis.values()})
Tuneserve.add_asgi_middleware(ErrorShapeMiddleware)
