import numpy as np
import pytest
import torch
from torch import nn

from training.recipe.dropout import CpuDropout, use_cpu_dropout

N = 2_000_000


def _kept(p: float, shape=(N,), seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return CpuDropout(p).train()(torch.ones(shape)) != 0


@pytest.mark.parametrize("p", [0.1, 0.5, 0.05])
def test_masks_keep_each_element_with_probability_one_minus_p(p):
    kept = _kept(p).numpy()
    sigma = np.sqrt(p * (1 - p) / N)
    assert abs(kept.mean() - (1 - p)) < 5 * sigma + 1 / 65536
    # Each of the four 16-bit lanes of a 64-bit draw is unbiased, and neighbours are independent.
    for lane in range(4):
        assert abs(kept[lane::4].mean() - (1 - p)) < 5 * sigma * 2 + 1 / 65536
    both = (kept[:-1] & kept[1:]).mean()
    assert abs(both - (1 - p) ** 2) < 5 * np.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / N) + 2 / 65536


def test_kept_elements_are_rescaled_so_the_expectation_is_unchanged():
    layer = CpuDropout(0.1).train()
    x = torch.randn(512, 384)
    torch.manual_seed(1)
    out = layer(x)
    kept = out != 0
    np.testing.assert_allclose(out[kept].numpy(), (x[kept] * layer.scale).numpy(), rtol=1e-6)
    assert layer.scale == pytest.approx(1 / (1 - 0.1), rel=1e-4)
    torch.manual_seed(2)
    assert layer(torch.ones(N)).mean().item() == pytest.approx(1.0, abs=2e-3)


def test_masks_follow_torchs_seed_and_differ_between_calls():
    layer = CpuDropout(0.1).train()
    x = torch.ones(64, 128)
    torch.manual_seed(7)
    first, second = layer(x), layer(x)
    torch.manual_seed(7)
    assert torch.equal(layer(x), first) and torch.equal(layer(x), second)
    assert not torch.equal(first, second)


def test_gradient_is_the_mask():
    layer = CpuDropout(0.2).train()
    x = torch.randn(8, 16, 32, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    expected = torch.where(out != 0, layer.scale, 0.0)
    assert torch.equal(x.grad, expected)


def test_identity_in_eval_mode_and_at_zero():
    x = torch.randn(4, 8)
    assert CpuDropout(0.5).eval()(x) is x
    assert CpuDropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        CpuDropout(1.0)


def test_replaces_every_dropout_of_a_lora_model_without_changing_its_outputs(tiny_model):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_dropout=0.1,
                                             target_modules=["query", "value", "dense"]))
    before = sum(type(m) is nn.Dropout and m.p > 0 for m in model.modules())
    ids = torch.randint(1000, 2000, (3, 10))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert use_cpu_dropout(model) == before > 0
    assert not any(type(m) is nn.Dropout and m.p > 0 for m in model.modules())
    # BERT reads the attention-probability dropout rate from its dropout module's ``p``.
    attention = model.base_model.model.bert.encoder.layer[0].attention.self
    assert isinstance(attention.dropout, CpuDropout) and attention.dropout.p == pytest.approx(0.1)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)
    model.train()
    torch.manual_seed(3)
    a = model(input_ids=ids).logits
    torch.manual_seed(3)
    assert torch.equal(model(input_ids=ids).logits, a)
