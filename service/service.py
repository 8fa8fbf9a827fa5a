"""The tuneserve BentoML service: /predict, /evaluate and /metadata over one fine-tuned artifact.

Run it with ``bentoml serve`` from the repository root (bentofile.yaml names this class). The model comes
from the BentoML store (``TUNESERVE_MODEL``, default ``sentiment-lora-onnx:latest``) so that ``bentoml build``
packages it, or from an artifact directory (``TUNESERVE_ARTIFACT``). Each endpoint validates, calls the
backend, and shapes the answer with core/ code: post-processing, labels and metrics are the trainer's own.
The service is ready only after the backend has reproduced the outputs PyTorch gave at export.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import bentoml
import numpy as np
from pydantic import Field, StrictStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from core.errors import ArtifactError
from core.manifest import Manifest, read_manifest
from service.backends import choose_backend
from service.batcher import MicroBatcher
from service.docs import About, api_document, docs_routes
from service.logs import quiet_client_errors
from service.middleware import (
    BearerAuthMiddleware,
    BodyLimitMiddleware,
    JsonOnlyMiddleware,
    ValidationErrorShapeMiddleware,
)
from service.requests import RequestError, check_pairs, check_texts, evaluation_body, examples_to_inputs
from service.schemas import EvaluateResponse, Example, PredictResponse
from service.selftest import run_selftest
from service.settings import load_settings

logger = logging.getLogger("bentoml.tuneserve")  # under bentoml's logger, so `bentoml serve` shows it
SETTINGS = load_settings()
quiet_client_errors()
# The limits in force when the service starts are part of its OpenAPI schema; they are checked again at
# request time (check_texts), which names the limit in the message.
Text = Annotated[StrictStr, Field(max_length=SETTINGS.max_chars)]


def _bad_request(exc: Exception) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=400)


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
        started = time.perf_counter()
        self.settings = SETTINGS
        if self.settings.artifact is not None:
            directory = Path(self.settings.artifact)
            self.manifest: Manifest = read_manifest(directory)
            self.model_tag = f"{self.manifest.name}:local"
        else:
            try:
                stored = self.stored_model
            except bentoml.exceptions.BentoMLException as exc:
                raise ArtifactError(f"TUNESERVE_MODEL={self.settings.model}: not in the BentoML store ({exc}); "
                                    "register one with `tuneserve register`, or set TUNESERVE_ARTIFACT") from None
            directory = Path(stored.path)
            self.manifest = read_manifest(directory)
            self.model_tag = str(stored.tag)
        self.spec = self.manifest.task.spec
        self.backend = choose_backend(directory, self.manifest, backend=self.settings.backend,
                                      device=self.settings.device, threads=self.settings.threads,
                                      batch_size=self.settings.forward_batch_size)
        self.selftest = run_selftest(self.backend, self.manifest,
                                     half_precision=getattr(self.backend, "half_precision", False))
        self.batcher = MicroBatcher(self.backend.logits, self.settings.max_batch_size)
        self.startup_seconds = time.perf_counter() - started
        logger.info("serving %s (%s) with backend %s; self-test passed on %d examples (max diff %.2g) in %.2f s",
                    self.model_tag, self.manifest.task.value, self.backend.name, self.selftest["examples"],
                    self.selftest["max_abs_diff"], self.startup_seconds)

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
        try:
            check_texts("texts", texts, self.settings, limit=self.settings.max_texts)
            check_pairs(self.manifest, texts, text_pairs, "text_pairs")
            if text_pairs is not None:
                check_texts("text_pairs", text_pairs, self.settings, limit=self.settings.max_texts)
        except RequestError as exc:
            return _bad_request(exc)
        scores = self.spec.scores(await self.batcher(texts, text_pairs))
        if not np.all(np.isfinite(self.spec.flat(scores))):
            return _not_finite()
        return PredictResponse(predictions=self.spec.shape(self.manifest, scores, top_k=top_k), model=self.model_tag,
                               backend=self.backend.name)

    @bentoml.api
    async def evaluate(
        self,
        examples: list[Example] = Field(min_length=1, max_length=SETTINGS.max_examples,
                                        description="Labelled examples: text (and text_pair), with label or labels."),
    ) -> EvaluateResponse:
        """Score the model on posted labelled data, beside the test metrics recorded at training time."""
        try:
            texts, pairs, targets = examples_to_inputs(self.manifest, examples, self.settings)
        except RequestError as exc:
            return _bad_request(exc)
        scores = self.spec.scores(await self.batcher(texts, pairs))
        if not np.all(np.isfinite(self.spec.flat(scores))):
            return _not_finite()
        evaluation = self.spec.evaluate(targets, scores, self.manifest.labels, threshold=self.manifest.decision_threshold)
        return EvaluateResponse(**evaluation_body(self.manifest, evaluation), model=self.model_tag,
                                backend=self.backend.name)

    def metadata(self) -> dict:
        m = self.manifest
        return {
            "model": self.model_tag, "name": m.name, "task": m.task.value, "labels": m.labels,
            "text_fields": m.text_fields, "max_length": m.max_length, "threshold": m.threshold,
            "stride": m.stride, "aggregation": m.aggregation,
            "base_model": m.base_model, "method": m.method, "primary_metric": m.primary_metric,
            "metrics": m.metrics, "baselines": m.baselines, "parity": m.export.model_dump(mode="json")["parity"] if m.export else None,
            "int8": m.export.int8.model_dump(mode="json") if m.export else None, "backend": self.backend.name,
            "execution_provider": getattr(self.backend, "provider", None), "selftest": self.selftest,
            "startup_seconds": round(self.startup_seconds, 3),
            "versions": {"trained_with": m.provenance.packages, "serving": _serving_versions()},
            "limits": {"max_texts": self.settings.max_texts, "max_chars": self.settings.max_chars,
                       "max_examples": self.settings.max_examples, "max_body_bytes": self.settings.max_body_bytes},
        }

    def about(self) -> About:
        """What the API documents (/docs.json and the page at /) say about the model served."""
        return About(manifest=self.manifest, model_tag=self.model_tag, backend=self.backend.name,
                     provider=getattr(self.backend, "provider", None),
                     tuneserve_version=_serving_versions().get("tuneserve"), settings=self.settings)


def _api_document() -> dict:
    return api_document(Tuneserve.openapi_spec.asdict(), bentoml.get_current_service().about())


# Mounted at the root, ahead of BentoML's own / and /docs.json: its passive mount claims only the paths routed here.
api_app = Starlette(routes=[Route("/metadata", _metadata, methods=["GET"]), *docs_routes(_api_document)])
Tuneserve.mount_asgi_app(api_app, path="/")
# The first added is the outermost: auth, then media type, then size, all before BentoML reads the body.
if SETTINGS.api_key is not None:
    Tuneserve.add_asgi_middleware(BearerAuthMiddleware, api_key=SETTINGS.api_key.get_secret_value())
Tuneserve.add_asgi_middleware(JsonOnlyMiddleware)
Tuneserve.add_asgi_middleware(BodyLimitMiddleware, max_bytes=SETTINGS.max_body_bytes)
Tuneserve.add_asgi_middleware(ValidationErrorShapeMiddleware)
