"""Choosing the mixed-precision mode from what the device can do."""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import ConfigError


@dataclass(frozen=True)
class DeviceFacts:
    cuda: bool
    bf16: bool

    @classmethod
    def detect(cls) -> DeviceFacts:
        import torch

        cuda = torch.cuda.is_available()
        return cls(cuda=cuda, bf16=cuda and torch.cuda.is_bf16_supported())


def choose_mixed_precision(requested: str, facts: DeviceFacts) -> str:
    """Resolve ``auto | no | fp16 | bf16`` to what Accelerate takes (``no``, ``fp16`` or ``bf16``).

    ``auto`` picks bf16 on a CUDA device that supports it, fp16 on other CUDA devices and fp32 (``no``)
    on the CPU, where half precision is slower and less accurate.

    Raises:
        ConfigError: fp16/bf16 asked for where there is no CUDA device, or bf16 on one without it.
    """
    if requested == "auto":
        return ("bf16" if facts.bf16 else "fp16") if facts.cuda else "no"
    if requested == "no":
        return "no"
    if not facts.cuda:
        raise ConfigError(f"train.mixed_precision: {requested} needs a CUDA device; this machine has none (use auto or no)")
    if requested == "bf16" and not facts.bf16:
        raise ConfigError("train.mixed_precision: this CUDA device does not support bf16; use fp16 or auto")
    return requested
