"""Tokenizer wrapper and incremental detokenisation (streamed text == one-shot decode)."""

from __future__ import annotations

import pathlib

import pytest

from services.executor.tokenizer import Detokenizer, Tokenizer


@pytest.fixture(scope="module")
def tok(llama_dir):
    t = Tokenizer.from_dir(llama_dir)
    assert t is not None
    return t


def test_eos_from_tokenizer_config(tok):
    assert tok.eos_token_ids == (1,)
    assert Tokenizer.from_dir(pathlib.Path("/nonexistent")) is None


@pytest.mark.parametrize("text", [
    "hello world, hello adapters!", "héllo wörld ✓ 日本語 🙂🙂 done", "  spaces\n\tand tabs  ",
])
def test_streaming_equals_full_decode(tok, text):
    prompt = tok.encode("The quick brown fox")
    ids = tok.encode(text)
    d = Detokenizer(tok, prompt)
    streamed = [d.step([i]) for i in ids]
    streamed.append(d.flush())
    assert "".join(streamed) == tok.decode(prompt + ids)[len(tok.decode(prompt)):]
    assert not any("\ufffd" in s for s in streamed)


def test_multibyte_split_waits_for_the_whole_character(tok):
    ids = tok.encode("🙂")
    assert len(ids) > 1                                    # byte-level: split over tokens
    d = Detokenizer(tok, tok.encode("a"))
    parts = [d.step([i]) for i in ids]
    assert parts[:-1] == [""] * (len(ids) - 1) and parts[-1] == "🙂"


def test_skips_special_tokens(tok):
    d = Detokenizer(tok, tok.encode("hi"))
    assert d.step([1]) + d.flush() == ""
