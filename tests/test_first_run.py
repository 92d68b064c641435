"""Issue 14: a newcomer's first run of `openlora up` and the CLI, as a person types it."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from services.common.harness import wait_until
from services.registry.admin import source_uri
from tests.servers import free_port_block, health

CLI = [sys.executable, "-m", "services.cli"]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, flag", [
    (["generate", "--max-new-tokens", "-5", "hi"], "--max-new-tokens"),
    (["generate", "--adapter", "team/sql@x", "hi"], "--adapter"),
    (["generate", "--adapter", "team/sql@0", "hi"], "--adapter"),
    (["bench", "--requests", "0"], "--requests"),
    (["bench", "--concurrency", "0"], "--concurrency"),
    (["bench", "--max-new-tokens", "-1"], "--max-new-tokens"),
])
def test_bad_client_flags_are_one_line_and_exit_2(args, flag):
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in proc.stderr


def test_every_client_flag_has_help():
    for cmd in (["generate"], ["bench"], ["adapters", "add"], ["adapters", "list"], ["adapters", "rm"],
                ["up"]):
        out = _cli(*cmd, "--help").stdout
        import re
        # argparse lists each option on its own line; one without help has nothing after its name
        for line in out.splitlines():
            m = re.match(r"^  (-{1,2}[\w-]+(?: [A-Z_{},.\[\]]+)?)\s*$", line)
            if m:
                # a long option whose help wraps to the next line is fine; find that next line
                nxt = out.splitlines()[out.splitlines().index(line) + 1]
                assert nxt.startswith(" " * 10), f"{cmd}: {m.group(1)} has no help"


def test_plain_paths_become_file_uris(tmp_path, monkeypatch):
    assert source_uri(str(tmp_path)) == f"file://{tmp_path}"
    monkeypatch.chdir(tmp_path)
    assert source_uri("./a") == f"file://{tmp_path}/a"
    assert source_uri("hf://org/name") == "hf://org/name"


def test_up_names_a_port_in_use(tmp_path):
    port = free_port_block(3)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port + 1))
        busy.listen()
        proc = _cli("up", "--port", str(port), "--data-dir", str(tmp_path / "d"), "--http-port", "0")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert f"port {port + 1}" in lines[-1] and "in use" in lines[-1] and "registry" in lines[-1]
    assert "ready on" not in proc.stderr and "Traceback" not in proc.stderr and len(lines) == 1


def test_up_names_the_service_that_died_and_its_log(tmp_path):
    port = free_port_block(3)
    proc = _cli("up", "--port", str(port), "--data-dir", str(tmp_path / "d"), "--http-port", "0",
                "--base-model", str(tmp_path / "no-such-model"), timeout=180)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    log = tmp_path / "d" / "logs" / "executor-0.log"
    assert "executor-0" in last and str(log) in last and "no such directory" in last
    assert "Traceback" not in proc.stderr           # (the registry starts beside it: ready or not yet)
    assert health(f"127.0.0.1:{port + 1}") is None     # the registry was stopped too


def _wait_for(up: subprocess.Popen, log_path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log_path.read_text():
        assert up.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.1)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_up_stops_at_once_on_a_signal_during_start_up(tmp_path, sig, code):
    port = free_port_block(3)
    err = tmp_path / "up.err"
    up = subprocess.Popen([*CLI, "up", "--port", str(port), "--data-dir", str(tmp_path / "d"),
                           "--http-port", "0"], stdout=subprocess.DEVNULL, stderr=open(err, "wb"))
    _wait_for(up, err, "writing the demo model", 60)
    up.send_signal(sig)
    assert up.wait(timeout=60) == code, err.read_text()       # stopped, not done writing it first
    text = err.read_text()
    assert "Traceback" not in text and "stopping" in text.strip().splitlines()[-1]
    # the write is atomic: either no demo model (an interrupted write leaves only its temp dir, which
    # is removed), or, when it finished before the signal landed, a whole one
    d = tmp_path / "d"
    assert not list(d.glob(".demo-model.*"))
    model = d / "demo-model"
    if model.exists():
        assert (model / "config.json").is_file() and (model / "tokenizer.json").is_file()


@pytest.mark.slow
def test_up_demo_model_demo_adapters_and_ctrl_c(tmp_path):
    """The first minute: `up` with no flags, `generate --adapter demo/...`, Ctrl-C."""
    port = free_port_block(3)
    data = tmp_path / "d"
    (data / "demo-model").mkdir(parents=True)          # a half-written one from an older crash
    (data / "demo-model" / "config.json").write_text("{}")
    err = tmp_path / "up.err"
    up = subprocess.Popen([*CLI, "up", "--port", str(port), "--data-dir", str(data), "--http-port", "0"],
                          stdout=subprocess.DEVNULL, stderr=open(err, "wb"))
    router = f"127.0.0.1:{port}"
    try:
        _wait_for(up, err, "openlora up: ready", 600)
        text = err.read_text()
        assert "half-written demo model" in text and "registered demo adapters demo/" in text
        assert f"try: openlora generate --router {router} --adapter demo/" in text
        for name in ("registry", "executor-0", "router"):
            assert f"{name} ready on" in text
        base = _cli("generate", "--router", router, "--max-new-tokens", "8", "Hello")
        tuned = _cli("generate", "--router", router, "--adapter", "demo/pirate", "--max-new-tokens",
                     "8", "Hello")
        pinned = _cli("generate", "--router", router, "--adapter", "demo/pirate@1",
                      "--max-new-tokens", "8", "Hello")
        absent = _cli("generate", "--router", router, "--adapter", "demo/pirate@9", "Hello")
        assert base.returncode == tuned.returncode == pinned.returncode == 0, tuned.stderr
        assert tuned.stdout == pinned.stdout and tuned.stdout != base.stdout
        assert absent.returncode == 1 and "NOT_FOUND" in absent.stderr
        # every log line is one JSON record saying which service wrote it
        for name in ("registry", "executor-0", "router"):
            for line in (data / "logs" / f"{name}.log").read_text().splitlines():
                if line.startswith("{"):
                    assert "service" in json.loads(line), line
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=60)
    assert code == 0 and "Traceback" not in err.read_text()
    assert health(router) is None


def test_the_kernel_cache_key_covers_everything_that_changes_the_binary(tmp_path, monkeypatch):
    from services.executor.ops import build
    sources = build.CPU_SOURCES
    base = build.build_key(sources, (build.CFLAGS,))
    assert build.build_key(sources, (build.CFLAGS,)) == base
    assert build.build_key(sources, (["-O2"],)) != base                       # flags
    copies = []
    for src in sources:                                                        # another checkout
        (tmp_path / src.name).write_bytes(src.read_bytes())
        copies.append(tmp_path / src.name)
    assert build.build_key(copies, (build.CFLAGS,)) != base
    monkeypatch.setattr(sys, "executable", "/other/venv/bin/python")          # another interpreter
    assert build.build_key(sources, (build.CFLAGS,)) != base
    monkeypatch.undo()
    monkeypatch.setattr(build.torch, "__version__", "0.0.1")                   # another torch
    assert build.build_key(sources, (build.CFLAGS,)) != base


@pytest.mark.slow
@pytest.mark.compile
def test_a_kernel_build_announces_itself_with_its_expected_duration(tmp_path):
    code = ("from services.common.logging import configure_logging; configure_logging(); "
            "from services.executor.ops import build; build.build()")
    env = {**os.environ, "OPENLORA_BUILD_DIR": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                           timeout=900)
    assert first.returncode == 0, first.stderr
    records = [json.loads(line) for line in first.stderr.splitlines() if line.startswith("{")]
    events = [r["event"] for r in records]
    assert events.index("kernel_build_started") < events.index("kernel_build_done")
    started = records[events.index("kernel_build_started")]
    assert started["expected_seconds"] and str(tmp_path) in started["directory"]
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                           timeout=300)
    assert again.returncode == 0 and "kernel_build_started" not in again.stderr


def test_adapters_add_refuses_an_adapter_for_another_base_model(tmp_path, llama_dir):
    from services.synthetic import AdapterSpec, ModelSpec, write_adapter
    from tests.conftest import TINY
    from tests.servers import Service
    fits = write_adapter(tmp_path / "fits", TINY["llama"], AdapterSpec(seed=5))
    other = write_adapter(tmp_path / "other", ModelSpec(hidden=96, heads=4, kv_heads=2), AdapterSpec(seed=6))
    deep = write_adapter(tmp_path / "deep", ModelSpec(**{**TINY["llama"].__dict__, "layers": 9}),
                         AdapterSpec(seed=7))
    registry = Service("registry", "--data-dir", str(tmp_path / "reg"), "--base-model", str(llama_dir),
                       log_path=tmp_path / "registry.log").start()
    try:
        ok = _cli("adapters", "add", "t/fits", str(fits), "--registry", registry.address)   # plain path
        assert ok.returncode == 0, ok.stderr
        for name, path in (("t/other", other), ("t/deep", deep)):
            bad = _cli("adapters", "add", name, str(path), "--registry", registry.address)
            assert bad.returncode == 1 and "FAILED_PRECONDITION" in bad.stderr, bad.stderr
            assert "does not fit the base model" in bad.stderr and str(llama_dir) in bad.stderr
    finally:
        registry.stop()


def test_registry_base_model_flag_needs_a_model_config(tmp_path):
    proc = _cli("registry", "--data-dir", str(tmp_path / "r"), "--base-model", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "--base-model" in proc.stderr


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention `text` (a compiler building into a directory)."""
    found = []
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


@pytest.mark.slow
@pytest.mark.compile
def test_ctrl_c_during_the_kernel_build_stops_everything(tmp_path):
    """Ctrl-C while the executor compiles its kernels used to reach the compiler too: the executor
    fell back to the slow reference ops (three tracebacks) and then served. Now `up` alone gets it
    and stops the executor with its compiler: 130, no traceback, no compiler left behind."""
    port = free_port_block(3)
    build_dir = tmp_path / "kernels"
    data = tmp_path / "d"
    err = tmp_path / "up.err"
    up = subprocess.Popen([*CLI, "up", "--port", str(port), "--data-dir", str(data), "--http-port", "0"],
                          stdout=subprocess.DEVNULL, stderr=open(err, "wb"), start_new_session=True,
                          env={**os.environ, "OPENLORA_BUILD_DIR": str(build_dir)})
    log = data / "logs" / "executor-0.log"
    try:
        # the build is said on up's own terminal, with its expected duration (not only in a log)
        _wait_for(up, err, "executor-0 is compiling the C++ kernels", 300)
        assert "expected 20-180 s" in err.read_text()
        assert wait_until(lambda: _processes_mentioning(str(build_dir)), 120), "no compiler running"
        os.killpg(up.pid, signal.SIGINT)                 # as a terminal's Ctrl-C: the whole group
        assert up.wait(timeout=120) == 130, err.read_text()
    finally:
        if up.poll() is None:
            up.kill()
    text = err.read_text()
    assert "Traceback" not in text and "stopping (Ctrl-C)" in text.strip().splitlines()[-1]
    executor_log = log.read_text()
    assert "Traceback" not in executor_log and "executor_serving" not in executor_log
    for line in executor_log.splitlines():          # the build's records too: JSON, with the service
        assert json.loads(line)["service"] == "executor-0", line
    assert "reference" not in executor_log.split("kernel_build_started", 1)[1], executor_log
    assert wait_until(lambda: not _processes_mentioning(str(build_dir)), 30), _processes_mentioning(str(build_dir))


def test_every_server_flag_has_help():
    """Each service's config dataclass field is a flag; every one says what it does."""
    import dataclasses

    from services.cli import SERVERS
    from services.up import UpConfig
    for config in [*(c for c, _ in SERVERS.values()), UpConfig]:
        for f in dataclasses.fields(config):
            if "help" in f.metadata:
                assert f.metadata["help"].strip(), f"{config.__name__}.{f.name} has no help"
        out = _cli(*(["up"] if config is UpConfig else
                     [k for k, (c, _) in SERVERS.items() if c is config]), "--help").stdout
        assert "--port" in out


@pytest.mark.slow
def test_up_sees_a_slow_service_within_a_second_of_it_serving():
    """`up` used to wait another 10-26 s after a slow executor start (gRPC's reconnect backoff had
    grown while it was loading) before it started the router."""
    import asyncio
    import threading

    from services.common.config import ServerConfig
    from services.common.server import create_server
    from services.up import Proc, wait_serving
    port = free_port_block(1)
    served = {}

    def serve_later():
        async def run():
            time.sleep(12)                             # a slow start: the model loading
            server, _ = await create_server(ServerConfig(host="127.0.0.1", port=port), [])
            await server.start()
            served["at"] = time.monotonic()
            await asyncio.sleep(20)
            await server.stop(0)
        asyncio.run(run())

    thread = threading.Thread(target=serve_later, daemon=True)
    thread.start()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        wait_serving(Proc("executor-0", f"127.0.0.1:{port}", sleeper, pathlib.Path("/dev/null")), 60,
                     [])
        seen = time.monotonic()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert seen - served["at"] < 2.5, f"saw it serving {seen - served['at']:.1f}s late"


def test_readme_first_run_commands_exist():
    """The README's commands are `.venv/bin/openlora ...` (what its set-up command installs; bare
    `openlora` is not on PATH without activating the venv), each a real subcommand taking the flags
    the README gives it."""
    import re
    import tomllib

    from tests.readme import blocks
    root = pathlib.Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["openlora"] == "services.cli:main"
    commands = [line for b in blocks() for line in b.commands if line.startswith(".venv/bin/openlora")]
    assert any(c.split()[1] == "up" for c in commands) and any("demo/" in c for c in commands)
    assert not any(re.match(r"openlora ", line) for b in blocks() for line in b.commands), \
        "bare `openlora` in the README"
    helps: dict[tuple[str, ...], str] = {}
    for command in commands:
        words = command.split("#")[0].split()
        sub = tuple(words[1:3] if words[1] == "adapters" else words[1:2])
        if sub not in helps:
            proc = _cli(*sub, "--help")
            assert proc.returncode == 0, (command, proc.stderr)
            helps[sub] = proc.stdout
        for flag in re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", command):
            assert flag in helps[sub], f"{command}: {flag} is not a flag of openlora {' '.join(sub)}"


def test_the_default_data_dir_is_ignored_by_git():
    """`openlora up` in a clone writes ./openlora-data (the demo model, logs, caches): git status
    must not offer it for a commit."""
    from services.up import UpConfig
    root = pathlib.Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    default = UpConfig().data_dir
    proc = subprocess.run(["git", "check-ignore", "-q", f"{default}/demo-model/config.json"], cwd=root)
    assert proc.returncode == 0, f"{default} is not in .gitignore"


def test_up_hints_name_the_command_as_the_person_can_run_it(tmp_path, monkeypatch):
    """`up` said "try: openlora generate ..." to someone who ran .venv/bin/openlora (bare `openlora`
    is not on PATH without activating the venv), and without --router when --port was not 50050."""
    from services import up
    script = tmp_path / "venv" / "bin" / "openlora"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(script), "up"])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert up.command_name() == str(script)
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")
    assert up.command_name() == "openlora"
    monkeypatch.setattr(sys, "argv", ["/x/services/cli.py", "up"])
    assert up.command_name() == "openlora"
    log = tmp_path / "executor-0.log"
    log.write_text('{"event": "executor_loading"}\n{"event": "kernel_build_started", '
                   '"expected_seconds": "20-180"}\n{"event": "kernel_bu')
    line, offset = up.build_announcement(log, 0)
    assert "compiling the C++ kernels" in line and "expected 20-180 s" in line
    assert offset == log.read_text().rindex("\n") + 1          # the partial last line is read again


def test_up_port_probe_treats_time_wait_as_free_and_a_listener_as_taken():
    """`up` refused to restart for a minute after Ctrl-C: its probe bound without SO_REUSEADDR and
    tripped on the last run's connections in TIME_WAIT. Such a port is free; a live listener is not."""
    from services.up import UpFailed, check_ports
    port = free_port_block(1)
    listener = socket.create_server(("127.0.0.1", port))
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    served.close()                       # the server side closes first: its end goes to TIME_WAIT
    client.close()
    with pytest.raises(UpFailed, match=f"port {port} .* in use"):
        check_ports("127.0.0.1", {port: "router"})
    listener.close()
    check_ports("127.0.0.1", {port: "router"})     # the TIME_WAIT socket alone: free


def test_up_announces_only_this_runs_kernel_build(tmp_path):
    """Every warm `up` said it was compiling the kernels: the log is appended to, and the last run's
    kernel_build_started record was read as this run's. Only lines after this run's start count."""
    from services.up import build_announcement
    log = tmp_path / "executor-0.log"
    log.write_text(json.dumps({"event": "kernel_build_started", "expected_seconds": "20-180"}) + "\n")
    start = log.stat().st_size
    assert build_announcement(log, 0)[0] is not None
    with open(log, "a") as f:
        f.write(json.dumps({"event": "kernels_loaded"}) + "\n")
    line, offset = build_announcement(log, start)
    assert line is None and offset == log.stat().st_size


def test_adapters_json_gives_64_bit_numbers_as_numbers():
    """`adapters list --json` printed size_bytes as "12345" (protobuf's JSON mapping of 64-bit
    integers): scripts comparing sizes compared text."""
    from services.common.gen.openlora.v1 import registry_pb2 as pb
    from services.registry.admin import _as_dict
    a = pb.Adapter(adapter_id="t/a", version=2, size_bytes=2**40, labels={"k": "v"},
                   files=[pb.AdapterFile(name="adapter_config.json", size_bytes=7, sha256="ab")])
    out = json.loads(json.dumps(_as_dict(a)))
    assert out["size_bytes"] == 2**40 and out["files"][0]["size_bytes"] == 7 and out["version"] == 2
    assert out["labels"] == {"k": "v"}


def test_the_supervisor_restarts_with_backoff_and_gives_up_after_max_restarts(tmp_path, capsys):
    """Without servers: a service that keeps exiting is restarted after 1, 2, ... s (scaled down
    here), says so each time with its log's last line, and --max-restarts exits in a row stop `up`."""
    from services import up
    log = tmp_path / "registry.log"
    cmd = [sys.executable, "-c", "print('cannot open the database'); raise SystemExit(3)"]
    popen, start = up._launch("registry", cmd, log)
    proc = up.Proc("registry", "127.0.0.1:1", popen, log, ready=True, log_start=start, cmd=cmd,
                   started_at=time.monotonic(), ready_at=time.monotonic())
    args = up.UpConfig(max_restarts=2)
    sup = up.Supervisor([proc], args)
    sup.DELAYS_S = (0.05, 0.1)
    deadline = time.monotonic() + 60
    with pytest.raises(up.UpFailed) as failed:
        while time.monotonic() < deadline:
            sup.tend(proc, time.monotonic())
            time.sleep(0.01)
    assert proc.restarts == 2 and "exited with code 3, 3 times in a row (--max-restarts 2)" in str(failed.value)
    assert "last line: cannot open the database" in str(failed.value)
    said = capsys.readouterr().err
    assert said.count("exited with code 3") == 2 and "restarting it in" in said and "the others keep serving" in said


def test_event_loop_flag_picks_the_loop_and_refuses_others(tmp_path):
    """--event-loop: auto is uvloop where installed (a dependency here), asyncio is asyncio's own
    loop; a server answers on either; an unknown loop is a one-line flag error."""
    import uvloop

    from services.cli import event_loop_factory
    from services.common.harness import Service
    assert event_loop_factory("auto") is uvloop.new_event_loop
    assert event_loop_factory("uvloop") is uvloop.new_event_loop
    assert event_loop_factory("asyncio") is None
    for loop in ("asyncio", "uvloop"):
        registry = Service("registry", "--data-dir", str(tmp_path / loop), "--event-loop", loop,
                           log_path=tmp_path / f"{loop}.log").start(timeout=60)
        try:
            from grpc_health.v1 import health_pb2
            assert health(registry.address) == health_pb2.HealthCheckResponse.SERVING
        finally:
            registry.stop()
    proc = _cli("registry", "--event-loop", "trio", "--data-dir", str(tmp_path))
    assert proc.returncode == 2 and "--event-loop" in proc.stderr and "Traceback" not in proc.stderr
