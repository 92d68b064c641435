"""s3://BUCKET/PREFIX: a PEFT adapter's two files as objects PREFIX/adapter_config.json and
PREFIX/adapter_model.safetensors in S3-compatible storage (endpoint and credentials from the
standard AWS environment variables; see services/common/s3.py)."""

from __future__ import annotations

import pathlib

from services.common import s3
from services.common.errors import InvalidAdapter, InvalidArgument, NotFound, Unavailable
from services.common.peft_format import ADAPTER_FILES, CONFIG_FILE, PICKLE_FILES, PICKLE_MESSAGE


class S3Source:
    def __init__(self, addressing_style: str = "auto"):
        self._addressing_style = addressing_style
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = s3.client(self._addressing_style, connect_timeout=3.0,
                                     read_timeout=10.0, max_attempts=2)
        return self._client

    def fetch(self, uri: str, workdir: pathlib.Path) -> dict[str, pathlib.Path]:
        try:
            bucket, prefix = s3.parse_s3_url(uri)
        except ValueError as exc:
            raise InvalidArgument(f"{exc}; expected s3://BUCKET/PREFIX") from None
        out: dict[str, pathlib.Path] = {}
        for name in ADAPTER_FILES:
            key = s3.join_key(prefix, name)
            dest = workdir / name
            try:
                self.client.download_file(bucket, key, str(dest))
            except Exception as exc:
                if not s3.is_missing(exc):
                    raise Unavailable(f"{uri}: cannot read s3://{bucket}/{key} "
                                      f"({type(exc).__name__}: {exc}); check AWS_ENDPOINT_URL, "
                                      "the credentials and the bucket") from None
                if name != CONFIG_FILE and self._exists(bucket, s3.join_key(prefix, PICKLE_FILES[0])):
                    raise InvalidAdapter(PICKLE_MESSAGE.format(name=PICKLE_FILES[0])) from None
                raise NotFound(f"{uri}: no s3://{bucket}/{key}; a PEFT LoRA adapter there holds "
                               f"{' and '.join(ADAPTER_FILES)}") from None
            out[name] = dest
        return out

    def _exists(self, bucket: str, key: str) -> bool:
        try:
            self.client.head_object(Bucket=bucket, Key=key)
            return True
        except Exception:
            return False
