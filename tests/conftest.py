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


# The quick loop, `python -m pytest -m "not slow"` (README, "Tests"), skips what takes
# minutes: whole deployments and real PostgreSQL/S3 servers, compiles from scratch, and every
# parameter combination of the kernel sweeps but the first of each test (which still runs each
# test's code path once). The plain `python -m pytest` (what .ci/run calls) runs everything.
SLOW_MODULES = {"test_e2e", "test_gateway", "test_auth_e2e", "test_registry_storage",
                "test_registry_process", "test_engine_oracle", "test_disk_tier", "test_residency"}
COMPILE_MODULES = {"test_cuda_build", "test_cuda_emulation"}
SWEEP_MODULES = {"test_paged_attention", "test_kernel", "test_packed_weights", "test_layer_ops",
                 "test_lora_paged", "test_kv_cache"}
# fixtures that start a deployment or a real PostgreSQL / S3 server: a test using one is slow
SLOW_FIXTURES = {"cluster", "pg_server", "s3_server", "iam_s3"}


def pytest_collection_modifyitems(config, items):
    first_of_sweep: set[tuple[str, str]] = set()
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in COMPILE_MODULES:
            item.add_marker(pytest.mark.compile)
            item.add_marker(pytest.mark.slow)
        elif module in SLOW_MODULES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        elif module in SWEEP_MODULES and hasattr(item, "callspec"):
            key = (module, item.originalname)
            if key in first_of_sweep:
                item.add_marker(pytest.mark.slow)
            first_of_sweep.add(key)


@pytest.fixture(scope="session", autouse=True)
def _kernels_built():
    """Importing services.executor.ops builds nothing (the engine builds the kernels at start-up); a
    session whose tests import it, and call its ops directly, gets them built once here."""
    import sys
    ops = sys.modules.get("services.executor.ops")
    if ops is not None:
        ops.ensure_built()
