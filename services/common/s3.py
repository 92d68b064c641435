"""S3-compatible object storage, shared by the registry (blob store, s3:// sources) and executors
(direct blob reads): URL parsing, the content-addressed key layout, and one boto3 client factory.

Endpoint, credentials and region come from boto3's standard chain: AWS_ENDPOINT_URL(_S3),
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE, ~/.aws/config,
AWS_REGION / AWS_DEFAULT_REGION (us-east-1 when none is set).

    bucket, prefix = parse_s3_url("s3://bucket/some/prefix")    # ("bucket", "some/prefix")
    blob_key(prefix, sha)  ->  "some/prefix/sha256/ab/abcdef..."  (the files store's layout too)
"""

from __future__ import annotations

import os
import re

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_HEX = re.compile(r"[0-9a-f]{64}")


def parse_s3_url(url: str) -> tuple[str, str]:
    """"s3://BUCKET[/PREFIX]" -> (bucket, prefix without slashes at either end); ValueError if bad."""
    if not url.startswith("s3://"):
        raise ValueError(f"{url!r} is not s3://BUCKET[/PREFIX]")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"{url!r}: {bucket!r} is not an S3 bucket name (3-63 of a-z 0-9 . -)")
    prefix = prefix.strip("/")
    if ".." in prefix.split("/"):
        raise ValueError(f"{url!r}: the prefix may not contain '..'")
    return bucket, prefix


def join_key(prefix: str, *parts: str) -> str:
    return "/".join(p for p in (prefix, *parts) if p)


def blob_key(prefix: str, sha256: str) -> str:
    """Where the blob with this content lives: PREFIX/sha256/ab/abcdef... (bare lowercase hex)."""
    if not _HEX.fullmatch(sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return join_key(prefix, "sha256", sha256[:2], sha256)


def client(addressing_style: str = "auto", connect_timeout: float = 5.0, read_timeout: float = 60.0,
           max_attempts: int = 3, max_pool: int = 32, *, access_key_id: str = "",
           secret_access_key: str = "", session_token: str = "", endpoint_url: str = "",
           region: str = "", anonymous: bool = False):
    """A boto3 S3 client configured from the environment (see the module docstring); explicit
    keys, endpoint and region (a tenant's) override it, and `anonymous` sends unsigned requests."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    session = boto3.session.Session()
    config = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                    retries={"max_attempts": max_attempts, "mode": "standard"},
                    max_pool_connections=max_pool, s3={"addressing_style": addressing_style},
                    **({"signature_version": UNSIGNED} if anonymous else {}))
    keys = {}
    if access_key_id and not anonymous:
        keys = {"aws_access_key_id": access_key_id, "aws_secret_access_key": secret_access_key,
                "aws_session_token": session_token or None}
    return session.client("s3", region_name=region or session.region_name or "us-east-1",
                          config=config, endpoint_url=endpoint_url or None, **keys)


def is_denied(exc: BaseException) -> bool:
    """True for a botocore ClientError that means "these credentials may not" (403, bad keys)."""
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "Forbidden") or status == 403


def is_missing(exc: BaseException) -> bool:
    """True for a botocore ClientError that means "no such key / bucket"."""
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound") or status == 404
