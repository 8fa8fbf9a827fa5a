"""How long a run trains: a fixed number of epochs, or (epochs: auto) until the validation metric stops improving,
within caps on epochs, optimizer steps and minutes; the manifest says what ended it."""

import pytest

from core.errors import ConfigError
from core.manifest import read_manifest
from tests.conftest import tiny_run_config
from training.config import load_config
from training.run import train


def _run(tiny_model, data_dir, tmp_path, **train_options):
    raw = tiny_run_config(tiny_model, data_dir, tmp_path / "run")
    raw["train"].update(train_options)
    result = train(load_config(raw=raw))
    return read_manifest(result.artifact_dir).training


def test_epochs_auto_trains_until_patience_runs_out_on_a_constant_rate(tiny_model, data_dir, tmp_path):
    record = _run(tiny_model, data_dir, tmp_path, epochs="auto", max_epochs=12, lr=3e-2, warmup_ratio=0.5,
                  early_stopping={"patience": 1})
    evaluations = record.history["validation"]
    assert record.stopped_because == "patience" and record.stopped_early and record.epochs_run < 12
    assert len(evaluations) == record.epochs_run  # one per epoch, the last the one that found no gain
    assert record.best_step < evaluations[-1]["step"]
    assert record.still_improving is False
    rates = [entry["lr"] for entry in record.history["train_loss"]]
    warmup = round(0.5 * record.steps_per_epoch)  # half of the first epoch, not of a length nobody knows
    assert rates[warmup - 1:] == [pytest.approx(3e-2)] * (len(rates) - warmup + 1)
    assert rates[0] < rates[warmup - 2] < 3e-2


def test_caps_end_a_run_and_say_so(tiny_model, data_dir, tmp_path):
    steps = _run(tiny_model, data_dir, tmp_path / "steps", epochs=3, max_steps=5, eval_every=2)
    assert (steps.steps, steps.stopped_because) == (5, "max_steps")
    assert steps.history["validation"][-1]["step"] == 5  # the last weights are judged too
    timed = _run(tiny_model, data_dir, tmp_path / "minutes", epochs="auto", max_minutes=1e-4)
    assert (timed.epochs_run, timed.stopped_because) == (1, "max_minutes")
    fixed = _run(tiny_model, data_dir, tmp_path / "fixed", epochs=2, early_stopping={"patience": None})
    assert (fixed.epochs_run, fixed.stopped_because, fixed.stopped_early) == (2, "epochs", False)
    assert fixed.history["train_loss"][-1]["lr"] < fixed.history["train_loss"][0]["lr"]  # linear decay, as before


@pytest.mark.parametrize(("train_options", "message"), [
    ({"epochs": 0}, r"train\.epochs.*must be 'auto' or a positive number"),
    ({"epochs": "forever"}, r"train\.epochs"),
    ({"max_minutes": 0}, r"train\.max_minutes"),
])
def test_bad_run_lengths_name_the_key(tiny_model, data_dir, tmp_path, train_options, message):
    raw = tiny_run_config(tiny_model, data_dir, tmp_path / "run")
    raw["train"].update(train_options)
    with pytest.raises(ConfigError, match=message):
        load_config(raw=raw)
