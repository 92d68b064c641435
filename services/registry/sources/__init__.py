"""Where RegisterAdapter imports from: one `Source` per URI scheme.

    files = fetch_source("hf://org/name@main/sub", workdir)   # {"adapter_config.json": Path, ...}

A source returns local paths of exactly the two adapter files (it may download them into
`workdir`); it ignores every other file and raises domain errors with actionable messages.
"""

from __future__ import annotations

import pathlib
from typing import Protocol

from services.common.auth import SourceCredentials
from services.common.errors import InvalidArgument

__all__ = ["Source", "SourceCredentials", "default_sources", "fetch_source"]


class Source(Protocol):
    def fetch(self, uri: str, workdir: pathlib.Path, credentials: SourceCredentials | None = None
              ) -> dict[str, pathlib.Path]:
        """`credentials`: the registering tenant's (hf://, s3://); None: the registry's environment."""


def default_sources(s3_addressing_style: str = "auto") -> dict[str, Source]:
    from services.registry.sources.file import FileSource
    from services.registry.sources.hf import HfSource
    from services.registry.sources.s3 import S3Source
    return {"file": FileSource(), "hf": HfSource(), "s3": S3Source(s3_addressing_style)}


def fetch_source(uri: str, workdir: pathlib.Path, sources: dict[str, Source] | None = None,
                 credentials: SourceCredentials | None = None) -> dict[str, pathlib.Path]:
    scheme, sep, _ = uri.partition("://")
    sources = default_sources() if sources is None else sources
    if not sep or scheme not in sources:
        raise InvalidArgument(f"unsupported source {uri!r}: expected hf://ORG/NAME[@REVISION]"
                              "[/SUBFOLDER], file:///ABS/DIR or s3://BUCKET/PREFIX")
    if credentials is None:
        return sources[scheme].fetch(uri, workdir)
    return sources[scheme].fetch(uri, workdir, credentials=credentials)
