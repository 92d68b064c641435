"""The README's fenced blocks, as the tests that run them read them."""

from __future__ import annotations

import pathlib
import re
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Block:
    section: str          # the `## ` heading it is under
    lang: str             # "" for shell, "python", ...
    text: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.text.splitlines() if line.strip()]

    @property
    def commands(self) -> list[str]:
        """Shell commands, a backslash-continued one joined into one line."""
        return [c for c in re.sub(r"\\\n\s*", "", self.text).splitlines() if c.strip()]


def blocks(path: pathlib.Path = ROOT / "README.md") -> list[Block]:
    out, section = [], ""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("```"):
            lang = line[3:].strip()
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            out.append(Block(section, lang, "\n".join(lines[i + 1:j]) + "\n"))
            i = j
        i += 1
    return out
