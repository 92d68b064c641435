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


# The suite by risk. The quick loop, `python -m pytest -m "not slow"` (README, "Tests"), skips what
# takes minutes: whole deployments, real PostgreSQL/S3 servers (the `backend` fixture's postgres-s3
# case too), compiles from scratch, and the kernel sweeps' cases beyond a pairwise cover (every value
# of every parameter, and every pair of two parameters' values, in at least one case kept: marked
# `sweep` otherwise). The plain `python -m pytest` (what .ci/run calls) runs everything; `-m sweep`
# runs the rest of the sweeps alone. Tests that assert a wall-clock bound are marked `timing` and run
# again (up to TIMING_RUNS times) when they fail: a loaded machine is slow, not wrong, once. A test
# waits for an event with a generous deadline rather than asserting elapsed time wherever it can: the
# set below is what a deadline cannot say (fail fast, within a second, back within 30 s).
SLOW_MODULES = {"test_e2e", "test_gateway", "test_auth_e2e", "test_registry_storage",
                "test_registry_process", "test_engine_oracle", "test_disk_tier", "test_residency"}
COMPILE_MODULES = {"test_cuda_build", "test_cuda_emulation"}
SWEEP_MODULES = {"test_paged_attention", "test_kernel", "test_packed_weights", "test_layer_ops",
                 "test_lora_paged", "test_kv_cache"}
# fixtures that start a deployment or a real PostgreSQL / S3 server: a test using one is slow
SLOW_FIXTURES = {"cluster", "pg_server", "s3_server", "iam_s3"}
SLOW_PARAMS = {("backend", "postgres-s3")}
# whole deployments whose area the quick loop covers otherwise (module::name[params]): the other
# family's chat through the gateway, and the merge oracle tests in process, keep it meaningful; and
# checks of ten seconds or more whose area quick tests cover too: speculation's 20,000-seed
# distribution test (its greedy and seeded identity tests stay), the op-coverage census (one engine
# per family, form and quantization), the suite's own shape run through pytest subprocesses
SLOW_TESTS = {
    "test_families::test_family_chat_through_registry_router_and_gateway[qwen3_moe]",
    "test_merge::test_merged_adapters_through_router_and_gateway",
    "test_spec_decode::test_verification_keeps_the_distribution_at_each_position",
    "test_op_coverage::test_every_registered_op_is_called_by_an_engine_on_cpu_or_on_the_cuda_path",
    "test_suite_shape::test_the_quick_loop_skips_postgres_and_s3_reached_through_the_backend_fixture",
    "test_suite_shape::test_a_timing_test_that_fails_once_runs_again_and_passes",
}
# tests whose assertions include a wall-clock bound (module::name), rerun when they fail
TIMING_TESTS = {
    "test_first_run::test_up_sees_a_slow_service_within_a_second_of_it_serving",
    "test_hub_offline::test_hf_source_without_network_fails_fast_and_logs_json_only",
    "test_hub_offline::test_hub_base_model_without_network_fails_fast",
    "test_registry_storage::test_watch_sees_registration_and_deletion_within_a_second",
    "test_registry_storage::test_on_demand_unreachable_source_is_unavailable_within_the_deadline",
    "test_readme::test_every_readme_block_runs_against_a_fresh_up_and_up_restarts_at_once",
    "test_up_supervision::test_up_restarts_a_killed_registry_or_executor_while_the_rest_keeps_serving",
}
TIMING_RUNS = 3


def pairwise_cover(cases: list[dict[str, str]]) -> list[int]:
    """Indices of a subset of `cases` (each {parameter: value}) holding every value of each parameter
    and every pair of values of two parameters that some case holds; greedy, in order, deterministic."""
    def pairs(case: dict[str, str]) -> set:
        keys = sorted(case)
        return {((k, case[k]),) for k in keys} | \
            {((a, case[a]), (b, case[b])) for i, a in enumerate(keys) for b in keys[i + 1:]}
    wanted = set().union(*map(pairs, cases)) if cases else set()
    kept: list[int] = []
    covering = [pairs(c) for c in cases]
    while wanted:
        best = max(range(len(cases)), key=lambda i: (len(covering[i] & wanted), -i))
        kept.append(best)
        wanted -= covering[best]
    return sorted(kept) or list(range(len(cases)))[:1]


def _name(item) -> str:
    return f"{item.module.__name__.rsplit('.', 1)[-1]}::{item.originalname}"


def pytest_collection_modifyitems(config, items):
    sweeps: dict[str, list] = {}
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        params = getattr(getattr(item, "callspec", None), "params", {})
        if _name(item) in TIMING_TESTS:
            item.add_marker(pytest.mark.timing)
        if module in COMPILE_MODULES:
            item.add_marker(pytest.mark.compile)
            item.add_marker(pytest.mark.slow)
        elif module in SLOW_MODULES or f"{module}::{item.name}" in SLOW_TESTS \
                or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) \
                or any((k, v) in SLOW_PARAMS for k, v in params.items() if isinstance(v, str)):
            item.add_marker(pytest.mark.slow)
        elif module in SWEEP_MODULES and params:
            sweeps.setdefault(_name(item), []).append(item)
    for group in sweeps.values():
        keep = set(pairwise_cover([{k: repr(v) for k, v in i.callspec.params.items()} for i in group]))
        for index, item in enumerate(group):
            if index not in keep:
                item.add_marker(pytest.mark.sweep)
                item.add_marker(pytest.mark.slow)


def pytest_runtest_protocol(item, nextitem):
    """A `timing` test that fails runs again, up to TIMING_RUNS times; the last run's reports count."""
    if item.get_closest_marker("timing") is None:
        return None
    from _pytest.runner import runtestprotocol
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for attempt in range(1, TIMING_RUNS + 1):
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
        if not any(r.failed for r in reports) or attempt == TIMING_RUNS:
            break
        reporter = item.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"{item.nodeid}: failed a wall-clock bound on run {attempt}, running it again")
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


@pytest.fixture(scope="session", autouse=True)
def _kernels_built(request):
    """Importing services.executor.ops builds nothing (the engine builds the kernels at start-up); a
    session whose tests import it, and call its ops directly, gets them built once here, said on the
    terminal with the time a first build takes (else minutes of silence)."""
    import sys
    import time
    ops = sys.modules.get("services.executor.ops")
    if ops is None:
        return
    import contextlib

    from services.executor.ops import build
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def say(line: str) -> None:
        if reporter is not None:
            with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
                reporter.write_line(line)
    low, high = build.EXPECTED_BUILD_S
    say(f"loading the C++ kernels (a first build for this checkout compiles them: {low}-{high} s; "
        f"then cached in {build.build_dir()})")
    t0 = time.monotonic()
    ops.ensure_built()
    if time.monotonic() - t0 > 5:
        say(f"kernels built in {time.monotonic() - t0:.0f} s")
