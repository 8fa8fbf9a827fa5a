"""The tuneserve BentoML service: /predict (or /generate), /evaluate and /metadata over one fine-tuned artifact.

Run it with ``bentoml serve`` from the repository root (bentofile.yaml names this class). The model comes
from the BentoML store (``TUNESERVE_MODEL``, default ``sentiment-lora-onnx:latest``) so that ``bentoml build``
packages it, or from an artifact directory (``TUNESERVE_ARTIFACT``). Each endpoint validates, calls the
backend, and shapes the answer with core/ code: post-processing, labels, prompts and metrics are the trainer's
own. A generation model writes text at /generate (JSON, or server-sent events with ``"stream": true``); the
others answer /predict. The service is ready only after the backend has reproduced the outputs PyTorch gave at
export.
"""

from __future__ import annotations

import logging
import time
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
from core.report import report
from service.backends import choose_backend
from service.docs import About, api_document, docs_routes
from service.web import web_routes
from service.generation import (MAX_STOP_CHARS, MAX_STOPS, EventStream, check_token_budget, decoding_options,
                                prompt_token_ids, stream_events)
from service.logs import quiet_client_errors
from service.middleware import (
    BearerAuthMiddleware,
    BodyLimitMiddleware,
    ErrorShapeMiddleware,
    JsonOnlyMiddleware,
)
from service.requests import (
    RequestError,
    check_messages_size,
    check_pairs,
    check_texts,
    examples_to_inputs,
)
from service.schemas import (EmbedResponse, EvaluateResponse, Example, GenerateResponse, Message, PredictResponse,
                             RankedText, RankResponse)
from service.scorer import NonFiniteOutputs, Scorer
from service.startup import checked_settings, stop_server, watch_workers, worker_of_server
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


def _bad_request(exc: Exception) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=400)


def _not_for_this_model(message: str) -> JSONResponse:
    # The route exists for other kinds of model; this one has no such resource.
    return JSONResponse({"error": message}, status_code=404)


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
    return JSONResponse(service.metadata())


@bentoml.service(name="tuneserve", traffic={"timeout": SETTINGS.timeout, "max_concurrency": SETTINGS.max_concurrency},
                 http={"port": 3000},
                 logging={"access": {"enabled": SETTINGS.access_log}})
class Tuneserve:
    if SETTINGS.artifact is None:
        # Declared at class scope so that `bentoml build` packages the model. Left out when an artifact
        # directory is served, so that `bentoml serve` does not look for a store model it will not use.
        stored_model = bentoml.models.BentoModel(SETTINGS.model)

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
        started = time.perf_counter()
        self.settings = SETTINGS
        if self.settings.artifact is not None:
            directory = Path(self.settings.artifact)
            self.manifest: Manifest = read_manifest(directory)
            self.model_tag = f"{self.manifest.name}:local"
        else:  # the store model BentoML resolved for this worker (in a Bento: the one packaged with it)
            directory = Path(self.stored_model.path)
            self.manifest = read_manifest(directory)
            self.model_tag = str(self.stored_model.tag)
        self.directory = directory
        self.spec = self.manifest.task.spec
        self.backend = choose_backend(directory, self.manifest, backend=self.settings.backend,
                                      device=self.settings.device, threads=self.settings.threads,
                                      batch_size=self.settings.forward_batch_size)
        # The one place the service asks what kind of model it serves: a writer or a scorer (service/writer.py,
        # service/scorer.py), each with its self-test and its pooled passes; the routes below ask the spec's routes.
        self.model: Scorer | Writer = (Writer if self.spec.writes else Scorer)(self.backend, self.manifest,
                                                                                 self.settings)
        self.selftest = self.model.selftest
        self.startup_seconds = time.perf_counter() - started
        logger.info("serving %s (%s) with backend %s; self-test passed on %d examples (%s) in %.2f s",
                    self.model_tag, self.manifest.task.value, self.backend.name, self.selftest["examples"],
                    self.model.measured, self.startup_seconds)

    @property
    def batcher(self):
        """The model's pooled passes (their sizes are what load tests read)."""
        return self.model.batcher

    def __is_ready__(self) -> bool:
        # The constructor raises unless the self-test passed, so an instance is a ready service.
        return self.selftest is not None

    @bentoml.api
    async def predict(
        self,
        texts: list[Text] = Field(min_length=1, max_length=SETTINGS.max_texts, description="Texts to classify or score."),
        text_pairs: list[Text] | None = Field(None, min_length=1, max_length=SETTINGS.max_texts,
                                              description="Second texts, one per text (pair models only)."),
        top_k: int | None = Field(None, ge=1, description="Classification: keep the k most likely labels in scores."),
    ) -> PredictResponse:
        """Predict labels (or values) for texts."""
        if "/predict" not in self.spec.routes:
            return _not_for_this_model(f"/predict: {self.manifest.name} is a {self.manifest.task.value} model: "
                                       f"{self.spec.usage}")
        try:
            check_texts("texts", texts, self.settings, limit=self.settings.max_texts)
            check_pairs(self.manifest, texts, text_pairs, "text_pairs")
            if text_pairs is not None:
                check_texts("text_pairs", text_pairs, self.settings, limit=self.settings.max_texts)
        except RequestError as exc:
            return _bad_request(exc)
        try:
            scores = await self.model.scores(texts, text_pairs)
        except NonFiniteOutputs:
            return _not_finite()
        predictions = self.spec.shape(self.manifest, scores, top_k=top_k)
        if not self.spec.windows:  # say which texts were longer than the model reads
            for prediction, cut in zip(predictions, await self.model.truncated(texts, text_pairs)):
                prediction["truncated"] = cut
        return PredictResponse(predictions=predictions, model=self.model_tag, backend=self.backend.name)

    @bentoml.api
    async def evaluate(
        self,
        examples: list[Example] = Field(min_length=1, max_length=SETTINGS.max_examples,
                                        description="Labelled examples: text (and text_pair), with label or labels."),
    ) -> EvaluateResponse:
        """Score the model on posted labelled data, beside the test metrics recorded at training time."""
        try:
            texts, pairs, targets = examples_to_inputs(self.manifest, examples, self.settings)
            evaluation = await self.model.evaluate(texts, pairs, targets)
        except RequestError as exc:
            return _bad_request(exc)
        except NonFiniteOutputs:
            return _not_finite()
        body = EvaluateResponse(**report(self.manifest, evaluation), model=self.model_tag,
                                backend=self.backend.name)
        # Tables the task does not fill are left out, as its documented schema (service/docs.py) leaves them out.
        return JSONResponse(body.model_dump(mode="json", exclude_none=True))

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
    ) -> GenerateResponse:
        """Write text for each prompt (generation models only)."""
        if "/generate" not in self.spec.routes:
            return _not_for_this_model(f"/generate: {self.manifest.name} is a {self.manifest.task.value} model, which "
                                       f"does not write text: {self.spec.usage}")
        try:
            if prompts is not None:
                check_texts("prompts", prompts, self.settings, limit=self.settings.max_texts)
            if messages is not None:
                check_messages_size(messages, self.settings)
            decoding = decoding_options(self.manifest, self.settings, max_new_tokens=max_new_tokens,
                                        temperature=temperature, top_p=top_p, top_k=top_k, stop=stop)
            ids = await anyio.to_thread.run_sync(lambda: prompt_token_ids(
                self.backend.prompter, prompts=prompts, messages=messages, raw=raw,
                max_new_tokens=decoding.max_new_tokens, max_positions=self.backend.max_positions,
                encoder_decoder=self.backend.layout.encoder_decoder))
            check_token_budget("prompts" if prompts is not None else "messages", ids, decoding.max_new_tokens,
                               self.settings)
            if stream and len(ids) != 1:
                raise RequestError(f"stream: streams one prompt at a time; this request has {len(ids)}")
        except RequestError as exc:
            return _bad_request(exc)
        if stream:
            return EventStream(stream_events(self.backend.stream(ids[0], seed=seed, **decoding.kwargs())))
        generations = await self.model.generate(ids, decoding, seed)
        return GenerateResponse(generations=self.spec.shape(self.manifest, generations), model=self.model_tag,
                                backend=self.backend.name)

    @bentoml.api
    async def embed(
        self,
        texts: list[Text] = Field(min_length=1, max_length=SETTINGS.max_texts, description="Texts to embed."),
        dimensions: int | None = Field(None, ge=1, description="Keep each vector's first N dimensions, normalised "
                                                               "again (shorter vectors, some quality lost)."),
    ) -> EmbedResponse:
        """Embed texts as unit vectors (embedding models only)."""
        if "/embed" not in self.spec.routes:
            return _not_for_this_model(f"/embed: {self.manifest.name} is a {self.manifest.task.value} model, which "
                                       f"does not embed text: {self.spec.usage}")
        try:
            check_texts("texts", texts, self.settings, limit=self.settings.max_texts)
            vectors = await self.model.scores(texts)
            if dimensions is not None and dimensions > vectors.shape[1]:
                raise RequestError(f"dimensions: {dimensions} is more than the model's {vectors.shape[1]}")
        except RequestError as exc:
            return _bad_request(exc)
        except NonFiniteOutputs:
            return _not_finite()
        if dimensions is not None:
            vectors = self.spec.scores(vectors[:, :dimensions])
        cut = await self.model.truncated(texts, None)
        return EmbedResponse(embeddings=vectors.tolist(), dimensions=vectors.shape[1],
                             truncated=[i for i, was_cut in enumerate(cut) if was_cut], model=self.model_tag,
                             backend=self.backend.name)

    @bentoml.api
    async def rank(
        self,
        query: Text = Field(description="The text to find documents for."),
        candidates: list[Text] = Field(min_length=1, max_length=SETTINGS.max_texts,
                                       description="The documents to order by similarity to the query."),
        top_k: int | None = Field(None, ge=1, description="Return only the k most similar (default: all)."),
    ) -> RankResponse:
        """Order candidate documents by cosine similarity to a query (embedding models only)."""
        if "/rank" not in self.spec.routes:
            return _not_for_this_model(f"/rank: {self.manifest.name} is a {self.manifest.task.value} model, which "
                                       f"does not embed text: {self.spec.usage}")
        try:
            check_texts("query", [query], self.settings, limit=1)
            check_texts("candidates", candidates, self.settings, limit=self.settings.max_texts)
        except RequestError as exc:
            return _bad_request(exc)
        try:
            vectors = await self.model.scores([query, *candidates])
        except NonFiniteOutputs:
            return _not_finite()
        similarity = vectors[1:] @ vectors[0]
        order = np.argsort(-similarity, kind="stable")[:top_k]
        return RankResponse(results=[RankedText(index=int(i), score=float(similarity[i]), text=candidates[i])
                                     for i in order], model=self.model_tag, backend=self.backend.name)

    def metadata(self) -> dict:
        m = self.manifest
        return {
            "model": self.model_tag, "name": m.name, "task": m.task.value, "labels": m.labels,
            "text_fields": m.text_fields, "label_field": m.label_field, "label_key": m.task.spec.label_key,
            "label_delimiter": m.provenance.config.get("data", {}).get("label_delimiter"),
            "max_length": m.max_length, "threshold": m.threshold, "thresholds": m.thresholds,
            "calibration": m.calibration.model_dump() if m.calibration else None,
            "stride": m.stride, "aggregation": m.aggregation,
            "base_model": m.base_model, "method": m.method, "primary_metric": m.primary_metric,
            "metrics": m.metrics, "baselines": m.baselines, "parity": {n: p.model_dump(mode="json") for n, p in m.export.parity.items()} if m.export else None,
            "int8": m.export.int8.model_dump(mode="json") if m.export else None, "backend": self.backend.name,
            "execution_provider": getattr(self.backend, "provider", None), "selftest": self.selftest,
            "startup_seconds": round(self.startup_seconds, 3),
            "versions": {"trained_with": m.provenance.packages, "serving": _serving_versions()},
            "limits": {"max_texts": self.settings.max_texts, "max_chars": self.settings.max_chars,
                       "max_examples": self.settings.max_examples, "max_body_bytes": self.settings.max_body_bytes,
                       **self.model.limits()},
            "generation": self.model.metadata(),
        }

    def about(self) -> About:
        """What the API documents (/docs.json and the page at /) say about the model served."""
        return About(manifest=self.manifest, model_tag=self.model_tag, backend=self.backend.name,
                     provider=getattr(self.backend, "provider", None),
                     tuneserve_version=_serving_versions().get("tuneserve"), settings=self.settings)


def _api_document() -> dict:
    return api_document(Tuneserve.openapi_spec.asdict(), bentoml.get_current_service().about())


# Mounted at the root, ahead of BentoML's own / and /docs.json: its passive mount claims only the paths routed here.
api_app = Starlette(routes=[Route("/metadata", _metadata, methods=["GET"]), *docs_routes(_api_document),
                            *web_routes(lambda: bentoml.get_current_service().directory)])
Tuneserve.mount_asgi_app(api_app, path="/")
# The first added is the outermost: auth, then media type, then size, all before BentoML reads the body.
if SETTINGS.api_key is not None:
    Tuneserve.add_asgi_middleware(BearerAuthMiddleware, api_key=SETTINGS.api_key.get_secret_value())
Tuneserve.add_asgi_middleware(JsonOnlyMiddleware)
Tuneserve.add_asgi_middleware(BodyLimitMiddleware, max_bytes=SETTINGS.max_body_bytes,
                              fields={api.route: frozenset(api.input_spec.model_fields) for api in Tuneserve.apis.values()})
Tuneserve.add_asgi_middleware(ErrorShapeMiddleware)
