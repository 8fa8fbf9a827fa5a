"""An artifact's ``tokenizer.json`` run by the ``tokenizers`` library alone, without transformers.

A Hugging Face fast tokenizer is a wrapper around this same library: each call sets the truncation and padding it
was asked for on the wrapped ``tokenizers.Tokenizer`` and converts its encodings. :class:`TokenizerFile` does the
same for the calls that scoring models make (:mod:`core.encoding`), so that a server of an ONNX graph need not import
transformers, which is most of a classifier's model load (BENCHMARKS.md, cold start). Whether it encodes as the
artifact's own tokenizer does is checked at export on the held-out texts (``export.tokenizer`` in the manifest); a
server uses it only where that check passed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


class TokenizerFile:
    """The subset of a transformers tokenizer's calling convention that :class:`core.encoding.Encoder` uses.

    Args:
        tokenizer: the ``tokenizers.Tokenizer`` read from the artifact's ``tokenizer.json``.
        config: the artifact's ``tokenizer_config.json`` (pad token, padding and truncation sides).
        inputs: the names the transformers tokenizer returns (its ``model_input_names``), as the export recorded.
    """

    def __init__(self, tokenizer: Any, config: dict, inputs: Sequence[str]):
        self._tokenizer = tokenizer
        self.inputs = tuple(inputs)
        self.pad_token = config.get("pad_token")
        if isinstance(self.pad_token, dict):  # an AddedToken written out
            self.pad_token = self.pad_token.get("content")
        self.pad_token_id = tokenizer.token_to_id(self.pad_token) if self.pad_token is not None else None
        self.pad_token_type_id = int(config.get("pad_token_type_id", 0))
        self.padding_side = config.get("padding_side", "right")
        self.truncation_side = config.get("truncation_side", "right")

    @classmethod
    def load(cls, model_dir: Path, inputs: Sequence[str]) -> TokenizerFile:
        from tokenizers import Tokenizer

        config_path = model_dir / TOKENIZER_CONFIG
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        return cls(Tokenizer.from_file(str(model_dir / TOKENIZER_FILE)), config, inputs)

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return self._tokenizer.num_special_tokens_to_add(pair)

    def _settings(self, truncation: bool | str, max_length: int | None, stride: int, padding: bool | str) -> None:
        if truncation and max_length is not None:
            strategy = "longest_first" if truncation is True else truncation
            self._tokenizer.enable_truncation(max_length, stride=stride, strategy=strategy,
                                              direction=self.truncation_side)
        else:
            self._tokenizer.no_truncation()
        if padding in (True, "longest"):
            if self.pad_token_id is None:
                raise ValueError("the tokenizer has no padding token")
            self._tokenizer.enable_padding(direction=self.padding_side, pad_id=self.pad_token_id,
                                           pad_type_id=self.pad_token_type_id, pad_token=self.pad_token)
        elif padding:
            raise ValueError(f"padding={padding!r}: only 'longest' is supported")
        else:
            self._tokenizer.no_padding()

    def __call__(self, texts: Sequence[str], text_pairs: Sequence[str] | None = None, *,
                 truncation: bool | str = False, max_length: int | None = None, padding: bool | str = False,
                 return_tensors: str | None = None, add_special_tokens: bool = True, return_length: bool = False,
                 stride: int = 0, return_overflowing_tokens: bool = False,
                 return_offsets_mapping: bool = False) -> dict[str, Any]:
        """Encode a batch as a transformers fast tokenizer called with the same arguments does."""
        self._settings(truncation, max_length, stride, padding)
        inputs = list(zip(texts, text_pairs)) if text_pairs is not None else list(texts)
        encodings = self._tokenizer.encode_batch(inputs, add_special_tokens=add_special_tokens)
        rows, owners = [], []
        for sample, encoding in enumerate(encodings):
            for row in [encoding, *encoding.overflowing] if return_overflowing_tokens else [encoding]:
                rows.append(row)
                owners.append(sample)
        fields = {"input_ids": lambda e: e.ids, "token_type_ids": lambda e: e.type_ids,
                  "attention_mask": lambda e: e.attention_mask}
        out: dict[str, Any] = {name: [fields[name](e) for e in rows] for name in self.inputs}
        if return_offsets_mapping:
            out["offset_mapping"] = [e.offsets for e in rows]
        if return_length:
            out["length"] = [len(e.ids) for e in rows]
        if return_overflowing_tokens:
            out["overflow_to_sample_mapping"] = owners
        return _tensors(out, return_tensors)

    def pad(self, features: dict[str, list[list[int]]], padding: bool | str = "longest",
            return_tensors: str | None = None) -> dict[str, Any]:
        """Rows of already encoded features padded to the longest (the padding side and values of ``__call__``)."""
        if padding not in (True, "longest"):
            raise ValueError(f"padding={padding!r}: only 'longest' is supported")
        values = {"input_ids": self.pad_token_id, "token_type_ids": self.pad_token_type_id, "attention_mask": 0}
        out = {}
        for name, rows in features.items():
            width = max((len(r) for r in rows), default=0)
            fill = values[name]
            out[name] = [list(r) + [fill] * (width - len(r)) if self.padding_side == "right"
                         else [fill] * (width - len(r)) + list(r) for r in rows]
        return _tensors(out, return_tensors)


def _tensors(out: dict[str, Any], return_tensors: str | None) -> dict[str, Any]:
    if return_tensors is None:
        return out
    if return_tensors != "np":  # the torch backend reads texts with transformers
        raise ValueError(f"return_tensors={return_tensors!r}: only 'np' is supported")
    return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}
