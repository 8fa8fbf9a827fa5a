"""Data augmentation of the training split: the four word operations of EDA (Wei & Zou, 2019) through nlpaug.

Synonym replacement (nlpaug's ``SynonymAug`` on WordNet), random insertion of a WordNet synonym of one of the
text's words at a random place, random swap of neighbouring words and random deletion (nlpaug's
``RandomWordAug``). nlpaug inserts words only from embeddings or a language model, so insertion is
:class:`SynonymInsertAug`, built on nlpaug's own word augmenter as EDA defines it.

Each operation's setting is the share of a text's words it changes (at least one word while it is on), as
nlpaug's ``aug_p``. An augmented copy applies every operation that is on, in EDA's order (synonyms, insertion,
swap, deletion), to each text of an example (both texts of a pair); ``copies`` copies of every training example
are added, with the example's label. A copy that came out identical to its example, or empty, is not added
(and counted). Words are split on white space, so punctuation stays where it was. Synonyms come from every sense
of a word, as in EDA (nlpaug would part-of-speech tag first, with a tagger nltk downloads from outside the
registries), and skip scikit-learn's English stop words (WordNet has senses for "it", "a", "in"). Everything is
seeded; Python's and numpy's global random states, which nlpaug draws from, are restored afterwards.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import nlpaug
import nlpaug.augmenter.word as naw
import nlpaug.flow as naf
import nlpaug.model.word_dict as nmw
import numpy as np
from nlpaug.util import Action, Doc
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from training.config import AugmentConfig
from training.data.wordnet import SOURCE, ensure_wordnet

OPERATIONS = ("synonym", "insert", "swap", "delete")  # EDA's order


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """nlpaug draws from ``random`` and ``numpy.random``: seed both, and leave them as they were."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _stop_words() -> list[str]:
    return sorted({form for word in ENGLISH_STOP_WORDS for form in (word, word.capitalize(), word.upper())})


def _whitespace_tokens(text: str) -> list[str]:
    return text.split()


def _join(tokens: list[str]) -> str:
    return " ".join(t for t in tokens if t)


class AnySenseWordNet(nmw.WordNet):
    """nlpaug's WordNet dictionary, looking words up in every sense instead of part-of-speech tagging them first."""

    @classmethod
    def pos_tag(cls, tokens):
        return [(token, "") for token in tokens]  # no tag: nlpaug then takes every sense's lemmas


def build_augmenter(cfg: AugmentConfig):
    """The nlpaug flow for ``cfg``: its operations that are on, in EDA's order."""
    common = {"aug_min": 1, "aug_max": None, "tokenizer": _whitespace_tokens, "reverse_tokenizer": _join}
    steps = []
    if cfg.synonym or cfg.insert:
        ensure_wordnet()
        dictionary = AnySenseWordNet(lang="eng", is_synonym=True)
    if cfg.synonym:
        synonyms = naw.SynonymAug(aug_src="wordnet", aug_p=cfg.synonym, stopwords=_stop_words(), **common)
        synonyms.model = dictionary
        steps.append(synonyms)
    if cfg.insert:
        steps.append(SynonymInsertAug(dictionary, aug_p=cfg.insert, stopwords=_stop_words(), **common))
    for action, share in (("swap", cfg.swap), ("delete", cfg.delete)):
        if share:
            steps.append(naw.RandomWordAug(action=action, aug_p=share, **common))
    return naf.Sequential(steps)


class SynonymInsertAug(naw.WordAugmenter):
    """EDA's random insertion on nlpaug's word augmenter: a WordNet synonym of a random word of the text (not a
    stop word), inserted at a random place, as many times as ``aug_p`` of the text's words."""

    def __init__(self, dictionary: nmw.WordNet, **kwargs) -> None:
        super().__init__(action=Action.INSERT, name="SynonymInsert_Aug", **kwargs)
        self.model = dictionary

    def insert(self, data: str) -> str:
        if not data or not data.strip():
            return data
        doc = Doc(data, self.tokenizer(data))
        tokens = doc.get_original_tokens()
        candidates = {}
        for index in self.pre_skip_aug(tokens):
            found = [s for s in self.model.predict(tokens[index]) if s.lower() != tokens[index].lower()]
            if found:
                candidates[index] = found
        if not candidates:
            return data
        count = min(self.generate_aug_cnt(len(tokens)), len(candidates))
        change = self.parent_change_seq
        for index in self.sample(sorted(candidates), count):
            synonym = self.sample(candidates[index], 1)[0].replace("_", " ").replace("-", " ").lower()
            change += 1
            doc.add_token(random.randint(0, doc.size()), token=synonym, action=self.action, change_seq=change)
        return self.reverse_tokenizer(doc.get_augmented_tokens())


@dataclass
class Augmented:
    """The rows to add: each one's original (index into the split), its text(s), and what was done."""

    origin: list[int]
    texts: list[str]
    pairs: list[str] | None
    record: dict


def augment_texts(texts: Sequence[str], pairs: Sequence[str] | None, cfg: AugmentConfig, seed: int) -> Augmented:
    """``cfg.copies`` augmented copies of every example (texts and, for pairs, second texts), seeded by ``seed``."""
    flow = build_augmenter(cfg)
    origin, new_texts, new_pairs, unchanged = [], [], [] if pairs is not None else None, 0
    with _seeded(seed):
        for copy in range(cfg.copies):
            for i, text in enumerate(texts):
                changed = [_apply(flow, text)] + ([_apply(flow, pairs[i])] if pairs is not None else [])
                original = [text] + ([pairs[i]] if pairs is not None else [])
                if changed == original or not all(t.strip() for t in changed):
                    unchanged += 1
                    continue
                origin.append(i)
                new_texts.append(changed[0])
                if new_pairs is not None:
                    new_pairs.append(changed[1])
    record = {
        "operations": {name: getattr(cfg, name) for name in OPERATIONS if getattr(cfg, name)},
        "copies": cfg.copies, "seed": seed, "library": f"nlpaug {nlpaug.__version__}",
        "examples": len(texts), "rows_added": len(origin), "copies_unchanged_not_added": unchanged,
    }
    if cfg.synonym or cfg.insert:
        record["wordnet"] = SOURCE
    return Augmented(origin=origin, texts=new_texts, pairs=new_pairs, record=record)


def _apply(flow, text: str) -> str:
    out = flow.augment(text)
    return out[0] if isinstance(out, list) else out
