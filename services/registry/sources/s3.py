"""s3://BUCKET/PREFIX: a PEFT adapter's two files as objects PREFIX/adapter_config.json and
PREFIX/adapter_model.safetensors in S3-compatible storage.

Credentials: a tenant's own from the auth file's "tenants" (s3_access_key_id/secret/session token,
s3_endpoint_url, s3_region; none -> unsigned, anonymous requests: a tenant never borrows the
registry's credentials, which may reach its blob bucket); admins, open registries and on-demand
imports use the standard AWS environment variables (see services/common/s3.py)."""

from __future__ import annotations

import pathlib
import threading

from services.common import s3
from services.common.errors import InvalidAdapter, InvalidArgument, NotFound, PermissionDenied, Unavailable
from services.common.peft_format import ADAPTER_FILES, CONFIG_FILE, PICKLE_FILES, PICKLE_MESSAGE


class S3Source:
    def __init__(self, addressing_style: str = "auto"):
        self._addressing_style = addressing_style
        self._client = None
        self._tenant_clients: dict = {}          # SourceCredentials -> client
        self._lock = threading.Lock()

    @property
    def client(self):
        if self._client is None:
            self._client = s3.client(self._addressing_style, connect_timeout=3.0,
                                     read_timeout=10.0, max_attempts=2)
        return self._client

    def client_for(self, credentials):
        if credentials is None:
            return self.client
        with self._lock:
            c = self._tenant_clients.get(credentials)
            if c is None:
                if len(self._tenant_clients) > 256:
                    self._tenant_clients.clear()
                c = self._tenant_clients[credentials] = s3.client(
                    self._addressing_style, connect_timeout=3.0, read_timeout=10.0, max_attempts=2,
                    access_key_id=credentials.s3_access_key_id,
                    secret_access_key=credentials.s3_secret_access_key,
                    session_token=credentials.s3_session_token,
                    endpoint_url=credentials.s3_endpoint_url, region=credentials.s3_region,
                    anonymous=not credentials.s3_access_key_id)
            return c

    def fetch(self, uri: str, workdir: pathlib.Path, credentials=None) -> dict[str, pathlib.Path]:
        client = self.client_for(credentials)
        try:
            bucket, prefix = s3.parse_s3_url(uri)
        except ValueError as exc:
            raise InvalidArgument(f"{exc}; expected s3://BUCKET/PREFIX") from None
        out: dict[str, pathlib.Path] = {}
        for name in ADAPTER_FILES:
            key = s3.join_key(prefix, name)
            dest = workdir / name
            try:
                client.download_file(bucket, key, str(dest))
            except Exception as exc:
                if s3.is_denied(exc):
                    whose = ("the registry's" if credentials is None else "the tenant's own"
                             if credentials.s3_access_key_id else "none: the tenant has no s3_* keys")
                    raise PermissionDenied(f"{uri}: s3://{bucket}/{key} refused the credentials "
                                           f"({whose}); an operator sets a tenant's s3_access_key_id, "
                                           "s3_secret_access_key and s3_endpoint_url in the auth "
                                           "file's \"tenants\"") from None
                if not s3.is_missing(exc):
                    raise Unavailable(f"{uri}: cannot read s3://{bucket}/{key} "
                                      f"({type(exc).__name__}: {exc}); check the endpoint, "
                                      "the credentials and the bucket") from None
                if name != CONFIG_FILE and self._exists(client, bucket, s3.join_key(prefix, PICKLE_FILES[0])):
                    raise InvalidAdapter(PICKLE_MESSAGE.format(name=PICKLE_FILES[0])) from None
                raise NotFound(f"{uri}: no s3://{bucket}/{key}; a PEFT LoRA adapter there holds "
                               f"{' and '.join(ADAPTER_FILES)}") from None
            out[name] = dest
        return out

    @staticmethod
    def _exists(client, bucket: str, key: str) -> bool:
        try:
            client.head_object(Bucket=bucket, Key=key)
            return True
        except Exception:
            return False
