"""Service settings, read once from ``TUNESERVE_*`` environment variables into one typed object."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import ConfigError

DEFAULT_MODEL = "sentiment-lora-onnx:latest"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNESERVE_", extra="ignore", protected_namespaces=())

    backend: Literal["auto", "onnx", "onnx-int8", "onnx-shared", "torch"] = Field(
        "auto", description="auto: torch on CUDA when torch and a GPU are present, else (several models over one "
                            "base) the base graph they share, else ONNX int8 if the artifact kept it, else ONNX fp32.")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="Device of the torch backend.")
    model: str = Field(DEFAULT_MODEL, description="Tag of the model in the BentoML store (name:version).")
    artifact: Path | None = Field(None, description="Serve this artifact directory instead of a store model.")
    models: str | None = Field(
        None, description="Serve several models in one process: a comma-separated list of store tags or artifact "
                          "directories (NAME=SOURCE names one), or one directory whose sub-directories are artifacts. "
                          "Each request names its model in its `model` field (service/models.py).")
    max_models: int = Field(
        64, ge=1, description="Most models one process serves (TUNESERVE_MODELS and those added while serving): each "
                              "costs memory, about 4 MB over a shared base and 70 MB as a merged int8 graph of MiniLM "
                              "(BENCHMARKS.md, model sets).")
    threads: int | None = Field(None, ge=1, description="Intra-op threads; default: the CPU cores this process may use.")
    max_batch_size: int = Field(32, ge=1, le=1024,
                                description="Most texts that concurrent requests pool into one turn at the model.")
    turn_tokens: int | None = Field(
        None, ge=1, description="Tokens (estimated from characters) one turn at the model may hold; default: the "
                                "model's max_length, one full-length text (or many short ones). A larger request is "
                                "split into turns that alternate with other requests', and requests of one turn run "
                                "beside a large request's turn, so a small request does not wait for a large one "
                                "(BENCHMARKS.md, fairness).")
    forward_batch_size: int = Field(
        8, ge=1, le=1024, description="Texts per forward pass: a pooled turn runs sorted by length in passes of this "
                                      "many, so short texts are not padded to the longest (measured in BENCHMARKS.md).")
    max_texts: int = Field(256, ge=1, description="Most texts in one /predict request.")
    max_chars: int = Field(20_000, ge=1, description="Longest text, in characters.")
    max_examples: int = Field(10_000, ge=1, description="Most examples in one /evaluate request.")
    max_parted_examples: int = Field(
        100_000, ge=1, description="Most examples one evaluation posted in parts may hold over all its parts (the "
                                   "service keeps their targets and the model's outputs until the last part).")
    max_new_tokens: int = Field(
        512, ge=1, description="Generation: the most tokens one /generate request may ask for per prompt (each model "
                               "also caps it at 4 times the default it was evaluated with).")
    max_corpus: int = Field(
        2_000, ge=1, description="Embedding models: the most distinct documents one /evaluate ranks (every query "
                                 "against every document: time and memory grow with their product).")
    max_request_tokens: int = Field(
        8192, ge=1, description="Generation: the most tokens one /generate or /evaluate request may cost: its prompt "
                                "tokens plus max_new_tokens per prompt; a larger request gets 400 saying how many "
                                "prompts fit.")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body, in bytes (413 above).")
    timeout: float = Field(60.0, gt=0, description="Seconds a request may take before it gets 504.")
    max_concurrency: int | None = Field(None, ge=1, description="Requests served at once; more get 429 (probes exempt).")
    access_log: bool = Field(True, description="Log one line per request (BentoML's access log).")
    api_key: SecretStr | None = Field(None, description="When set, API routes need 'Authorization: Bearer <key>'.")


def load_settings() -> Settings:
    """Read the settings; an invalid variable raises ConfigError naming it and what it accepts."""
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "TUNESERVE_" + str(first["loc"][0]).upper() if first["loc"] else "TUNESERVE_*"
        raise ConfigError(f"{name}: {first['msg']}") from None
