"""Flags, environment variables and config dataclasses, in one place.

Each service has one `@dataclass` config; its fields *are* its flags. `add_flags` turns the fields
into argparse options (`max_batch_size` -> `--max-batch-size`), each defaulting to the environment
variable `OPENLORA_MAX_BATCH_SIZE`, and `from_args` builds the dataclass, whose `__post_init__`
checks values and raises `ConfigError` naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

MAX_MESSAGE_BYTES = 16 * 1024 * 1024   # gRPC message cap; adapter chunks are 1 MiB
CHUNK_BYTES = 1024 * 1024


class ConfigError(ValueError):
    """A bad flag or environment value; str() is the one line shown to the user."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


def flag(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple | None = None,
         multiple: bool = False, required: bool = False) -> Any:
    """A config field that is also a command-line flag."""
    meta = {"help": help, "choices": choices, "multiple": multiple, "required": required}
    if multiple:
        return field(default_factory=list, metadata=meta)
    return field(default=default, metadata=meta)


def event_loop_flag() -> Any:
    """--event-loop, one flag of every server and of the gateway (services/cli.py: event_loop_factory)."""
    return flag("auto", "the asyncio event loop: uvloop (libuv's, lighter per request than asyncio's: "
                "docs/reference.md), asyncio, or auto (uvloop where installed)",
                choices=("auto", "uvloop", "asyncio"))


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return "OPENLORA_" + name.upper()


def _convert(kind: type, raw: str, where: str) -> Any:
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        return kind(raw)
    except ValueError:
        raise ConfigError(where, f"invalid {kind.__name__} value {raw!r}") from None


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one option per field of `cls`; defaults come from OPENLORA_* variables when set."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            continue
        kind = hints[f.name]
        multiple = meta["multiple"]
        base = typing.get_args(kind)[0] if multiple else _unoptional(kind)
        env = os.environ.get(env_name(f.name))
        where = f"{env_name(f.name)} (flag {flag_name(f.name)})"
        if env is not None:
            default = ([_convert(base, v.strip(), where) for v in env.split(",") if v.strip()]
                       if multiple else _convert(base, env, where))
            if meta["choices"] and not multiple and default not in meta["choices"]:
                raise ConfigError(where, f"must be one of {', '.join(meta['choices'])}")
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = [] if multiple else None
        kwargs: dict[str, Any] = {"dest": f.name, "help": f"{meta['help']} [env {env_name(f.name)}]",
                                  "default": default}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = base
            kwargs["metavar"] = f.name.split("_")[-1].upper()
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
            if multiple:
                kwargs["action"] = "append"
                kwargs["default"] = None
                kwargs["help"] += " (repeatable)"
                parser.set_defaults(**{f"_env_{f.name}": default})
        parser.add_argument(flag_name(f.name), **kwargs)


def _unoptional(kind: Any) -> type:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind


def from_args(cls: type, ns: argparse.Namespace):
    """Build `cls` from parsed flags; required flags and checks raise ConfigError."""
    values = {}
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata or not hasattr(ns, f.name):
            continue
        value = getattr(ns, f.name)
        if f.metadata["multiple"] and value is None:
            value = getattr(ns, f"_env_{f.name}", [])
        if f.metadata["required"] and value in (None, [], ""):
            raise ConfigError(flag_name(f.name), f"is required (or set {env_name(f.name)})")
        if f.metadata["choices"] and value is not None and value not in f.metadata["choices"]:
            raise ConfigError(flag_name(f.name), f"must be one of {', '.join(f.metadata['choices'])}")
        values[f.name] = value
    return cls(**values)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help says each option's default (argparse's ArgumentDefaultsHelpFormatter, minus the noise:
    no "(default: None)" for unset options, "" or [] or store_true's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or not action.option_strings or action.default in (None, "", []) \
                or action.default is argparse.SUPPRESS \
                or (action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)):
            return text
        return f"{text} (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (exit 2) instead of usage + error; --help shows defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_config(prog: str, cls: type, argv: list[str], description: str = ""):
    """Flags + OPENLORA_* -> a `cls` instance; any bad value prints one line and exits 2."""
    import sys
    try:
        parser = OneLineParser(prog=prog, description=description)
        add_flags(parser, cls)
        return from_args(cls, parser.parse_args(argv))
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def check(condition: bool, name: str, message: str) -> None:
    """Raise ConfigError for field `name` unless `condition`."""
    if not condition:
        raise ConfigError(flag_name(name), message)


@dataclass(slots=True)
class ServerConfig:
    """What every gRPC server shares."""

    host: str = flag("127.0.0.1", "address to listen on")
    port: int = flag(0, "port to listen on (0 -> any free port)")
    grace_seconds: float = flag(10.0, "how long SIGTERM waits for in-flight calls")
    log_level: str = flag("info", "log level", choices=("debug", "info", "warning", "error"))
    event_loop: str = event_loop_flag()
    # auth and TLS (services.common.auth, services.common.tls; docs/reference.md, "Auth, tenants and TLS")
    auth_file: str = flag("", "JSON token file {\"tokens\": [{\"token_sha256\", \"tenant\", \"role\"}]}, "
                          "re-read on change (empty -> open access, every caller admin)")
    auth_tokens: str = flag("", "tokens inline, the auth file's JSON (for containers' env)")
    token: str = flag("", "bearer token this service sends to the services it calls")
    tls_cert: str = flag("", "PEM certificate: serve TLS (also the client certificate for mutual TLS)")
    tls_key: str = flag("", "PEM private key of --tls-cert")
    tls_ca: str = flag("", "PEM CA: require client certificates it signed, and verify servers called")
    max_receive_message_bytes: int = flag(MAX_MESSAGE_BYTES, "largest request message accepted")

    def __post_init__(self) -> None:
        check(0 <= self.port <= 65535, "port", f"must be 0..65535, got {self.port}")
        check(self.max_receive_message_bytes >= 1024, "max_receive_message_bytes", "must be >= 1024")
        check(bool(self.tls_cert) == bool(self.tls_key), "tls_cert" if not self.tls_cert else "tls_key",
              "--tls-cert and --tls-key go together")
        check(not self.tls_ca or bool(self.tls_cert), "tls_ca",
              "needs --tls-cert and --tls-key (a server with a CA verifies its clients over TLS)")
        check(self.grace_seconds >= 0, "grace_seconds", "must be >= 0")
        check(bool(self.host), "host", "must not be empty")
