"""Chat templates, rendered as transformers renders them, and the base model's tokenizer.

The template is tokenizer_config.json's `chat_template` (a string, or a list of {name, template}
where "default" is used) or a `chat_template.jinja` file beside it; it is rendered in Jinja's
immutable sandbox with trim_blocks and lstrip_blocks, the `loopcontrols` extension, `tojson`,
`raise_exception` and `strftime_now`, and the variables messages, add_generation_prompt,
bos_token, eos_token (+ a request's chat_template_kwargs), exactly as
transformers' apply_chat_template does. The rendered text is tokenized without adding special
tokens (the template writes them), as transformers and vLLM do.
"""

from __future__ import annotations

import json
import pathlib
from datetime import datetime
from functools import lru_cache

from tokenizers import Tokenizer as HFTokenizer


class TemplateError(ValueError):
    """The template refused the messages (raise_exception) or failed to render."""


def _special(cfg: dict, name: str) -> str:
    value = cfg.get(name)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


@lru_cache(maxsize=16)
def _compile(source: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (printable stand-ins for the 256 bytes) -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


class ModelFiles:
    """What the gateway reads from the base model's directory: tokenizer and chat template."""

    def __init__(self, path: str | pathlib.Path | None):
        self.path = pathlib.Path(path) if path else None
        self.tokenizer: HFTokenizer | None = None
        self.byte_level = False      # a byte-level BPE (GPT-2's alphabet): pieces map to bytes
        self.chat_template: str | None = None
        self.bos_token = self.eos_token = ""
        if self.path is None or not self.path.is_dir():
            return
        if (self.path / "tokenizer.json").is_file():
            self.tokenizer = HFTokenizer.from_file(str(self.path / "tokenizer.json"))
            self.byte_level = "ByteLevel" in json.dumps(
                json.loads((self.path / "tokenizer.json").read_text()).get("decoder"))
        cfg_file = self.path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.bos_token, self.eos_token = _special(cfg, "bos_token"), _special(cfg, "eos_token")
        template = cfg.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if not template and (self.path / "chat_template.jinja").is_file():
            template = (self.path / "chat_template.jinja").read_text()
        self.chat_template = template if isinstance(template, str) and template else None

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               extra: dict | None = None) -> str:
        """The chat prompt as text; TemplateError when the template refuses or fails."""
        assert self.chat_template is not None
        try:
            return _compile(self.chat_template).render(
                **(extra or {}), messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError:
            raise
        except Exception as exc:   # jinja2 errors: a template that does not fit these messages
            raise TemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Token ids as text (special tokens kept); `token_id:N` pieces without a tokenizer."""
        if self.tokenizer is None:
            return "".join(self.token_str(t) for t in ids)
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    @lru_cache(maxsize=65536)  # noqa: B019 (one tokenizer per gateway process, kept for its life)
    def token_bytes(self, token_id: int) -> list[int]:
        """One token's own bytes (a byte-level BPE piece's bytes, a `<0xNN>` byte token's byte,
        SentencePiece's `▁` as a space), not the UTF-8 of its lone decoding (U+FFFD for a partial
        character)."""
        if self.tokenizer is None:
            return list(self.token_str(token_id).encode())
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return list(self.token_str(token_id).encode())
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return [int(piece[3:5], 16)]
        decoder = _byte_decoder()
        if self.byte_level and all(ch in decoder for ch in piece):
            return [decoder[ch] for ch in piece]
        return list(piece.replace("\u2581", " ").encode())

    @lru_cache(maxsize=65536)  # noqa: B019 (one tokenizer per gateway process, kept for its life)
    def token_str(self, token_id: int) -> str:
        """One token as text (for logprobs); `token_id:N` without a tokenizer, as vLLM writes it."""
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
