"""tokenizer.json through the `tokenizers` library, and incremental detokenisation for streaming.

    tok = Tokenizer.from_dir(model_dir, eos_token_ids)     # None when the directory has no tokenizer.json
    ids = tok.encode("hello")
    d = Detokenizer(tok, prompt_ids)
    d.step(new_ids) -> the text that became stable (prefix-offset method, as vLLM and TGI)
"""

from __future__ import annotations

import json
import pathlib

from tokenizers import Tokenizer as HFTokenizer


class Tokenizer:
    def __init__(self, tok: HFTokenizer, eos_token_ids: tuple[int, ...]):
        self._tok = tok
        self.eos_token_ids = eos_token_ids

    @classmethod
    def from_dir(cls, path: pathlib.Path, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer | None:
        file = pathlib.Path(path) / "tokenizer.json"
        if not file.is_file():
            return None
        tok = HFTokenizer.from_file(str(file))
        eos = tuple(eos_token_ids)
        if not eos:  # fall back to tokenizer_config.json's eos_token
            cfg = pathlib.Path(path) / "tokenizer_config.json"
            name = json.loads(cfg.read_text()).get("eos_token") if cfg.is_file() else None
            if isinstance(name, dict):
                name = name.get("content")
            tid = tok.token_to_id(name) if isinstance(name, str) else None
            eos = () if tid is None else (tid,)
        return cls(tok, eos)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class Detokenizer:
    """Streams text as tokens arrive; never emits text a later token could still change.

    Decodes ids[prefix_offset:] and ids[prefix_offset:read_offset] (a few tokens of context so that
    leading spaces and merges come out right) and emits the difference, unless the new text ends in
    U+FFFD (an incomplete UTF-8 sequence split across tokens), in which case it waits.
    """

    CONTEXT = 5

    def __init__(self, tok: Tokenizer, prompt_ids: list[int]):
        self.tok = tok
        self.ids = list(prompt_ids)
        self.read_offset = len(self.ids)
        self.prefix_offset = max(len(self.ids) - self.CONTEXT, 0)

    def step(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """At the end: whatever is left, even an incomplete character."""
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if full.startswith(prefix) else ""
