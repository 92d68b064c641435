"""Structured outputs in the engine (structured.py): a grammar per sequence, masks per row.

One concurrent batch mixes every kind (json_schema, json_object, regex, choice, Lark and GBNF
grammars), greedy and sampled, base and adapter, beside unconstrained requests: each constrained
output follows its format, and the unconstrained ones equal the same requests run alone. Greedy
constrained decoding equals transformers' masked argmax step by step (llguidance's mask applied to
transformers' logits). Bad specs are InvalidArgument naming the problem; compiling is cached by spec.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from conftest import TINY
from engine_runs import run_requests as run

from services.common.errors import InvalidArgument
from services.executor import ops, structured
from services.executor.adapters.source import LocalDirSource
from services.executor.config import ExecutorConfig
from services.executor.engine import Engine, GenerationRequest, SamplingOptions
from services.executor.structured import StructuredOutput
from services.synthetic import AdapterSpec, write_adapter

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 3},
        "owner": {"type": "object", "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 99},
            "ok": {"type": "boolean"}}, "required": ["age", "ok"], "additionalProperties": False},
    },
    "required": ["name", "kind", "tags", "owner"],
    "additionalProperties": False,
}
REGEX = r"(yes|no)-[0-9]{2,4}"
CHOICES = ("alpha", "beta gamma", "é✓")
LARK = 'start: "(" item ("," item)* ")"\nitem: /[a-c]{1,3}/'
GBNF = 'root ::= "<" [0-9]+ ">"'


@pytest.fixture(scope="module")
def setup(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("structured-adapters")
    write_adapter(root / "qv", TINY["llama"], AdapterSpec(rank=4, alpha=8, targets=("q_proj", "v_proj"),
                                                          seed=81))
    e = Engine(ExecutorConfig(base_model=str(llama_dir), device="cpu", dtype="float32",
                              max_lora_rank=16, max_model_len=512), LocalDirSource(root))
    e.start()
    yield e, llama_dir, root
    e.stop()


def check(kind: str, text: str) -> None:
    if kind == "json_schema":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict), text
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES, text
    elif kind == "lark":
        assert re.fullmatch(r"\([a-c]{1,3}(,[a-c]{1,3})*\)", text), text
    else:
        assert re.fullmatch(r"<[0-9]+>", text), text


SPECS = {"json_schema": StructuredOutput("json_schema", json.dumps(SCHEMA)),
         "json_object": StructuredOutput("json_object"),
         "regex": StructuredOutput("regex", REGEX),
         "choice": StructuredOutput("choice", CHOICES),
         "lark": StructuredOutput("grammar", LARK),
         "gbnf": StructuredOutput("grammar", GBNF)}


def test_mixed_batch_every_kind_beside_unconstrained(setup):
    engine = setup[0]
    g = torch.Generator().manual_seed(3)
    plain = {f"plain-{i}": (a, torch.randint(3, 250, (9,), generator=g).tolist(), t)
             for i, (a, t) in enumerate([("", 0.0), ("qv", 0.0), ("", 1.0), ("qv", 1.0)])}

    def plain_req(rid):
        a, p, t = plain[rid]
        return GenerationRequest(rid, prompt_token_ids=p, adapter_id=a,
                                 sampling=SamplingOptions(max_new_tokens=12, temperature=t, seed=5,
                                                          ignore_eos=True))

    alone = {rid: run(engine, [plain_req(rid)])[rid]["tokens"] for rid in plain}
    reqs = [plain_req(rid) for rid in plain]
    for kind, spec in SPECS.items():
        for j, (adapter, temp) in enumerate([("", 0.0), ("qv", 1.0), ("", 0.7)]):
            reqs.append(GenerationRequest(
                f"{kind}-{j}", prompt=f"Answer in {kind}:", adapter_id=adapter,
                sampling=SamplingOptions(max_new_tokens=300, temperature=temp, seed=11 + j,
                                         structured=spec)))
    out = run(engine, reqs)
    for rid, o in out.items():
        assert o["error"] is None, (rid, o["error"])
        if rid.startswith("plain-"):
            assert o["tokens"] == alone[rid], rid          # a grammar beside it changes nothing
            continue
        kind = rid.rsplit("-", 1)[0]
        if kind == "json_object" and o["finish"] == "length":   # a random model's endless string
            assert o["text"].startswith('{"') and len(o["tokens"]) == 300
            continue
        assert o["finish"] in ("eos", "stop"), (rid, o["finish"], o["text"])
        check(kind, o["text"])


@pytest.mark.parametrize("kind", ["json_schema", "json_object"])
def test_greedy_equals_transformers_masked_argmax(setup, kind):
    """The mask is llguidance's over the model's vocabulary; greedy decoding through the engine is
    transformers' argmax under the same mask, token for token."""
    import llguidance as llg
    from transformers import AutoModelForCausalLM
    engine, model_dir, root = setup
    prompt = [5, 60, 7, 200, 31]
    n = 300 if kind == "json_schema" else 40
    got = run(engine, [GenerationRequest("g", prompt_token_ids=prompt, adapter_id="qv", sampling=SamplingOptions(
        max_new_tokens=n, structured=SPECS[kind]))])["g"]
    from peft import PeftModel
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      root / "qv").eval()
    tok = llg.LLTokenizer((model_dir / "tokenizer.json").read_text(), n_vocab=engine.model_config.vocab,
                          eos_token=sorted(engine.eos_token_ids))
    schema = SCHEMA if kind == "json_schema" else {"type": "object"}
    m = llg.LLMatcher(tok, llg.LLMatcher.grammar_from_json_schema(schema, {"whitespace_flexible": False}))
    ids, want = list(prompt), []
    with torch.no_grad():
        while len(want) < n:
            logits = model(torch.tensor([ids])).logits[0, -1]
            bits = m.compute_bitmask()
            allowed = torch.tensor([bits[t // 8] >> (t % 8) & 1 for t in range(logits.shape[0])]).bool()
            t = int(logits.masked_fill(~allowed, float("-inf")).argmax())
            want.append(t)
            ids.append(t)
            if t in engine.eos_token_ids:
                break
            m.consume_token(t)
    assert got["tokens"] == want
    if kind == "json_schema":
        jsonschema.validate(json.loads(got["text"]), SCHEMA)


@pytest.mark.parametrize("spec, message", [
    (StructuredOutput("json_schema", "{not json"), "not valid JSON"),
    (StructuredOutput("json_schema", json.dumps({"type": "strin"})), "strin"),
    (StructuredOutput("regex", "[a-z"), "regex"),
    (StructuredOutput("choice", ()), "choice"),
    (StructuredOutput("grammar", "start: undefined_rule"), "undefined_rule"),
    (StructuredOutput("yaml", "x"), "kind"),
])
def test_bad_specs_are_invalid_argument(setup, spec, message):
    with pytest.raises(InvalidArgument, match=message):
        setup[0].submit(GenerationRequest("bad", prompt_token_ids=[3, 4],
                                          sampling=SamplingOptions(structured=spec)), lambda ev: None)


def test_compiled_once_per_spec(setup):
    engine = setup[0]
    spec = StructuredOutput("regex", "[0-9]{3}")
    assert not engine.grammars.cached(spec)        # the servicer compiles it on a worker thread, once
    before = engine.grammars.compiles
    out = run(engine, [GenerationRequest(f"c{i}", prompt_token_ids=[3, 4 + i],
                                         sampling=SamplingOptions(max_new_tokens=10, structured=spec))
                       for i in range(3)])
    assert engine.grammars.compiles - before == 1
    assert engine.grammars.cached(spec)            # later requests go straight to the engine
    assert all(re.fullmatch("[0-9]{3}", o["text"]) for o in out.values())


def allowed(grammar, output):
    """bool [vocab]: what one grammar allows after `output` (structured.masks, applied to one row)."""
    words = structured.masks([grammar], [output])
    return ops.token_bitmask_fill(torch.zeros(1, grammar.vocab), words, torch.tensor([0]))[0] == 0


def test_prefetched_masks_equal_inline_ones(setup):
    """The CUDA path computes masks on a worker thread while the model runs: same masks as inline,
    and a stale prefetch (the output moved on) is recomputed."""
    from types import SimpleNamespace

    engine = setup[0]
    spec = SPECS["json_schema"]
    a, b = engine.grammars.new(spec), engine.grammars.new(spec)
    out = []
    for _ in range(12):
        row = SimpleNamespace(grammar=a, history=[3, 4, *out], prompt_len=2)
        structured.prefetch([row])
        got, want = allowed(a, out), allowed(b, out)
        assert torch.equal(got, want)
        out.append(int(want.nonzero()[0, 0]) if int(want.nonzero()[0, 0]) not in engine.eos_token_ids
                   else int(want.nonzero()[-1, 0]))
    structured.prefetch([SimpleNamespace(grammar=a, history=[3, 4, *out], prompt_len=2)])
    t = int(allowed(b, out).nonzero()[-1, 0])
    assert torch.equal(allowed(a, [*out, t]), allowed(b, [*out, t]))


@pytest.mark.parametrize("mates", ["default", "filtered"])
def test_grammar_rows_beside_free_rows_draw_as_alone(setup, mates):
    """sample_with_top copies and masks only the grammar rows: in a batch of grammar rows (sampled
    and greedy) and rows without one (sampled, greedy, and in "filtered" a top-p row, which takes the
    row-group path instead of the one draw over every row), each row's token is the one it gets in a
    batch of its own, over many steps with seeded generators; grammar rows stay in their grammar."""
    from services.executor.sampler import SamplingOptions, SamplingRow, make_generator, sample_with_top

    engine = setup[0]
    spec = SPECS["json_schema"]
    kinds = [("grammar", 1.0), ("grammar", 0.0), ("free", 1.0), ("free", 0.0), ("grammar", 1.0)]
    if mates == "filtered":
        kinds.append(("top_p", 1.0))

    def make(seed_base):
        rows = []
        for i, (kind, t) in enumerate(kinds):
            o = SamplingOptions(temperature=t, top_p=0.8 if kind == "top_p" else 1.0)
            r = SamplingRow(o, make_generator(seed_base + i, torch.device("cpu")) if t else None,
                            [5, 6, 7], prompt_len=3)
            if kind == "grammar":
                r.grammar = engine.grammars.new(spec)
            rows.append(r)
        return rows

    together, alone = make(100), make(100)
    gen = torch.Generator().manual_seed(3)
    vocab = together[0].grammar.vocab
    for _ in range(20):
        logits = torch.randn(len(kinds), vocab, generator=gen) * 4
        got, lps, _ = sample_with_top(logits, together)
        for i, r in enumerate(alone):
            want, want_lp, _ = sample_with_top(logits[i:i + 1], [r])
            assert got[i] == want[0], (i, kinds[i])
            assert lps[i] == pytest.approx(want_lp[0], abs=1e-5)
        for r, t in zip(together + alone, got + got, strict=True):
            r.history.append(t)
    for r, kind in zip(together, kinds, strict=True):
        if kind[0] == "grammar":
            r.grammar.advance(r.history[r.prompt_len:])      # raises if a token left the grammar


def test_grammar_work_is_counted_per_engine_and_exported(setup):
    """GetStatus' engine counters and the executor's metrics: steps and their wall time always;
    the grammar rows' own share of it only when grammar rows run (what benchmarks/gateway.py reads
    to say what the unconstrained streams beside structured ones lose, inside the same steps)."""
    from prometheus_client import generate_latest

    from services.executor.metrics import ExecutorMetrics

    engine = setup[0]
    before = engine.status()
    run(engine, [GenerationRequest("plain-count", prompt="hello", sampling=SamplingOptions(max_new_tokens=6))])
    mid = engine.status()
    assert mid.steps > before.steps and mid.step_seconds > before.step_seconds
    assert (mid.grammar_rows, mid.grammar_seconds) == (before.grammar_rows, before.grammar_seconds)
    reqs = [GenerationRequest(f"count-{i}", prompt="hello", sampling=SamplingOptions(
        max_new_tokens=6, temperature=1.0, seed=i, structured=SPECS["json_object"] if i % 2 else None))
        for i in range(4)]
    out = run(engine, reqs)
    assert all(o["error"] is None for o in out.values())
    end = engine.status()
    assert end.grammar_rows - mid.grammar_rows >= 2                 # two grammar rows, each step
    assert 0 < end.grammar_seconds - mid.grammar_seconds < end.step_seconds - mid.step_seconds
    text = generate_latest(ExecutorMetrics(engine).registry).decode()
    for name in ("steps", "step_seconds", "grammar_seconds", "grammar_rows"):
        assert f"openlora_executor_{name}_total" in text, name
    assert f"openlora_executor_grammar_rows_total {float(end.grammar_rows)}" in text


def test_a_grammar_row_whose_allowed_tokens_all_underflow_is_drawn_from_its_masked_logits(setup):
    """The sampler zeroes a grammar row's forbidden tokens in the raw softmax; when every allowed
    token's raw probability is 0 in float32 (a forbidden token 200 above them), the row is drawn
    again from the softmax of its masked logits: an allowed token, never the forbidden favourite,
    while a row without a grammar beside it takes that favourite."""
    from services.executor.sampler import SamplingOptions, SamplingRow, make_generator, sample_with_top

    engine = setup[0]
    spec = StructuredOutput("regex", "[a-z]{1,8}")               # many allowed first tokens
    words = structured.masks([engine.grammars.new(spec)], [[]])[0]
    vocab = engine.grammars.new(spec).vocab
    bit = [(int(words[t // 32]) >> (t % 32)) & 1 for t in range(vocab)]
    favourite = bit.index(0)
    logits = torch.zeros(2, vocab)
    logits[:, favourite] = 200.0
    seen = set()
    for seed in range(8):
        rows = [SamplingRow(SamplingOptions(temperature=1.0), make_generator(seed, torch.device("cpu")), [5],
                            prompt_len=1) for _ in range(2)]
        rows[0].grammar = engine.grammars.new(spec)
        tokens, lps, _ = sample_with_top(logits, rows)
        assert bit[tokens[0]] == 1 and tokens[1] == favourite
        assert lps[0] < -150                                   # the raw logprob, as always
        seen.add(tokens[0])
    assert len(seen) > 1                                       # drawn, not the masked argmax
