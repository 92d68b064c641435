"""file:///ABS/DIR: a PEFT adapter directory on the registry's own filesystem."""

from __future__ import annotations

import os
import pathlib
import urllib.parse

from services.common import auth
from services.common.errors import InvalidAdapter, InvalidArgument, PermissionDenied
from services.common.peft_format import ADAPTER_FILES, PICKLE_FILES, PICKLE_MESSAGE


class FileSource:
    """`allowed_dirs`: the only trees file:// may read (--allow-local-dir). Empty: any directory
    for admins (and on an open registry), none for tenants and services."""

    def __init__(self, allowed_dirs=()):
        self.allowed_dirs = [pathlib.Path(os.path.realpath(d)) for d in allowed_dirs]

    def fetch(self, uri: str, workdir: pathlib.Path, credentials=None) -> dict[str, pathlib.Path]:
        try:
            parsed = urllib.parse.urlparse(uri)
        except ValueError as exc:                            # "file://h[/x": Invalid IPv6 URL
            raise InvalidArgument(f"{uri!r} is not a file:///ABS/DIR URI: {exc}") from None
        if parsed.netloc not in ("", "localhost"):
            raise InvalidArgument(f"{uri!r}: file:// URIs name a local path: file:///ABS/DIR")
        path = pathlib.Path(urllib.parse.unquote(parsed.path))
        if "\0" in str(path):
            raise InvalidArgument(f"{uri!r}: a path has no NUL characters")
        if not path.is_absolute():
            raise InvalidArgument(f"{uri!r}: the path must be absolute (file:///ABS/DIR)")
        path = self._allowed(path, uri)
        if not path.is_dir():
            raise InvalidArgument(f"{uri!r}: {path} is not a directory on the registry's host")
        # each file resolved and checked again: a symlinked file must not lead out either
        return {name: self._allowed(p, uri) for name, p in local_adapter_files(path, uri).items()}

    def _allowed(self, path: pathlib.Path, uri: str) -> pathlib.Path:
        """`path` with symlinks and '..' resolved, if it lies under an allowed directory."""
        real = pathlib.Path(os.path.realpath(path))
        if not self.allowed_dirs:
            if auth.current().role == "admin":
                return real
            raise PermissionDenied(f"{uri!r}: this registry reads no local directory for "
                                   "tenants (an operator allows some with --allow-local-dir); "
                                   "upload the adapter instead (UploadAdapter)")
        if any(real == d or real.is_relative_to(d) for d in self.allowed_dirs):
            return real
        raise PermissionDenied(f"{uri!r}: {real} is outside the directories this registry may read "
                               f"(--allow-local-dir: {', '.join(map(str, self.allowed_dirs))})")


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
