"""Where RegisterAdapter imports from: one `Source` per URI scheme.

    files = fetch_source("hf://org/name@main/sub", workdir)   # {"adapter_config.json": Path, ...}

A source returns local paths of exactly the two adapter files (it may download them into
`workdir`); it ignores every other file and raises domain errors with actionable messages.
"""

from __future__ import annotations

import pathlib
from typing import Protocol

from services.common.errors import InvalidArgument


class Source(Protocol):
    def fetch(self, uri: str, workdir: pathlib.Path) -> dict[str, pathlib.Path]: ...


def default_sources(s3_addressing_style: str = "auto") -> dict[str, Source]:
    from services.registry.sources.file import FileSource
    from services.registry.sources.hf import HfSource
    from services.registry.sources.s3 import S3Source
    return {"file": FileSource(), "hf": HfSource(), "s3": S3Source(s3_addressing_style)}


def fetch_source(uri: str, workdir: pathlib.Path,
                 sources: dict[str, Source] | None = None) -> dict[str, pathlib.Path]:
    scheme, sep, _ = uri.partition("://")
    sources = default_sources() if sources is None else sources
    if not sep or scheme not in sources:
        raise InvalidArgument(f"unsupported source {uri!r}: expected hf://ORG/NAME[@REVISION]"
                              "[/SUBFOLDER], file:///ABS/DIR or s3://BUCKET/PREFIX")
    return sources[scheme].fetch(uri, workdir)
