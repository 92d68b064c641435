"""file:///ABS/DIR: a PEFT adapter directory on the registry's own filesystem."""

from __future__ import annotations

import pathlib
import urllib.parse

from services.common.errors import InvalidAdapter, InvalidArgument
from services.common.peft_format import ADAPTER_FILES, PICKLE_FILES, PICKLE_MESSAGE


class FileSource:
    def fetch(self, uri: str, workdir: pathlib.Path) -> dict[str, pathlib.Path]:
        parsed = urllib.parse.urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidArgument(f"{uri!r}: file:// URIs name a local path: file:///ABS/DIR")
        path = pathlib.Path(urllib.parse.unquote(parsed.path))
        if not path.is_absolute():
            raise InvalidArgument(f"{uri!r}: the path must be absolute (file:///ABS/DIR)")
        if not path.is_dir():
            raise InvalidArgument(f"{uri!r}: {path} is not a directory on the registry's host")
        return local_adapter_files(path, uri)


def local_adapter_files(path: pathlib.Path, where: str) -> dict[str, pathlib.Path]:
    """The two adapter files in directory `path`; a pickle-only directory gets the conversion hint."""
    files = {name: path / name for name in ADAPTER_FILES}
    for name, p in files.items():
        if not p.is_file():
            pickles = [q.name for q in map(path.joinpath, PICKLE_FILES) if q.is_file()]
            if name != ADAPTER_FILES[0] and pickles:
                raise InvalidAdapter(PICKLE_MESSAGE.format(name=pickles[0]))
            raise InvalidArgument(f"{where}: no {name} there; a PEFT LoRA adapter directory holds "
                                  f"{' and '.join(ADAPTER_FILES)}")
    return files
