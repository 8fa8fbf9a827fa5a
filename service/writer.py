"""A model that writes text, behind the service's routes: its start-up self-test, prompts decoded in pooled passes,
and the generations /generate and /evaluate answer with (the HTTP side stays in service/service.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio.to_thread

from core.manifest import Manifest
from core.metrics import Evaluation
from core.report import assessed
from core.tasks.generation import GeneratedText
from service.generation import (
    Decoding,
    GenerationBatcher,
    check_prompt_count,
    check_token_budget,
    default_max_new_tokens,
    max_new_tokens_cap,
)
from service.selftest import run_generation_selftest
from service.settings import Settings


class Writer:
    """A generation backend checked at start-up (the constructor raises unless the self-test passes) and pooled."""

    def __init__(self, backend: Any, manifest: Manifest, settings: Settings):
        self.backend, self.manifest, self.spec, self.settings = backend, manifest, manifest.task.spec, settings
        self.selftest = run_generation_selftest(backend, manifest,
                                                half_precision=getattr(backend, "half_precision", False))
        self.batcher = GenerationBatcher(backend, settings.max_batch_size)

    @property
    def measured(self) -> str:
        """What the self-test measured, for the start-up log line."""
        return f"{self.selftest['identical']} of {self.selftest['texts']} texts identical to PyTorch's"

    async def generate(self, ids: list[list[int]], decoding: Decoding, seed: int | None = None) -> list[GeneratedText]:
        """The texts written for prompt token ids, decoded with whatever else is queued."""
        return await self.batcher(ids, decoding, seed)

    async def evaluate(self, texts: Sequence[str], pairs: Sequence[str] | None, targets: Any) -> Evaluation:
        """Metrics of :meth:`judge`'s texts with their 95% intervals.

        Raises:
            as :meth:`judge`.
        """
        generations = await self.judge(texts, pairs, targets)
        return await anyio.to_thread.run_sync(assessed, self.manifest, targets, generations)

    async def judge(self, texts: Sequence[str], pairs: Sequence[str] | None, targets: Any) -> list[GeneratedText]:
        """Greedy decoding with the model's max_new_tokens, as the trainer scored its test split.

        Raises:
            RequestError: the examples' prompts and new tokens are more than the service's budget per request.
        """
        max_new_tokens = default_max_new_tokens(self.manifest)
        check_prompt_count("examples", len(texts), max_new_tokens, self.settings)
        prompts = await anyio.to_thread.run_sync(self.backend.prompter.all, texts)
        check_token_budget("examples", prompts, max_new_tokens, self.settings)
        return await self.batcher(prompts, Decoding(max_new_tokens))

    def limits(self) -> dict:
        return {"max_new_tokens": max_new_tokens_cap(self.manifest, self.settings),
                "max_request_tokens": self.settings.max_request_tokens}

    def metadata(self) -> dict:
        m, backend = self.manifest, self.backend
        return {"prompt": m.prompt.model_dump(mode="json"), "decoding": m.decoding,
                "max_new_tokens": default_max_new_tokens(m),
                "chat_template": bool(getattr(backend.tokenizer, "chat_template", None)),
                "max_positions": backend.max_positions, "examples": m.examples}
