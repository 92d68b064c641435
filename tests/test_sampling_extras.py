"""stop_token_ids, min_new_tokens, presence_penalty, frequency_penalty and top_logprobs (as in
vLLM's SamplingParams and OpenAI's API).

The sampler's rules on hand-made logits; then the engine against transformers: its greedy output
with a stop token held back by min_new_tokens equals transformers' generate with the same
min_new_tokens and eos_token_id, and its output under presence/frequency penalties equals a loop over
the transformers model's raw logits applying vLLM's rule (fp32, tokens equal, raw logprobs 1e-4).
"""

from __future__ import annotations

import threading

import pytest
import torch

from services.common.errors import InvalidArgument
from services.executor.adapters.source import LocalDirSource
from services.executor.config import ExecutorConfig
from services.executor.engine import Engine, GenerationRequest, SamplingOptions
from services.executor.sampler import SamplingRow, make_generator, sample, sample_with_top

PROMPT = [5, 17, 42, 99, 7, 3, 250, 31]


def row(history, prompt_len, held_back=(), **options):
    o = SamplingOptions(**options)
    return SamplingRow(o, make_generator(o.seed, torch.device("cpu")) if o.temperature > 0 else None,
                       list(history), prompt_len, tuple(held_back))


def test_presence_and_frequency_follow_vllms_rule():
    logits = torch.tensor([[3.0, 2.9, 2.5, 0.0, -1.0]])
    # output so far: token 0 twice, token 1 once (the prompt's tokens 2 and 4 do not count)
    r = row([2, 4, 0, 1, 0], prompt_len=2, presence_penalty=0.2, frequency_penalty=0.3)
    # 0: 3.0 - 0.2 - 0.6 = 2.2; 1: 2.9 - 0.2 - 0.3 = 2.4; 2: 2.5 (only in the prompt): the max
    tokens, logprobs = sample(logits, [r])
    assert tokens == [2]
    assert logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1)[2].item())   # raw logits
    assert sample(logits, [row([2, 4, 0, 1, 0], 2)])[0] == [0]                        # no penalty
    # negative penalties favour repeats
    assert sample(torch.tensor([[1.0, 1.2, 0.0]]), [row([0], 0, presence_penalty=-0.5)])[0] == [0]


def test_min_new_tokens_holds_back_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])          # 1 is the argmax, 2 the runner-up
    held = row([9, 9], prompt_len=2, held_back=(1, 7000), min_new_tokens=2)   # ids past V are ignored
    assert held.masked == (1, 7000) and sample(logits, [held])[0] == [2]
    done = row([9, 9, 2, 2], prompt_len=2, held_back=(1,), min_new_tokens=2)
    assert done.masked == () and sample(logits, [done])[0] == [1]
    sampled = row([9], 1, held_back=(1,), min_new_tokens=1, temperature=0.7, seed=3)
    assert all(sample(logits, [sampled])[0] != [1] for _ in range(20))


def test_top_logprobs_are_the_raw_top_k():
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0], [1.0, 0.0, 0.0, 0.0]])
    rows = [row([], 0, top_logprobs=3, repetition_penalty=2.0), row([], 0)]
    tokens, _, tops = sample_with_top(logits, rows)
    raw = torch.log_softmax(logits[0], -1)
    assert tops[0][0] == [1, 3, 0] and tops[0][1] == pytest.approx(raw[[1, 3, 0]].tolist())
    assert tops[1] is None and tokens == [1, 0]
    many = sample_with_top(logits[:1], [row([], 0, top_logprobs=20)])[2][0]
    assert len(many[0]) == 4                                  # at most the vocabulary


@pytest.mark.parametrize("options, bad", [
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"min_new_tokens": -1}, "min_new_tokens"),
    ({"min_new_tokens": 9, "max_new_tokens": 8}, "min_new_tokens"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"stop_token_ids": (3, -1)}, "stop_token_ids"),
])
def test_invalid_extras(options, bad):
    problems = SamplingOptions(**options).problems()
    assert len(problems) == 1 and bad in problems[0]


@pytest.fixture(scope="module")
def engine(llama_dir, tmp_path_factory):
    e = Engine(ExecutorConfig(base_model=str(llama_dir), device="cpu", dtype="float32",
                              kv_block_size=4, max_model_len=64, default_max_new_tokens=10),
               LocalDirSource(tmp_path_factory.mktemp("no-adapters")))
    e.start()
    yield e
    e.stop()


def run(engine, **sampling):
    done, out = threading.Event(), {"tokens": [], "logprobs": []}

    def on_event(ev):
        out["tokens"] += ev.token_ids
        out["logprobs"] += ev.logprobs
        if ev.finish_reason or ev.error:
            out["finish"], out["error"] = ev.finish_reason, ev.error
            done.set()

    rid = f"x{id(out)}"
    engine.submit(GenerationRequest(rid, prompt_token_ids=PROMPT, sampling=SamplingOptions(**sampling)),
                  on_event)
    assert done.wait(60) and out["error"] is None
    return out


def test_stop_token_ids_end_the_generation(engine):
    free = run(engine, max_new_tokens=8, ignore_eos=True)["tokens"]
    stop = free[3]
    first = free.index(stop)
    out = run(engine, max_new_tokens=8, stop_token_ids=(stop,))
    assert out["finish"] == "stop" and out["tokens"] == free[:first + 1]      # the stop token is kept
    out = run(engine, max_new_tokens=8, ignore_eos=True, stop_token_ids=(stop,))
    assert out["finish"] == "stop" and out["tokens"] == free[:first + 1]      # ignore_eos: EOS only


@pytest.mark.parametrize("sampling, match", [
    ({"stop_token_ids": (512,)}, "stop_token_ids: 512 is outside the vocabulary"),
    ({"min_new_tokens": 11}, r"min_new_tokens \(11\) must be <= max_new_tokens \(10"),
    ({"frequency_penalty": -3.0}, "frequency_penalty"),
])
def test_bad_extras_are_invalid_arguments(engine, sampling, match):
    with pytest.raises(InvalidArgument, match=match):
        engine.submit(GenerationRequest("bad", prompt_token_ids=PROMPT, sampling=SamplingOptions(**sampling)),
                      lambda ev: None)


@pytest.fixture(scope="module")
def hf_model(llama_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


def test_min_new_tokens_matches_transformers(engine, hf_model):
    """The greedy run's 2nd token made the stop token: with min_new_tokens=5 it cannot come before
    the 6th, exactly as transformers' MinNewTokensLengthLogitsProcessor holds back eos_token_id."""
    free = run(engine, max_new_tokens=10, ignore_eos=True)["tokens"]
    stop = free[1]
    out = run(engine, max_new_tokens=10, ignore_eos=True, stop_token_ids=(stop,), min_new_tokens=5)
    with torch.no_grad():
        hf = hf_model.generate(torch.tensor([PROMPT]),
                               attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                               max_new_tokens=10, min_new_tokens=5, eos_token_id=[stop], pad_token_id=0,
                               do_sample=False)[0, len(PROMPT):].tolist()
    assert out["tokens"] == hf
    assert len(out["tokens"]) >= 5 and stop not in out["tokens"][:5]


@pytest.mark.parametrize("presence, frequency", [(0.7, 1.1), (-2.0, -1.5)])
def test_presence_frequency_match_a_loop_over_transformers_logits(engine, hf_model, presence, frequency):
    out = run(engine, max_new_tokens=10, ignore_eos=True, presence_penalty=presence,
              frequency_penalty=frequency)
    ids, want, want_lp = list(PROMPT), [], []
    with torch.no_grad():
        for _ in range(10):
            logits = hf_model(torch.tensor([ids])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(want, dtype=torch.long), minlength=logits.shape[0]).float()
            penalised = logits - presence * (counts > 0).float() - frequency * counts
            token = int(penalised.argmax())
            want.append(token)
            want_lp.append(float(torch.log_softmax(logits, -1)[token]))
            ids.append(token)
    assert out["tokens"] == want
    assert out["logprobs"] == pytest.approx(want_lp, abs=1e-4)
    if presence < 0:   # repeats made likelier: the output changes (positive ones may find no repeat)
        assert out["tokens"] != run(engine, max_new_tokens=10, ignore_eos=True)["tokens"]


def test_top_logprobs_match_transformers(engine, hf_model):
    done, out = threading.Event(), {"tokens": [], "tops": []}

    def on_event(ev):
        out["tokens"] += ev.token_ids
        out["tops"] += ev.top_logprobs
        if ev.finish_reason or ev.error:
            done.set()

    engine.submit(GenerationRequest("tops", prompt_token_ids=PROMPT, sampling=SamplingOptions(
        max_new_tokens=6, ignore_eos=True, top_logprobs=5)), on_event)
    assert done.wait(60)
    assert len(out["tops"]) == len(out["tokens"]) == 6
    ids = list(PROMPT)
    with torch.no_grad():
        for token, (top_ids, top_lps) in zip(out["tokens"], out["tops"], strict=True):
            raw = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, -1].float(), -1)
            want = torch.topk(raw, 5)
            assert top_ids == want.indices.tolist() and top_ids[0] == token     # greedy: the best
            assert top_lps == pytest.approx(want.values.tolist(), abs=1e-4)
            ids.append(token)
