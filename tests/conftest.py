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


# --- registry storage backends: SQLite + files, PostgreSQL + S3 (real servers, see backends.py) ---

@pytest.fixture(scope="session")
def pg_server():
    from tests.backends import PostgresServer, postgres_bindir
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl; `.ci/run` installs Debian's "
                    "postgresql)")
    server = PostgresServer(bindir).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server():
    import os
    from tests.backends import S3Server
    server = S3Server().start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)              # in-process registries and boto3 clients use it
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


class Backend:
    """One registry storage pair; `config()` gives fresh stores (a new database and bucket)."""

    def __init__(self, name: str, pg=None, s3=None):
        self.name, self.pg, self.s3 = name, pg, s3
        self.env = dict(s3.env) if s3 else {}

    def config(self) -> dict:
        if self.pg is None:
            return {}
        return {"metadata_url": self.pg.new_database(), "blob_url": f"s3://{self.s3.new_bucket()}/blobs"}

    @staticmethod
    def args(config: dict) -> list[str]:
        return [a for k, v in config.items() for a in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(params=["sqlite-files", "postgres-s3"])
def backend(request) -> Backend:
    if request.param == "sqlite-files":
        return Backend(request.param)
    return Backend(request.param, request.getfixturevalue("pg_server"),
                   request.getfixturevalue("s3_server"))
