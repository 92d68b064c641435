"""Issue 14, the points that the first-run and API tests left without a test of their own: every RPC
documents its status codes, every flag of every subcommand has help, the demo model's write is
atomic when interrupted, and the README's first-run commands work without activating the venv.
(docs/first-hour.md maps every point of the issue to the test that covers it.)"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STATUS_CODES = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
                "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
                "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
                "UNAUTHENTICATED"}


def _rpc_comments() -> dict[str, str]:
    """'file.proto Service.Rpc' -> the leading comment above that rpc (comment lines joined)."""
    out = {}
    for proto in sorted((ROOT / "protos").rglob("*.proto")):
        lines = proto.read_text().splitlines()
        service = None
        for i, line in enumerate(lines):
            if m := re.match(r"\s*service (\w+)", line):
                service = m.group(1)
            if m := re.match(r"\s*rpc (\w+)", line):
                j, comment = i - 1, []
                while j >= 0 and lines[j].strip().startswith("//"):
                    comment.insert(0, lines[j].strip()[2:].strip())
                    j -= 1
                out[f"{proto.name} {service}.{m.group(1)}"] = " ".join(comment)
    return out


def test_every_rpc_documents_its_status_codes():
    """Status codes were documented only in the README: each RPC's own comment says which codes it
    returns (or "as Generate" for a stream that returns the same), so generated clients show them."""
    rpcs = _rpc_comments()
    assert len(rpcs) >= 14, rpcs
    for rpc, comment in rpcs.items():
        named = set(re.findall(r"\b[A-Z_]{2,}\b", comment)) & STATUS_CODES
        assert named or re.search(r"Status codes: as \w+", comment), f"{rpc}: no status code in {comment!r}"


def test_every_flag_of_every_subcommand_has_help():
    """Every config field is a flag (`flag(default, help)`); one with an empty help showed a bare
    option in --help. The client tools are checked through --help in test_first_run."""
    from services.cli import SERVERS
    from services.up import UpConfig
    configs = {name: cls for name, (cls, _) in SERVERS.items()} | {"up": UpConfig}
    for name, cls in configs.items():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"openlora {name} --{f.name.replace('_', '-')} has no help"
    out = subprocess.run([sys.executable, "-m", "services.cli", "router", "--help"], capture_output=True,
                         text=True, timeout=120).stdout
    assert "--executor" in out and "--registry" in out


def test_an_interrupted_demo_model_write_leaves_nothing_and_the_next_start_writes_it(tmp_path,
                                                                                       monkeypatch):
    """Ctrl-C while the demo model was first written left it without tokenizer.json for good."""
    import services.synthetic
    from services import up
    real = services.synthetic.write_model

    def interrupted(path, spec):
        path = pathlib.Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{}")          # part of the model, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(services.synthetic, "write_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        up.demo_model(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []       # no demo-model, no temp dir
    monkeypatch.setattr(services.synthetic, "write_model", real)
    model = up.demo_model(tmp_path)
    assert all((model / name).is_file() for name in up.DEMO_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == [up.DEMO]
    # a half-written one (from a version before the atomic write) is written again
    (model / "tokenizer.json").unlink()
    assert (up.demo_model(tmp_path) / "tokenizer.json").is_file()


def test_readme_first_run_commands_need_no_activated_venv():
    """Bare `openlora` in the README was not on PATH after the set-up command (no activation): the
    first-run commands name .venv/bin/openlora, the script the set-up command installs."""
    from tests.readme import blocks
    quick = [b for b in blocks() if b.section == "Quick start" and b.lang == ""]
    setup = quick[0].lines
    assert setup[0].startswith("python3 -m venv .venv") and "pip install -e" in setup[0]
    first_run = [line for b in quick[1:] for line in b.commands]
    assert first_run and all(line.startswith((".venv/bin/openlora ", "curl ")) for line in first_run), first_run
    assert any(line.startswith(".venv/bin/openlora up") for line in first_run)
    assert any("generate --adapter demo/" in line for line in first_run)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^\[project\.scripts\]\nopenlora = "services\.cli:main"', pyproject, re.M)
    # the demo adapters the README names are the ones `up` registers
    from services.up import DEMO_ADAPTERS
    for block in blocks():
        for adapter in re.findall(r"(demo/[a-z]+)", block.text):
            assert adapter in DEMO_ADAPTERS, block.text


def test_a_service_logs_json_from_its_first_record(tmp_path):
    """The executor's kernel build announced itself while its module was imported, before logging
    was set up: that record (the one a person waits on) was console text naming no service."""
    code = textwrap.dedent(f"""
        import sys, structlog
        import services.cli as cli
        def resolve(target, what):
            structlog.get_logger().info("kernel_build_started", expected_seconds="20-180")  # at import
            async def serve(config):
                structlog.get_logger().info("serving")
            return serve
        cli._resolve = resolve
        sys.exit(cli.main(["registry", "--data-dir", {str(tmp_path / "r")!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OPENLORA_LOG_SERVICE": "executor-0"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    assert [r["event"] for r in records] == ["kernel_build_started", "serving"]
    assert all(r["service"] == "executor-0" for r in records)



def test_the_demo_model_vocabulary_is_its_tokenizers_and_its_greedy_text_is_visible(tmp_path):
    """The demo model had 1024 ids for a 468-token tokenizer: 54% of ids decoded to "" (garbage text,
    empty logprob tokens). Its vocabulary is now the tokenizer's, and greedy generation (the oracle,
    transformers) gives visible tokens only; a demo model of the older shape is written again."""
    import json

    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from services import up
    model_dir = up.demo_model(tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert config["vocab_size"] == tok.get_vocab_size() == up.demo_vocab()
    invisible = set(up.invisible_token_ids(model_dir / "tokenizer.json"))
    assert 0 < len(invisible) < tok.get_vocab_size() // 2
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt in ("Hello", "SELECT * FROM", "The quick brown fox"):
        ids = torch.tensor([tok.encode(prompt).ids])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=config["eos_token_id"])
        new = [i for i in out[0, ids.shape[1]:].tolist() if i != config["eos_token_id"]]
        assert new and not invisible & set(new), (prompt, [tok.decode([i]) for i in new])
        assert tok.decode(new).strip(), prompt
    # a demo model written by an older version (vocabulary 1024) is replaced
    config["vocab_size"] = 1024
    (model_dir / "config.json").write_text(json.dumps(config))
    assert json.loads((up.demo_model(tmp_path) / "config.json").read_text())["vocab_size"] == up.demo_vocab()


def test_the_executor_disk_cache_is_stable_across_restarts_unless_its_port_is_ephemeral(tmp_path, monkeypatch):
    """An executor with no --disk-cache-dir made a new temporary directory (20 GiB budget) on every
    start and never removed it: it now reuses one per executor id or address."""
    from services.executor.app import disk_cache_dir
    from services.executor.config import ExecutorConfig
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    base = {"base_model": str(tmp_path), "registry": "127.0.0.1:1"}
    a = disk_cache_dir(ExecutorConfig(port=50052, **base))
    assert a == tmp_path / "cache" / "openlora" / "adapters" / "127.0.0.1_50052" and a.is_dir()
    assert disk_cache_dir(ExecutorConfig(port=50052, **base)) == a                 # a restart: the same
    assert disk_cache_dir(ExecutorConfig(port=50053, **base)) != a                 # another executor
    assert disk_cache_dir(ExecutorConfig(port=50052, executor_id="pod/0", **base)).name == "pod_0"
    assert disk_cache_dir(ExecutorConfig(disk_cache_dir=str(tmp_path / "d"), **base)) == tmp_path / "d"
    ephemeral = disk_cache_dir(ExecutorConfig(port=0, **base))
    assert str(tmp_path / "cache") not in str(ephemeral)
