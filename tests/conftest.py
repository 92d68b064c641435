"""Shared fixtures: tiny random Llama-family model directories and PEFT adapters, written as files.

Fixtures specific to one area live in that area's test modules.
"""

from __future__ import annotations

import pathlib

import pytest

from services.synthetic import ALL_MODULES, AdapterSpec, ModelSpec, write_adapter, write_model

TINY = {
    "llama": ModelSpec(arch="llama", seed=11),
    "mistral": ModelSpec(arch="mistral", seed=12, tie_embeddings=True),
    "qwen2": ModelSpec(arch="qwen2", seed=13),
}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
    """arch -> a tiny random Hugging Face model directory (config, safetensors, tokenizer)."""
    root = tmp_path_factory.mktemp("models")
    return {arch: write_model(root / arch, spec) for arch, spec in TINY.items()}


@pytest.fixture(scope="session")
def llama_dir(model_dirs) -> pathlib.Path:
    return model_dirs["llama"]


@pytest.fixture
def make_adapter(tmp_path):
    """make_adapter(arch="llama", **AdapterSpec fields) -> a PEFT adapter directory."""
    counter = iter(range(10_000))

    def make(arch: str = "llama", **fields) -> pathlib.Path:
        spec = AdapterSpec(**{"seed": 100 + next(counter), **fields})
        return write_adapter(tmp_path / f"adapter-{arch}-{spec.seed}", TINY[arch], spec)

    return make


__all__ = ["ALL_MODULES", "TINY"]
