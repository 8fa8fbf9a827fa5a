import pytest

from core.errors import ConfigError
from training.recipe.precision import DeviceFacts, choose_mixed_precision

CPU = DeviceFacts(cuda=False, bf16=False)
AMPERE = DeviceFacts(cuda=True, bf16=True)
TURING = DeviceFacts(cuda=True, bf16=False)


def test_auto_picks_by_device():
    assert choose_mixed_precision("auto", CPU) == "no"
    assert choose_mixed_precision("auto", AMPERE) == "bf16"
    assert choose_mixed_precision("auto", TURING) == "fp16"


def test_explicit_choices():
    assert choose_mixed_precision("no", AMPERE) == "no"
    assert choose_mixed_precision("fp16", AMPERE) == "fp16"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        choose_mixed_precision("fp16", CPU)
    with pytest.raises(ConfigError, match="does not support bf16"):
        choose_mixed_precision("bf16", TURING)
