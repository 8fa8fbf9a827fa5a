from pathlib import Path

import pytest

from core.errors import ConfigError
from core.tasks import Task
from training.config import load_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"sentiment-lora.yaml", "sentiment-full.yaml", "sentiment-regression.yaml",
                                         "ner-lora.yaml", "ner-full.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_opens_with_its_command(path):
    cfg = load_config(path)
    command = "tune" if cfg.search else "train"  # a config with a search section is run by tuneserve tune
    assert path.read_text().splitlines()[0].startswith(f"# tuneserve {command} configs/{path.name}")
    from training.data.demo import is_demo

    assert is_demo(cfg.data.train)  # shipped configs run on the demo sets, fetched from the package registry


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(Path(CONFIGS[0]), ["train.epochs=1", "lora.r=4", "train.eval_every=50", "data.test=t.csv"])
    assert (cfg.train.epochs, cfg.lora.r, cfg.train.eval_every, cfg.data.test) == (1, 4, 50, "t.csv")
    minimal = load_config(raw={"data": {"train": "x.csv"}})
    assert minimal.method == "lora" and minimal.lr == 5e-4 and minimal.monitor == "f1_macro"
    assert load_config(raw={"data": {"train": "x"}, "method": "full"}).lr == 5e-5
    assert load_config(raw={"task": "regression", "data": {"train": "x"}}).monitor == "r2"
    # YAML reads a bare `no` as false; mixed_precision takes it as the word it is.
    assert load_config(Path(CONFIGS[0]), ["train.mixed_precision=no"]).train.mixed_precision == "no"
    # and `on`/`off` as true/false; export.int8 takes them as the words they are.
    assert load_config(Path(CONFIGS[0]), ["export.int8=off"]).export.int8 == "off"
    assert load_config(Path(CONFIGS[0]), ["export.int8=on"]).export.int8 == "on"


@pytest.mark.parametrize("raw, message", [
    ({"data": {"train": "x"}, "train": {"epoch": 3}}, r"'train.epoch': unknown key \(did you mean 'train.epochs'\?\)"),
    ({"data": {"train": "x"}, "train": {"epocs": 3}}, r"'train.epocs': unknown key \(did you mean 'train.epochs'\?\)"),
    ({"data": {"train": "x"}, "lora": {"rank": 8}}, r"'lora.rank': unknown key$"),  # nothing close: no guess
    ({"data": {"train": "x", "colum": "t"}}, "'data.colum': unknown key"),
    ({"data": {"train": "x"}, "modle": "minilm"}, r"'modle': unknown key \(did you mean 'model'\?\)"),
    ({"data": {"train": "x"}, "method": "prefix"}, "'method'"),
    ({"data": {"train": "x"}, "train": {"lr": "fast"}}, "'train.lr'"),
    ({"data": {"train": "x"}, "train": {"batch_size": 0}}, "'train.batch_size'"),
    ({}, "'data': is required"),
    ({"data": {"train": "x"}, "train": {"early_stopping": {"metric": "r2"}}}, "not a classification metric"),
    ({"data": {"train": "x", "label_delimiter": ","}}, "only applies to task: multilabel"),
])
def test_invalid_configs_name_the_field(raw, message):
    with pytest.raises(ConfigError, match=message):
        load_config(raw=raw)


def test_bad_override_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(raw={"data": {"train": "x"}}, overrides=["train.epochs"])
    with pytest.raises(ConfigError, match="'train.epochs' is a value"):
        load_config(raw={"data": {"train": "x"}, "train": {"epochs": 1}}, overrides=["train.epochs.x=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("task", [t.value for t in Task])
def test_every_tasks_recorded_config_loads_back(task):
    """The manifest records the whole config (every default spelled out) and the export validates it again."""
    cfg = load_config(raw={"task": task, "data": {"train": "x.jsonl"}})
    assert load_config(raw=cfg.model_dump(mode="json")) == cfg


def test_the_model_is_named_after_its_config_file_unless_it_names_itself(tmp_path):
    import yaml

    from training.config import load_config

    raw = {"task": "classification", "data": {"train": "train.jsonl"}, "output_dir": str(tmp_path / "run")}
    (tmp_path / "support-tickets.yaml").write_text(yaml.safe_dump(raw))
    assert load_config(tmp_path / "support-tickets.yaml").run_name == "support-tickets"
    (tmp_path / "named.yaml").write_text(yaml.safe_dump({**raw, "name": "tickets-v2"}))
    assert load_config(tmp_path / "named.yaml").run_name == "tickets-v2"
    assert load_config(raw=raw).run_name == "run"  # no file: the output directory's name


@pytest.mark.parametrize("task", [t.value for t in Task])
def test_a_task_brings_its_own_training_defaults_where_the_config_is_silent(task):
    spec = Task(task).spec
    silent = load_config(raw={"task": task, "data": {"train": "x.jsonl"}})
    for key, value in spec.train_defaults.items():
        assert getattr(silent.train, key) == value, key
    assert silent.head_lr == (None if spec.head_lr_factor == 1 else silent.lr * spec.head_lr_factor)  # LoRA
    # what a config sets is kept; a config that sets lr has chosen one rate for all
    own = load_config(raw={"task": task, "data": {"train": "x.jsonl"},
                           "train": {"epochs": 2, "head_lr": 1e-3, "warmup_ratio": 0.1}})
    assert (own.train.epochs, own.head_lr, own.train.warmup_ratio) == (2, 1e-3, 0.1)
    assert load_config(raw={"task": task, "data": {"train": "x.jsonl"}, "train": {"lr": 1e-3}}).head_lr is None
    assert load_config(raw={"task": task, "data": {"train": "x.jsonl"}, "method": "freeze"}).head_lr is None


def test_the_tasks_with_a_head_train_until_validation_stops_rising_with_a_faster_head():
    for task in ("classification", "regression", "token_classification", "multilabel"):
        cfg = load_config(raw={"task": task, "data": {"train": "x.jsonl"}})
        assert cfg.train.epochs == "auto" and cfg.train.schedule == "constant"
        assert cfg.head_lr == pytest.approx(10 * cfg.lr)
    # the multiple stops at the head's rate the sweep chose for LoRA; a body as fast as that keeps one rate
    rates = {method: load_config(raw={"task": "classification", "data": {"train": "x.jsonl"}, "method": method}).head_lr
             for method in ("full", "lora", "ia3", "prompt", "freeze")}
    assert rates == {"full": pytest.approx(5e-4), "lora": pytest.approx(5e-3), "ia3": pytest.approx(5e-3),
                     "prompt": None, "freeze": None}
    # no new head, one rate: embeddings until validation stops improving, generation 3 epochs (a constant rate
    # wrote worse at the same best epoch)
    for task, epochs in (("embedding", "auto"), ("generation", 3)):
        cfg = load_config(raw={"task": task, "data": {"train": "x.jsonl"}})
        assert (cfg.train.epochs, cfg.head_lr) == (epochs, None)
