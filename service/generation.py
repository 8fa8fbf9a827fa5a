"""What /generate needs beside the backend: prompts built as the trainer built them, decoding options checked
against the model's caps, concurrent requests pooled into one decoder batch, and server-sent events for streams.

A posted input becomes a prompt through :class:`core.tasks.generation.Prompter`, the function training, the
export gate and the start-up self-test call, with the manifest's prompt format and input budget; only ``messages``
(the model's chat template) and ``raw`` prompts (used as sent) bypass the template.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Generator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio.to_thread
import numpy as np
from starlette.responses import StreamingResponse

from core.errors import ArtifactError
from core.manifest import Manifest
from core.prompting import check_messages, render_messages
from core.tasks.generation import GeneratedText, Prompter, prompt_ids
from service.batcher import PooledTurns
from service.requests import RequestError
from service.settings import Settings

logger = logging.getLogger("bentoml.tuneserve")

# A request may ask for up to this many times the new tokens the model was evaluated with (and never more than
# TUNESERVE_MAX_NEW_TOKENS): a summariser trained for 64-token answers is not asked for 4,000.
MAX_NEW_TOKENS_FACTOR = 4
MAX_STOPS = 4  # stop strings per request
MAX_STOP_CHARS = 100  # each; the decoder holds back this much text while it may still begin one


def default_max_new_tokens(manifest: Manifest) -> int:
    """The new tokens the model was evaluated (and its export gated) with: the default of every request.

    Raises:
        ArtifactError: the manifest records no prompt format or no ``decoding.max_new_tokens``.
    """
    if manifest.prompt is None:
        raise ArtifactError("the manifest of this generation model records no prompt format; retrain or re-export it")
    value = (manifest.decoding or {}).get("max_new_tokens")
    if not isinstance(value, int) or value < 1:
        raise ArtifactError(f"the manifest's decoding.max_new_tokens is {value!r}; expected a positive integer")
    return value


def max_new_tokens_cap(manifest: Manifest, settings: Settings) -> int:
    return min(MAX_NEW_TOKENS_FACTOR * default_max_new_tokens(manifest), settings.max_new_tokens)


_OFFLINE = "score a whole file offline with `tuneserve evaluate ARTIFACT --data FILE`"


def check_prompt_count(field: str, count: int, max_new_tokens: int, settings: Settings) -> None:
    """Refuse, before a single prompt is tokenized, a request whose new tokens alone come to more than
    TUNESERVE_MAX_REQUEST_TOKENS: ten thousand prompts are refused at once rather than after reading them all.

    Raises:
        RequestError: ``count`` times ``max_new_tokens`` is over the budget; the message says how many prompts fit
            at most.
    """
    budget = settings.max_request_tokens
    if count * max_new_tokens <= budget:
        return
    fits = budget // max_new_tokens
    split = (f"send at most {fits} per request (fewer as their prompts' tokens count too)" if fits else
             "ask for fewer new tokens (max_new_tokens)")
    raise RequestError(f"{field}: {count} prompts x up to {max_new_tokens} new tokens = {count * max_new_tokens:,} "
                       f"tokens before their prompts are read, over this service's budget of {budget:,} per request "
                       f"(TUNESERVE_MAX_REQUEST_TOKENS); {split}, or {_OFFLINE}")


def check_token_budget(field: str, ids: Sequence[Sequence[int]], max_new_tokens: int, settings: Settings) -> None:
    """Refuse a request whose prompts and new tokens come to more tokens than TUNESERVE_MAX_REQUEST_TOKENS: a writer
    reads every prompt token and writes up to max_new_tokens per prompt, and one request of hundreds of long prompts
    would hold the decoder for minutes.

    Raises:
        RequestError: the prompt tokens plus ``len(ids)`` times ``max_new_tokens`` are over the budget; the message
            says how many such prompts fit.
    """
    budget, count = settings.max_request_tokens, len(ids)
    read = sum(len(prompt) for prompt in ids)
    total = read + count * max_new_tokens
    if total <= budget:
        return
    fits = budget * count // total  # prompts of the same lengths that fit
    split = (f"send at most {fits} per request" if fits else
             "send shorter prompts or ask for fewer new tokens (max_new_tokens)")
    raise RequestError(f"{field}: {count} prompts of {read:,} tokens in all and up to {count} x {max_new_tokens} new "
                       f"tokens = {total:,} tokens, over this service's budget of {budget:,} per request "
                       f"(TUNESERVE_MAX_REQUEST_TOKENS); {split}, or {_OFFLINE}")


@dataclass(frozen=True)
class Decoding:
    """How one request decodes (the seed aside): requests with equal options can share a decoder batch."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def kwargs(self) -> dict[str, Any]:
        return asdict(self)


def decoding_options(manifest: Manifest, settings: Settings, *, max_new_tokens: int | None, temperature: float | None,
                     top_p: float | None, top_k: int | None, stop: Sequence[str] | None) -> Decoding:
    """A request's decoding: absent fields take the served defaults (the model's max_new_tokens, greedy).

    Raises:
        RequestError: max_new_tokens is over this model's cap, or top_p is 0 (the ranges of the other fields are
            in the request schema).
    """
    cap = max_new_tokens_cap(manifest, settings)
    if max_new_tokens is None:
        max_new_tokens = min(default_max_new_tokens(manifest), cap)
    elif max_new_tokens > cap:
        raise RequestError(f"max_new_tokens: {max_new_tokens} is over this model's cap of {cap} ({MAX_NEW_TOKENS_FACTOR} "
                           f"times the {default_max_new_tokens(manifest)} it was evaluated with, at most "
                           f"TUNESERVE_MAX_NEW_TOKENS={settings.max_new_tokens})")
    if top_p is not None and top_p <= 0:
        raise RequestError("top_p: must be above 0 (the probability mass sampling keeps)")
    temperature = temperature or 0.0
    if temperature == 0:  # greedy: the sampling filters do not apply
        return Decoding(max_new_tokens, stop=tuple(stop or ()))
    return Decoding(max_new_tokens, float(temperature), float(1.0 if top_p is None else top_p), int(top_k or 0),
                    tuple(stop or ()))


def prompt_token_ids(prompter: Prompter, *, prompts: Sequence[str] | None,
                     messages: Sequence[Sequence[Any]] | None, raw: bool, max_new_tokens: int,
                     max_positions: int | None, encoder_decoder: bool = False) -> list[list[int]]:
    """Token ids of each prompt of a request.

    Args:
        prompter: the artifact's tokenizer, prompt format and input budget.
        prompts: inputs, each put in the artifact's prompt exactly as training did (cut to the manifest's input
            budget first), or, with ``raw``, whole prompts tokenized as they are.
        messages: conversations ({role, content} objects), rendered with the model's chat template.
        max_positions: the model's position limit: prompt and new tokens together must fit (None: no limit), or
            with ``encoder_decoder`` each on its own (the encoder reads the prompt, the decoder writes the tokens).

    Raises:
        RequestError: naming the field: both or neither of prompts and messages, ``raw`` with messages, a malformed
            conversation, no chat template, an empty prompt, or one too long for the model.
    """
    if (prompts is None) == (messages is None):
        raise RequestError("prompts: give prompts or messages (exactly one of them)")
    if raw and prompts is None:
        raise RequestError("raw: applies to prompts; messages are always rendered with the model's chat template")
    tokenizer = prompter.tokenizer
    ids: list[list[int]] = []
    if prompts is not None:
        field_name = "prompts"
        for text in prompts:
            ids.append(prompt_ids(tokenizer, prompter.fmt, text) if raw else prompter.ids(text))
    else:
        field_name = "messages"
        for i, conversation in enumerate(messages):
            turns = [m.model_dump() if hasattr(m, "model_dump") else m for m in conversation]
            try:
                rendered = render_messages(tokenizer, check_messages(turns, where=f"messages[{i}]"))
            except ValueError as exc:
                message = str(exc)
                raise RequestError(message if message.startswith("messages") else f"messages: {message}") from None
            ids.append(list(tokenizer(rendered, add_special_tokens=False)["input_ids"]))
    for i, prompt in enumerate(ids):
        if not prompt:
            raise RequestError(f"{field_name}[{i}]: the prompt has no tokens")
        if max_positions is None:
            continue
        if encoder_decoder and max(len(prompt), max_new_tokens) > max_positions:
            raise RequestError(f"{field_name}[{i}]: {len(prompt)} prompt tokens or max_new_tokens {max_new_tokens} "
                               f"exceed the model's {max_positions} positions (of its encoder, and of its decoder)")
        if not encoder_decoder and len(prompt) + max_new_tokens > max_positions:
            raise RequestError(f"{field_name}[{i}]: {len(prompt)} prompt tokens and max_new_tokens {max_new_tokens} "
                               f"exceed the model's {max_positions} positions")
    return ids


@dataclass
class _Job:
    prompts: list[list[int]]
    decoding: Decoding
    seed: Any  # greedy: None; else one per prompt (a list) where the backend takes that, else one for the job
    key: tuple  # jobs with equal keys may share a batch
    future: asyncio.Future = field(repr=False)


class GenerationBatcher(PooledTurns):
    """Requests that arrive while the decoder is busy share its next batch.

    As :class:`service.batcher.MicroBatcher` does for forward passes: a lone request runs at once; under load the
    next turn takes the queued requests that decode alike (same max_new_tokens, sampling options and stop strings),
    up to ``max_batch_size`` prompts, in arrival order. A sampled request keeps the draws it would get alone: its
    rows get the child seeds the decoder gives a one-request call (``SeedSequence(seed).spawn(n)``). Where the
    backend takes one seed per call only, sampled requests run alone. Decoding runs in a worker thread, so the event
    loop keeps answering.
    """

    def __init__(self, backend: Any, max_batch_size: int):
        super().__init__(max_batch_size)
        self.backend = backend

    async def __call__(self, prompts: list[list[int]], decoding: Decoding, seed: int | None = None) -> list[GeneratedText]:
        loop = asyncio.get_running_loop()
        if decoding.greedy or self.backend.per_prompt_seeds:
            seeds: list | None = None
            if not decoding.greedy:
                seeds = np.random.SeedSequence(seed).spawn(len(prompts)) if seed is not None else [None] * len(prompts)
            # A large request goes in parts of max_batch_size prompts, which other requests' parts may join.
            step = self.max_batch_size
            jobs = [_Job(prompts[i:i + step], decoding, seeds[i:i + step] if seeds else None, (decoding,),
                         loop.create_future()) for i in range(0, len(prompts), step)]
        else:  # one seed for the call: a key no other job has, so this one runs alone and whole
            jobs = [_Job(prompts, decoding, seed, (decoding, object()), loop.create_future())]
        self._queue.extend(jobs)
        self._start()
        try:
            return [g for job in jobs for g in await job.future]
        finally:  # a request that is gone (cancelled, timed out) leaves its parts not yet decoded
            for job in jobs:
                job.future.cancel()

    def _take(self) -> list[_Job]:
        jobs = [self._queue.pop(0)]
        size = len(jobs[0].prompts)
        for job in list(self._queue):
            if job.key == jobs[0].key and size + len(job.prompts) <= self.max_batch_size:
                self._queue.remove(job)
                jobs.append(job)
                size += len(job.prompts)
        return jobs

    def _run(self, jobs: list[_Job]) -> list[GeneratedText]:
        prompts = [p for job in jobs for p in job.prompts]
        if jobs[0].decoding.greedy:
            seed = None
        elif isinstance(jobs[0].seed, list):
            seed = [s for job in jobs for s in job.seed]
        else:  # a job that runs alone
            seed = jobs[0].seed
        return self.backend.generate(prompts, seed=seed, **jobs[0].decoding.kwargs())

    def _count(self, job: _Job) -> int:
        return len(job.prompts)


# ---- streaming ------------------------------------------------------------------------------------------------

def _event(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _advance(chunks: Generator[str, None, GeneratedText]) -> tuple[bool, Any]:
    """One step of a stream, in a worker thread: (False, the next chunk) or (True, the finished generation).
    StopIteration must not cross into the event loop, so it is caught here."""
    try:
        return False, next(chunks)
    except StopIteration as stop:
        return True, stop.value


async def stream_events(chunks: Generator[str, None, GeneratedText]) -> AsyncIterator[str]:
    """Server-sent events of one generation: ``{"text": chunk}`` per chunk, then ``{"finish_reason", "tokens"}``,
    then ``[DONE]``. Each decoding step runs in a worker thread; however the stream ends (done, failed, or the
    client gone, which cancels it), the decoder's generator is closed, which stops decoding."""
    sent, finished = 0, False
    try:
        while True:
            done, value = await anyio.to_thread.run_sync(_advance, chunks)
            if done:
                finished = True
                yield _event({"finish_reason": value.finish_reason, "tokens": value.tokens})
                yield _event("[DONE]")
                return
            sent += 1
            yield _event({"text": value})
    except Exception as exc:  # the status line is sent: the error goes in the stream
        finished = True
        logger.exception("generation stream failed")
        yield _event({"error": f"generation failed: {type(exc).__name__}"})
    finally:
        chunks.close()
        if not finished:
            logger.info("stream closed before its end (the client went away); decoding stopped after %d chunks", sent)


class EventStream(StreamingResponse):
    """``text/event-stream`` whose body is closed however the response ends: finished, cancelled when the client
    disconnects (ASGI servers before spec 2.4), or cut off by a failed send (spec 2.4), so that no decoding is left
    running for a client that went away."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str]):
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
