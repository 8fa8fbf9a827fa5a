"""Checking request bodies against the model and the service's limits; errors name the field at fault."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.manifest import Manifest
from core.tasks.base import LabelError
from service.schemas import Example
from service.settings import Settings


class RequestError(ValueError):
    """A request the service cannot answer as sent (HTTP 400)."""


def check_texts(field: str, texts: Sequence[str], settings: Settings, *, limit: int) -> None:
    if not texts:
        raise RequestError(f"{field}: give at least one text")
    if len(texts) > limit:
        raise RequestError(f"{field}: {len(texts)} items; the limit is {limit} per request")
    for i, text in enumerate(texts):
        if len(text) > settings.max_chars:
            raise RequestError(f"{field}[{i}]: {len(text)} characters; the limit is {settings.max_chars}")
        if not text.strip():
            # as training refuses them: nothing to read, and any answer would be the model's prior dressed as one
            raise RequestError(f"{field}[{i}]: empty or only whitespace; give the text to score")


def check_messages_size(conversations: Sequence[Sequence], settings: Settings) -> None:
    """Each message's content within the character limit of a text (the count is in the request schema)."""
    for i, conversation in enumerate(conversations):
        for j, message in enumerate(conversation):
            if len(message.content) > settings.max_chars:
                raise RequestError(f"messages[{i}][{j}].content: {len(message.content)} characters; the limit is "
                                   f"{settings.max_chars}")


def check_pairs(manifest: Manifest, texts: Sequence[str], pairs: Sequence[str] | None, field: str) -> None:
    if manifest.has_pair and pairs is None:
        raise RequestError(f"{field}: this model scores text pairs ({' + '.join(manifest.text_fields)}); "
                           "give a second text for every text")
    if not manifest.has_pair and pairs is not None:
        raise RequestError(f"{field}: this model takes single texts; leave it out")
    if pairs is not None and len(pairs) != len(texts):
        raise RequestError(f"{field}: {len(pairs)} items for {len(texts)} texts; give one per text")


def examples_to_inputs(manifest: Manifest, examples: Sequence[Example], settings: Settings
                       ) -> tuple[list[str], list[str] | None, np.ndarray]:
    """Texts, second texts and model targets of posted labelled examples.

    Raises:
        RequestError: a limit is exceeded, a label is missing or malformed (naming ``examples[i]``), or
            labels are unknown to the model (naming them).
    """
    spec = manifest.task.spec
    texts, parsed = [], []
    for i, example in enumerate(examples):
        if example.tokens is not None:
            if not spec.accepts_token_lists:
                raise RequestError(f"examples[{i}].tokens: this model takes texts; give text instead")
            if example.text is not None:
                raise RequestError(f"examples[{i}]: give text or tokens, not both")
            given, key, value = example.tokens, "tags", example.tags
            if not given:
                raise RequestError(f"examples[{i}].tokens: no tokens; give at least one")
        else:
            name, given = _first_text(example, i)
            if not given.strip():
                # as training refuses them: there is nothing to score (a token model would find no word at all)
                raise RequestError(f"examples[{i}].{name}: empty or only whitespace; give the text to score")
            key, value = spec.label_key, getattr(example, spec.label_key)
        try:
            text, label = spec.parse_example(given, value)
        except LabelError as exc:
            raise RequestError(f"examples[{i}].{key}: {exc}") from None
        texts.append(text)
        parsed.append(label)
    check_texts("examples", texts, settings, limit=settings.max_examples)
    pairs = [e.text_pair for e in examples] if manifest.has_pair else None
    if manifest.has_pair and any(p is None for p in pairs):
        i = next(i for i, p in enumerate(pairs) if p is None)
        raise RequestError(f"examples[{i}].text_pair: this model scores text pairs; give one for every example")
    if not manifest.has_pair and any(e.text_pair is not None for e in examples):
        i = next(i for i, e in enumerate(examples) if e.text_pair is not None)
        raise RequestError(f"examples[{i}].text_pair: this model takes single texts; leave it out")
    try:
        targets = spec.to_targets(parsed, manifest.labels)
    except LabelError as exc:
        raise RequestError(f"examples: {exc}") from None
    return texts, pairs, targets


# Names a posted example's text may have instead of ``text``: a generation model's input, an embedding model's query.
TEXT_ALIASES = ("input", "query")


def _first_text(example: Example, i: int) -> tuple[str, str]:
    """The field that holds the example's text (``text`` or one of :data:`TEXT_ALIASES`, given exactly once) and
    the text."""
    given = {name: getattr(example, name) for name in ("text", *TEXT_ALIASES) if getattr(example, name) is not None}
    if len(given) > 1:
        raise RequestError(f"examples[{i}]: give one of {' or '.join(given)}, not both")
    if not given:
        raise RequestError(f"examples[{i}].text: missing; give the text to score (or input for a generation model, "
                           "query for an embedding model)")
    return next(iter(given.items()))
