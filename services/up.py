"""`openlora up`: a whole deployment on one machine — registry, N executors and a router, which also
serves the OpenAI-compatible HTTP API on --http-port (one hop from the executors).

Ports: the router on --port (the one clients use), the registry on --port+1, executors on
--port+2 ... With no --base-model it serves a small built-in demo model with random weights, written
under --data-dir on first start (so it runs on a machine with no network), and registers a few demo
adapters for it under `demo/`. Each service logs to --data-dir/logs/NAME.log (JSON lines, each with
a `service` field); `up` itself prints one line per service as it becomes ready. Once ready, it
supervises them: one that exits is started again with backoff while the others keep serving (the
router fails over to the other executors; executors serve resident adapters while the registry is
away), said in one line each time; `up` stops on Ctrl-C/SIGTERM, or when a service cannot start.

Security: --tls-cert/--tls-key (and --tls-ca: mutual TLS) are given to every service, so each serves
TLS (the HTTP API HTTPS) and calls the others over TLS; `up`'s own health checks and demo-adapter
registration use them too. --auth-file turns auth on everywhere; --token (env OPENLORA_TOKEN, passed
to the services in their environment, never on a command line) is what the services and `up` send:
with an auth file, an admin token.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import grpc

from services.common import harness
from services.common.config import check, flag, parse_config

DEMO = "demo-model"
# every file a finished demo model has; one missing means an interrupted write (rewritten)
DEMO_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
DEMO_VOCAB_TARGET = 1024           # the demo tokenizer's BPE target; it stops at the corpus's size
# the demo adapters `up` registers for the demo model: id -> seed (non-zero B: each changes output)
DEMO_ADAPTERS = {"demo/pirate": 11, "demo/poet": 12, "demo/sql": 13}
# services still starting when `up` is stopped get this long after SIGTERM before SIGKILL
STARTING_GRACE_S = 5.0
READY_GRACE_S = 30.0


@dataclass(slots=True)
class UpConfig:
    host: str = flag("127.0.0.1", "address every service listens on")
    port: int = flag(50050, "router port; the registry and executors take the next ones")
    data_dir: str = flag("./openlora-data", "registry data, executor disk caches, the demo model")
    base_model: str = flag("", "base model directory or hub id (empty -> the built-in demo model)")
    executors: int = flag(1, "how many executors")
    startup_timeout_s: float = flag(600.0, "how long each service may take to answer SERVING")
    http_port: int = flag(8000, "the OpenAI-compatible HTTP API's port, served by the router (0 -> none)")
    tls_cert: str = flag("", "PEM certificate every service serves TLS with (and presents as a client)")
    tls_key: str = flag("", "PEM private key of --tls-cert")
    tls_ca: str = flag("", "PEM CA every service verifies its peers with; turns on mutual TLS")
    auth_file: str = flag("", "the token file every service checks callers against (see docs/reference.md)")
    token: str = flag("", "the token the services and `up` send (an admin token with --auth-file)")
    metrics_port: int = flag(0, "first Prometheus metrics port: the registry on it, executors on the "
                                "next ones, then the router (0 -> none)")
    allow_local_dir: list[str] = flag(help="a directory the registry's file:// sources may read "
                                           "(the demo adapters' directory is added)",
                                      multiple=True)
    max_restarts: int = flag(5, "a service that exits is restarted, with backoff; this many exits in a "
                                "row without serving a minute in between stop `up`")

    def __post_init__(self) -> None:
        check(1 <= self.executors <= 64, "executors", f"must be 1..64, got {self.executors}")
        check(0 < self.port < 65535 - self.executors - 1, "port", f"out of range: {self.port}")
        check(self.startup_timeout_s > 0, "startup_timeout_s", "must be > 0")
        check(0 <= self.http_port <= 65535, "http_port", f"must be 0..65535, got {self.http_port}")
        check(self.metrics_port == 0 or 0 < self.metrics_port < 65535 - self.executors - 1, "metrics_port",
              f"out of range: {self.metrics_port}")
        check(self.max_restarts >= 0, "max_restarts", f"must be >= 0, got {self.max_restarts}")
        check(bool(self.tls_cert) == bool(self.tls_key), "tls_cert" if not self.tls_cert else "tls_key",
              "--tls-cert and --tls-key go together")
        check(not self.tls_ca or bool(self.tls_cert), "tls_ca", "needs --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key", "tls_ca", "auth_file"):
            path = getattr(self, name)
            check(not path or os.path.isfile(path), name, f"no such file: {path}")

    def security(self):
        """How `up` itself calls the services (services.common.tls.ClientSecurity)."""
        from services.common.tls import ClientSecurity
        return ClientSecurity.from_config(self)

    def service_args(self, auth: bool = True) -> list[str]:
        """The TLS and auth flags every service gets (absolute paths: services run elsewhere); the
        gateway checks no tokens itself (auth=False)."""
        out = []
        for name in ("tls_cert", "tls_key", "tls_ca", *(("auth_file",) if auth else ())):
            if getattr(self, name):
                out += [f"--{name.replace('_', '-')}", os.path.abspath(getattr(self, name))]
        return out


class UpFailed(Exception):
    """One line saying what failed (and where its log is); `up` prints it and exits `code`."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived; raised from the signal handler so start-up stops at once."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def say(line: str) -> None:
    print(f"openlora up: {line}", file=sys.stderr, flush=True)


def demo_spec():
    from services.synthetic import ModelSpec
    return ModelSpec(arch="llama", hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4,
                     vocab=demo_vocab(), max_positions=2048, seed=0)


@functools.cache
def demo_vocab() -> int:
    """The demo tokenizer's own size (its BPE, trained on a small corpus, stops at a few hundred
    tokens): the model's vocabulary is exactly that, so no id decodes to nothing."""
    from tokenizers import Tokenizer

    from services.synthetic import write_tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(pathlib.Path(tmp), DEMO_VOCAB_TARGET)
        return Tokenizer.from_file(f"{tmp}/tokenizer.json").get_vocab_size()


def invisible_token_ids(tokenizer_json: pathlib.Path) -> list[int]:
    """Ids that decode alone to no visible text: special tokens, control bytes, and the lone bytes of
    multi-byte characters (which decode to U+FFFD). Spaces and newlines count as visible."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_json))
    out = []
    for i in range(tok.get_vocab_size()):
        text = tok.decode([i])
        if not text or "\ufffd" in text or not text.replace("\n", " ").isprintable():
            out.append(i)
    return out


def _write_demo_model(path: pathlib.Path) -> None:
    """The demo model, whose greedy text is visible: lm_head rows of invisible tokens are zero (a
    logit of 0 never beats the best of the other random logits), but for EOS (it may end a text)."""
    from safetensors.torch import load_file, save_file

    import services.synthetic
    spec = demo_spec()
    services.synthetic.write_model(path, spec)
    weights = path / "model.safetensors"
    tensors = load_file(str(weights))
    head = tensors["lm_head.weight"]
    eos = json.loads((path / "config.json").read_text())["eos_token_id"]
    for i in invisible_token_ids(path / "tokenizer.json"):
        if i != eos:
            head[i] = 0
    save_file(tensors, str(weights), metadata={"format": "pt"})


def _demo_is_current(path: pathlib.Path) -> bool:
    """A whole demo model of this version: every file, and a vocabulary equal to its tokenizer's (an
    older one had 1024 ids for a 468-token tokenizer: most ids decoded to nothing)."""
    if not all((path / name).exists() for name in DEMO_FILES):
        return False
    try:
        return json.loads((path / "config.json").read_text())["vocab_size"] == demo_vocab()
    except (OSError, ValueError, KeyError):
        return False


def demo_model(data_dir: pathlib.Path) -> pathlib.Path:
    """The built-in demo model (random weights), written once: into a temp dir then renamed, so an
    interrupted write never leaves a half model; one left by an older version is rewritten."""
    path = data_dir / DEMO
    if path.is_dir() and _demo_is_current(path):
        return path
    if path.exists():
        missing = [name for name in DEMO_FILES if not (path / name).exists()]
        why = f"a half-written demo model (no {', '.join(missing)})" if missing else \
            "a demo model from an older version"
        say(f"{path} is {why}: writing it again")
        shutil.rmtree(path)
    say(f"writing the demo model (RANDOM weights, for trying openlora out) to {path}")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{DEMO}.", dir=data_dir))
    try:
        _write_demo_model(tmp)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def check_ports(host: str, ports: dict[int, str]) -> None:
    """Each port free on host, or UpFailed naming the first that is taken (exit 1). A port whose only
    sockets are the last run's connections in TIME_WAIT is free (harness.port_taken)."""
    for port, who in ports.items():
        exc = harness.port_taken(host, port)
        if exc is not None:
            hint = "--http-port" if who == "gateway" else "--metrics-port" if "metrics" in who else "--port"
            raise UpFailed(f"port {port} on {host} (for the {who}) is already in use "
                           f"({exc.strerror}); stop what holds it or choose another {hint}")


@dataclass(slots=True)
class Proc:
    """One started service: its name, address, process and log file."""

    name: str
    address: str
    popen: subprocess.Popen
    log: pathlib.Path
    ready: bool = False
    log_start: int = 0          # the log's size when this run started it: earlier runs' lines are before
    cmd: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    restarts: int = 0           # how many times `up` restarted it
    exits: int = 0              # exits in a row without a minute of serving between them
    restart_at: float = 0.0     # when a dead one is started again (0: not waiting to)
    started_at: float = 0.0     # when this process was started
    ready_at: float = 0.0       # when it last answered SERVING


def _last_line(path: pathlib.Path, start: int = 0) -> str:
    """The last non-empty line written at or after byte `start` (this run's part of the log)."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _check_alive(procs: list[Proc]) -> None:
    for p in procs:
        code = p.popen.poll()
        if code is not None:
            last = _last_line(p.log, p.log_start)
            raise UpFailed(f"the {p.name} ({p.address}) exited with code {code}"
                           f"{' while starting' if not p.ready else ''}; its log: {p.log}"
                           + (f"; last line: {last}" if last else ""))


def command_name() -> str:
    """How to call openlora in a hint: `openlora` where PATH finds this one, else the path the person
    typed (`.venv/bin/openlora` in a venv that is not activated: bare `openlora` is not found)."""
    argv0 = sys.argv[0]
    if os.path.basename(argv0) != "openlora":
        return "openlora"                              # python -m services.cli
    found = shutil.which("openlora")
    if found and os.path.realpath(found) == os.path.realpath(argv0):
        return "openlora"
    return argv0


def build_announcement(log: pathlib.Path, offset: int) -> tuple[str | None, int]:
    """The executor's kernel_build_started record, said on `up`'s terminal (the person watching it
    otherwise sees nothing for the build's 20-180 s): (a line to say or None, the new log offset)."""
    import json
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except OSError:
        return None, offset
    end = chunk.rfind(b"\n") + 1                      # whole lines only
    for line in chunk[:end].decode(errors="replace").splitlines():
        if "kernel_build_started" not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = {}
        expected = record.get("expected_seconds", "20-180")
        return (f"compiling the C++ kernels (once for this checkout, interpreter and torch; expected "
                f"{expected} s; later starts load them in under a second)"), offset + end
    return None, offset + end


def wait_serving(proc: Proc, timeout_s: float, procs: list[Proc], security=None) -> None:
    """Until proc answers health SERVING, saying a kernel build its log reports; UpFailed when any
    service exits meanwhile, or past timeout_s."""
    seen = {"offset": proc.log_start, "announced": False}    # this run's records only, not the last run's

    def check() -> None:
        _check_alive(procs)
        if not seen["announced"]:
            line, seen["offset"] = build_announcement(proc.log, seen["offset"])
            if line:
                say(f"{proc.name} is {line}")
                seen["announced"] = True
    with harness.HealthProbe(proc.address, security) as probe:
        if harness.wait_until(probe.serving, timeout_s, check=check):
            return
    raise UpFailed(f"the {proc.name} ({proc.address}) is not SERVING after {timeout_s:.0f}s; "
                   f"its log: {proc.log}")


def https_context(args: UpConfig):
    """An ssl context that trusts --tls-ca (else --tls-cert itself) and presents --tls-cert."""
    import ssl
    ctx = ssl.create_default_context(cafile=args.tls_ca or args.tls_cert)
    ctx.load_cert_chain(args.tls_cert, args.tls_key)
    return ctx


def wait_http(proc: Proc, url: str, timeout_s: float, procs: list[Proc], context=None) -> None:
    """Until GET url answers 200 (the HTTP API's /health)."""
    if not harness.wait_until(lambda: harness.http_ok(url, context=context), timeout_s,
                              check=lambda: _check_alive(procs)):
        raise UpFailed(f"the {proc.name} ({url}) is not answering after {timeout_s:.0f}s; its log: {proc.log}")


def register_demo_adapters(data: pathlib.Path, registry: str, security=None) -> list[str]:
    """Write and register the demo adapters (random, non-zero B) unless already registered."""
    from services.common.gen.openlora.v1 import registry_pb2, registry_pb2_grpc
    from services.common.tls import channel as open_channel
    from services.synthetic import ALL_MODULES, AdapterSpec, write_adapter
    added = []
    with open_channel(registry, security) as channel:
        stub = registry_pb2_grpc.AdapterRegistryStub(channel)
        for adapter_id, seed in DEMO_ADAPTERS.items():
            try:
                stub.GetAdapter(registry_pb2.GetAdapterRequest(adapter_id=adapter_id), timeout=30)
                continue
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise UpFailed(f"cannot read demo adapter {adapter_id}: {exc.details()}") from None
            path = data / "demo-adapters" / adapter_id.replace("/", "--")
            if path.exists():
                shutil.rmtree(path)
            write_adapter(path, demo_spec(), AdapterSpec(rank=8, alpha=16.0, targets=ALL_MODULES,
                                                         seed=seed, base_model=DEMO))
            try:
                stub.RegisterAdapter(registry_pb2.RegisterAdapterRequest(
                    adapter_id=adapter_id, source=path.resolve().as_uri(), labels={"demo": "true"}),
                    timeout=120)
            except grpc.RpcError as exc:
                raise UpFailed(f"cannot register demo adapter {adapter_id}: {exc.details()}") from None
            added.append(adapter_id)
    return added


class Supervisor:
    """Keeps every service running once `up` is ready: one that exits is started again after a
    backoff (1, 2, 4 ... 30 s) while the others keep serving, with one line each time it goes and
    comes back. `max_restarts` exits in a row (none after a minute of serving) stop `up` (UpFailed)."""

    DELAYS_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
    STEADY_S = 60.0             # serving this long makes the next exit a first one again

    def __init__(self, procs: list[Proc], args: UpConfig, security=None, https=None):
        self.procs, self.args, self.security, self.https = procs, args, security, https
        self._probes: dict[str, harness.HealthProbe] = {}

    def run(self) -> None:
        try:
            while True:
                now = time.monotonic()
                for p in self.procs:
                    self.tend(p, now)
                time.sleep(0.2)
        finally:
            for probe in self._probes.values():
                probe.close()

    def tend(self, p: Proc, now: float) -> None:
        if p.restart_at:
            if now >= p.restart_at:
                # a Ctrl-C waits until the new process is recorded, so stopping stops it too
                blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
                try:
                    p.popen, p.log_start = _launch(p.name, p.cmd, p.log, p.env)
                    p.restart_at, p.started_at, p.restarts = 0.0, now, p.restarts + 1
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            return
        code = p.popen.poll()
        if code is not None:
            self.exited(p, code, now)
        elif not p.ready:
            if self.serving(p):
                p.ready, p.ready_at = True, now
                say(f"{p.name} is back on {p.address} (restart {p.restarts}, serving "
                    f"{now - p.started_at:.1f} s after it was started again)")
            elif now - p.started_at > self.args.startup_timeout_s:
                say(f"{p.name} is not serving {self.args.startup_timeout_s:.0f} s after it was started "
                    f"again: killing it; its log: {p.log}")
                harness.kill(p.popen)

    def exited(self, p: Proc, code: int, now: float) -> None:
        if p.ready and now - p.ready_at >= self.STEADY_S:
            p.exits = 0
        p.exits += 1
        last = _last_line(p.log, p.log_start)
        where = f"its log: {p.log}" + (f"; last line: {last}" if last else "")
        if p.exits > self.args.max_restarts:
            raise UpFailed(f"the {p.name} ({p.address}) exited with code {code}, {p.exits} times in a row "
                           f"(--max-restarts {self.args.max_restarts}); {where}")
        delay = self.DELAYS_S[min(p.exits, len(self.DELAYS_S)) - 1]
        say(f"{p.name} ({p.address}) exited with code {code}{'' if p.ready else ' before serving'}; the "
            f"others keep serving; restarting it in {delay:.0f} s ({where})")
        p.ready, p.restart_at = False, now + delay

    def serving(self, p: Proc) -> bool:
        if p.name == "gateway":
            return harness.http_ok(f"{'https' if self.https else 'http'}://{p.address}/health", timeout=0.5,
                                   context=self.https)
        if p.name not in self._probes:
            self._probes[p.name] = harness.HealthProbe(p.address, self.security)
        return self._probes[p.name].serving(timeout=0.5)


def _stop_all(procs: list[Proc]) -> None:
    """SIGTERM every service (newest first); wait for ready ones to drain, kill starting ones soon."""
    for p in reversed(procs):
        if p.popen.poll() is None:
            p.popen.send_signal(signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.popen.wait(timeout=READY_GRACE_S if p.ready else STARTING_GRACE_S)
        except subprocess.TimeoutExpired:
            harness.kill(p.popen)


def main(argv: list[str]) -> int:
    args = parse_config("openlora up", UpConfig, argv, __doc__.splitlines()[0])

    def on_signal(signum, _frame):
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    procs: list[Proc] = []
    status: dict[str, bool] = {}
    try:
        return _run(args, procs, status)
    except Stopped as stop:
        say("stopping" + (" (Ctrl-C)" if stop.signum == signal.SIGINT else ""))
        # Ctrl-C once everything is up is the normal way to stop (0); during start-up it is 130
        return 130 if stop.signum == signal.SIGINT and not status.get("ready") else 0
    except UpFailed as exc:
        say(f"error: {exc}")
        return exc.code
    finally:
        # a second Ctrl-C while stopping is remembered, not a traceback
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        _stop_all(procs)


def _run(args: UpConfig, procs: list[Proc], status: dict[str, bool]) -> int:
    h, port = args.host, args.port
    registry = f"{h}:{port + 1}"
    executors = [f"{h}:{port + 2 + i}" for i in range(args.executors)]
    ports = {port: "router", port + 1: "registry",
             **{port + 2 + i: f"executor-{i}" for i in range(args.executors)}}
    if args.http_port:
        if args.http_port in ports:
            raise UpFailed(f"--http-port {args.http_port} is one of the gRPC ports "
                           f"{port}..{port + 1 + args.executors}; choose another", code=2)
        ports[args.http_port] = "gateway"
    metrics = metrics_ports(args)
    for name, metrics_port in metrics.items():
        if metrics_port in ports:
            raise UpFailed(f"--metrics-port {args.metrics_port}: port {metrics_port} (the {name}'s metrics) "
                           f"is taken by the {ports[metrics_port]}; choose another", code=2)
        ports[metrics_port] = f"{name}'s metrics"
    check_ports(h, ports)
    data = pathlib.Path(args.data_dir).resolve()
    logs = data / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    demo = not args.base_model
    base = args.base_model or str(demo_model(data))
    secure = args.service_args()                     # TLS and auth flags, the same for every service
    security = args.security()
    scheme = "https" if args.tls_cert else "http"
    # the registry refuses adapters that cannot fit the model the executors serve
    fit = ["--base-model", base] if pathlib.Path(base, "config.json").is_file() else []
    def metrics_flag(name: str) -> list[str]:
        return ["--metrics-port", str(metrics[name])] if name in metrics else []
    # an explicit --allow-local-dir (or OPENLORA_ALLOW_LOCAL_DIR, read as up's own flag) bounds file://
    # sources: the demo adapters' directory joins it, or the demo adapters could not be registered
    allow = [*args.allow_local_dir, *([str(data / "demo-adapters")] if demo else [])] \
        if args.allow_local_dir else []
    plan = [("registry", registry, [*harness.cli_command("registry"), "--host", h, "--port", str(port + 1),
                                    "--data-dir", str(data / "registry"), *fit, *metrics_flag("registry"),
                                    *[x for d in allow for x in ("--allow-local-dir", d)], *secure])]
    plan += [(f"executor-{i}", addr, [*harness.cli_command("executor"), "--host", h, "--port", addr.rsplit(":", 1)[1],
                                      "--registry", registry, "--base-model", base,
                                      "--disk-cache-dir", str(data / f"executor-{i}"),
                                      *metrics_flag(f"executor-{i}"), *secure])
             for i, addr in enumerate(executors)]
    # the router serves the OpenAI API itself on --http-port: HTTP -> placement -> an executor
    http = ["--http-port", str(args.http_port)] if args.http_port else []
    plan.append(("router", f"{h}:{port}", [*harness.cli_command("router"), "--host", h, "--port", str(port),
                                            "--registry", registry, *metrics_flag("router"), *http,
                                            *[x for e in executors for x in ("--executor", e)], *secure]))
    env = {"OPENLORA_TOKEN": args.token} if args.token else {}
    # the registry and the executors start together (an executor needs the registry only to fetch
    # an adapter, later); the router (and its HTTP API) once the executors serve
    early = [step for step in plan if step[0] == "registry" or step[0].startswith("executor-")]
    started: dict[str, Proc] = {}
    for name, address, cmd in early:
        started[name] = _start(name, address, cmd, logs, env)
        procs.append(started[name])
    for name, address, cmd in plan:
        if name not in started:
            started[name] = _start(name, address, cmd, logs, env)
            procs.append(started[name])
        proc = started[name]
        wait_serving(proc, args.startup_timeout_s, procs, security)
        if name == "router" and args.http_port:
            wait_http(proc, f"{scheme}://{h}:{args.http_port}/health", args.startup_timeout_s, procs,
                      https_context(args) if args.tls_cert else None)
        proc.ready, proc.started_at = True, time.monotonic()
        proc.ready_at = proc.started_at
        say(f"{name} ready on {address}{' (TLS)' if args.tls_cert else ''}  (log {proc.log})")
        if name == "registry" and demo:
            added = register_demo_adapters(data, registry, security)
            if added:
                router = "" if (h, port) == ("127.0.0.1", 50050) else f" --router {h}:{port}"
                say(f"registered demo adapters {', '.join(added)} for the demo model (random weights; "
                    f"each changes the output); once ready, try: {command_name()} generate{router} "
                    f"--adapter {added[0]} 'Hello'")
    gateway = f"  gateway {scheme}://{h}:{args.http_port}/v1" if args.http_port else ""
    tls = (f"  TLS{' (mutual)' if args.tls_ca else ''}: clients pass --tls-ca"
           f"{' --tls-cert --tls-key' if args.tls_ca else ''}") if args.tls_cert else ""
    shown = "  metrics " + "  ".join(f"{name} :{p}" for name, p in metrics.items()) if metrics else ""
    say(f"ready: router {h}:{port}  registry {registry}  executors {' '.join(executors)}{gateway}"
        f"{tls}{shown}  (Ctrl-C stops)")
    status["ready"] = True
    Supervisor(procs, args, security, https_context(args) if args.tls_cert else None).run()


def _launch(name: str, cmd: list[str], log: pathlib.Path, env=None) -> tuple[subprocess.Popen, int]:
    """Start one service appending to its log; (the process, the log's size before it). Its own
    session: a terminal's Ctrl-C reaches `up` alone, which stops the services in order (a compiler
    killed by the same Ctrl-C used to make the executor fall back to slow ops)."""
    return harness.launch(cmd, log, {**(env or {}), "OPENLORA_LOG_SERVICE": name}, own_session=True)


def _start(name: str, address: str, cmd: list[str], logs: pathlib.Path, env=None) -> Proc:
    log = logs / f"{name}.log"
    popen, start = _launch(name, cmd, log, env)
    return Proc(name, address, popen, log, log_start=start, cmd=cmd, env=env or {})


def metrics_ports(args: UpConfig) -> dict[str, int]:
    """--metrics-port P: the registry on P, executor-i on P+1+i, the router after them."""
    if not args.metrics_port:
        return {}
    names = ["registry", *(f"executor-{i}" for i in range(args.executors)), "router"]
    return {name: args.metrics_port + i for i, name in enumerate(names)}
