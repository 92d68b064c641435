"""Issue 15: the executor's and router's former hidden constants are flags of their config dataclass,
each read from its derived OPENLORA_* variable, checked with an error naming the flag; and
OPENLORA_EXECUTOR means the router's list everywhere (a client uses its first address)."""

from __future__ import annotations

import pytest

from services.cli import build_parser
from services.client import _target_flags, first_address
from services.common.config import ConfigError, OneLineParser, from_args
from services.executor.config import ExecutorConfig
from services.router.config import RouterConfig

EXECUTOR_KNOBS = [("idle_poll_s", "0.25", 0.25), ("empty_step_wait_s", "0.002", 0.002),
                  ("error_backoff_s", "0.5", 0.5), ("load_adapter_timeout_s", "9", 9.0),
                  ("blob_read_concurrency", "3", 3), ("registry_watch_max_backoff_s", "2", 2.0)]
ROUTER_KNOBS = [("status_timeout_s", "0.5", 0.5), ("sent_adapter_ttl_s", "4", 4.0)]


@pytest.mark.parametrize("service, cls, base, field, raw, value", [
    *[("executor", ExecutorConfig, ["--base-model", "m"], *k) for k in EXECUTOR_KNOBS],
    *[("router", RouterConfig, ["--executor", "a:1"], *k) for k in ROUTER_KNOBS],
])
def test_knob_is_a_flag_and_an_env_variable(monkeypatch, service, cls, base, field, raw, value):
    flag = "--" + field.replace("_", "-")
    ns = build_parser().parse_args([service, *base, flag, raw])
    assert getattr(from_args(cls, ns), field) == value
    monkeypatch.setenv("OPENLORA_" + field.upper(), raw)
    ns = build_parser().parse_args([service, *base])
    assert getattr(from_args(cls, ns), field) == value
    default = cls.__dataclass_fields__[field].default
    assert default != value     # the flag changed something


@pytest.mark.parametrize("cls, kwargs, flag", [
    (ExecutorConfig, {"base_model": "m", "idle_poll_s": 0}, "--idle-poll-s"),
    (ExecutorConfig, {"base_model": "m", "empty_step_wait_s": -1}, "--empty-step-wait-s"),
    (ExecutorConfig, {"base_model": "m", "load_adapter_timeout_s": -1}, "--load-adapter-timeout-s"),
    (ExecutorConfig, {"base_model": "m", "blob_read_concurrency": 0}, "--blob-read-concurrency"),
    (RouterConfig, {"executor": ["a:1"], "status_timeout_s": 0}, "--status-timeout-s"),
    (RouterConfig, {"executor": ["a:1"], "sent_adapter_ttl_s": -1}, "--sent-adapter-ttl-s"),
])
def test_bad_knob_names_its_flag(cls, kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        cls(**kwargs)


@pytest.mark.parametrize("value, first", [("a:1", "a:1"), ("a:1,b:2", "a:1"), (" a:1 , b:2", "a:1"),
                                          ("dns:///exec:50052", "dns:///exec:50052"), ("", "")])
def test_client_takes_the_first_of_the_routers_executor_list(monkeypatch, value, first):
    assert first_address(value) == first
    monkeypatch.setenv("OPENLORA_EXECUTOR", value)
    p = OneLineParser(prog="openlora generate")
    _target_flags(p)
    assert p.parse_args([]).executor == first
    if value:   # the router reads the same variable as its whole list
        ns = build_parser().parse_args(["router"])
        assert from_args(RouterConfig, ns).executor == [v.strip() for v in value.split(",")]
