"""Dropout with cheaper masks on the CPU.

On a CPU, drawing dropout masks is a large share of a LoRA training step: peft applies dropout to the input
of every adapted layer (36 layers of the bundled MiniLM, 1536 features wide in the feed-forward output), and
``torch.bernoulli_`` spends about 6 ns per element. :class:`CpuDropout` keeps the same distribution (each
element kept with probability ``1 - p`` and scaled by ``1 / (1 - p)``) but takes its random bits in bulk
from numpy's PCG64: 16 bits per element, so ``p`` is applied in steps of 1/65536 (0.1 becomes
6554/65536 = 0.100006). The PCG64 stream of each call is seeded from torch's global generator, so the
masks follow ``set_seed`` and the generator state that checkpoints save, as ``nn.Dropout``'s do.

On CUDA (or any other device) the layer falls back to ``torch.nn.functional.dropout``, already a fused kernel.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

_STEPS = 1 << 16


class CpuDropout(nn.Module):
    """``nn.Dropout(p)`` whose masks, on a CPU, come from numpy's PCG64 in bulk."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        # 16-bit draws read as int16 in [-32768, 32767]: an element is kept when its draw is >= threshold.
        dropped = round(p * _STEPS)
        self.threshold = dropped - _STEPS // 2
        self.scale = _STEPS / (_STEPS - dropped)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, training=True)
        seed = int(torch.randint(0, 1 << 62, ()))
        n = x.numel()
        bits = np.random.PCG64(seed).random_raw((n + 3) // 4).view(np.int16)[:n]
        keep = torch.from_numpy(bits).view(x.shape) >= self.threshold
        return x * torch.where(keep, self.scale, 0.0).to(x.dtype)


def use_cpu_dropout(model: nn.Module) -> int:
    """Replace every ``nn.Dropout`` with p > 0 in ``model`` by a :class:`CpuDropout`; returns how many."""
    replaced = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout and child.p > 0:
                setattr(parent, name, CpuDropout(child.p).train(child.training))
                replaced += 1
    return replaced
