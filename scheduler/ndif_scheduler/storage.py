"""The object store: requests and results as blobs, by key.

`S3Store` talks to any S3 API (AWS, SeaweedFS, MinIO) through boto3 and hands out
presigned GET URLs, so clients download results straight from the store.
`LocalStore` keeps blobs in a directory for the embedded stack; its download URLs
point at the API's ``/v1/blobs/...`` route and carry an HMAC signature with an
expiry, checked by `LocalStore.verify`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from .config import Settings


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def delete(self, key: str) -> None: ...
    def download_url(self, key: str, ttl_s: float) -> str: ...
    def ping(self) -> None: ...


class MissingObject(KeyError):
    """No blob under this key (never written, or expired and deleted)."""


def request_key(job_id: str) -> str:
    return f"requests/{job_id}"


def result_key(job_id: str) -> str:
    return f"results/{job_id}"


#: A chat job's request starts with this line, then JSON (a trace's request is the wire
#: format); its result is JSON.
CHAT_PREFIX = b"ndif-chat/1\n"


class S3Store:
    """Blobs in an S3 bucket (created on first use if missing)."""

    def __init__(self, settings: Settings) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = settings.s3_bucket

        def client(endpoint: str | None) -> Any:
            return boto3.client(
                "s3",
                endpoint_url=endpoint,
                region_name=settings.s3_region,
                aws_access_key_id=settings.s3_access_key or "ndif",
                aws_secret_access_key=settings.s3_secret_key or "ndif",
                config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, retries={"max_attempts": 5}),
            )

        self.client = client(settings.s3_endpoint)
        # Download URLs are signed for the host clients use (it is part of the signature).
        public = settings.s3_public_endpoint
        self.presigner = client(public) if public and public != settings.s3_endpoint else self.client
        self._ensure_bucket()

    def _ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") not in (
                    "BucketAlreadyOwnedByYou",
                    "BucketAlreadyExists",
                ):
                    raise

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise MissingObject(key) from None
            raise

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def download_url(self, key: str, ttl_s: float) -> str:
        return self.presigner.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=int(ttl_s)
        )

    def ping(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)


class LocalStore:
    """Blobs as files under a directory; downloads through the API with signed URLs."""

    def __init__(self, root: Path, public_url: str, secret: bytes) -> None:
        self.root = root
        self.public_url = public_url.rstrip("/")
        self.secret = secret
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise MissingObject(key)
        return path

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written under another name and renamed: a reader never sees half a blob.
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(temporary, path)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise MissingObject(key) from None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def _signature(self, key: str, expires: int) -> str:
        return hmac.new(self.secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def download_url(self, key: str, ttl_s: float) -> str:
        expires = int(time.time() + ttl_s)
        query = urlencode({"expires": expires, "signature": self._signature(key, expires)})
        return f"{self.public_url}/v1/blobs/{quote(key)}?{query}"

    def verify(self, key: str, expires: int, signature: str) -> bool:
        return expires >= time.time() and hmac.compare_digest(signature, self._signature(key, expires))

    def ping(self) -> None:
        if not self.root.is_dir():
            raise OSError(f"{self.root} is not a directory")


def open_store(settings: Settings) -> ObjectStore:
    """The store the settings name: S3 when ``s3_endpoint`` is set, else a local directory."""
    if settings.s3_endpoint:
        return S3Store(settings)
    return LocalStore(settings.state_dir / "objects", settings.public_url, settings.secret)
