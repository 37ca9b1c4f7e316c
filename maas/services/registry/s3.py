"""Artifact bytes in an S3 bucket: any store that speaks the S3 API (AWS, GCS's
interoperability endpoint, MinIO, Ceph), so that registry replicas keep no state of their
own and any of them serves what another stored.

Layout under the configured prefix: `blobs/<sha[:2]>/<sha>` for stored blobs, and
`uploads/<random>` while an upload of unknown digest is in flight. Configuration is
boto3's: credentials and region from the standard AWS variables (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, profiles, instance roles), the endpoint from
`AWS_ENDPOINT_URL` or the registry's `--s3-endpoint`.

- **Uploads stream.** Bytes are buffered up to one part (8 MiB by default) and sent as the
  parts of a multipart upload, so an upload of any size holds one part in memory. A blob
  smaller than one part is a single PUT. The digest is known only at the end: the upload
  lands under `uploads/`, and commit copies it to its name inside the store (a server-side
  copy, no bytes through the registry) and deletes the temporary one. A digest that does
  not match what the client claimed aborts it: nothing is kept.
- **Downloads verify.** Reads hash what they stream and raise `DataLoss` at the end if the
  bytes no longer match their name, as the local store does.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from typing import Any

from maas.mesh.artifacts import CHUNK, check_digest
from maas.mesh.errors import InvalidArgument, NotFound, StartupError
from maas.services.registry.blobs import BlobWriter, DataLoss

PART = 8 * 1024 * 1024  # bytes per part of a multipart upload (S3's minimum is 5 MiB, except the last)


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, key prefix ending in "/" or empty) of `s3://bucket[/prefix]`."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def _missing(error: Exception) -> bool:
    code = str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


class _S3Writer:
    def __init__(self, store: S3BlobStore) -> None:
        self.store = store
        self._key = f"{store.prefix}uploads/{secrets.token_hex(16)}"
        self._hash = hashlib.sha256()
        self._size = 0
        self._buffer = bytearray()
        self._upload_id = ""
        self._parts: list[dict[str, Any]] = []

    def write(self, data: bytes) -> None:
        self._hash.update(data)
        self._size += len(data)
        self._buffer += data
        while len(self._buffer) >= self.store.part_bytes:
            self._send(bytes(self._buffer[:self.store.part_bytes]))
            del self._buffer[:self.store.part_bytes]

    def _send(self, part: bytes) -> None:
        client, bucket = self.store.client, self.store.bucket
        if not self._upload_id:
            self._upload_id = client.create_multipart_upload(Bucket=bucket, Key=self._key)["UploadId"]
        number = len(self._parts) + 1
        sent = client.upload_part(Bucket=bucket, Key=self._key, UploadId=self._upload_id, PartNumber=number,
                                  Body=part)
        self._parts.append({"PartNumber": number, "ETag": sent["ETag"]})

    def commit(self, expected_sha: str = "") -> tuple[str, int]:
        sha = self._hash.hexdigest()
        if expected_sha and expected_sha != sha:
            self.abort()
            raise InvalidArgument(f"upload hashes to sha256 {sha}, not the {expected_sha} the client sent; "
                                  "nothing was stored", field="sha256")
        client, bucket, dest = self.store.client, self.store.bucket, self.store.key(sha)
        if not self._upload_id:  # smaller than a part: one PUT, straight to its name
            client.put_object(Bucket=bucket, Key=dest, Body=bytes(self._buffer))
            return sha, self._size
        if self._buffer:
            self._send(bytes(self._buffer))
            self._buffer.clear()
        client.complete_multipart_upload(Bucket=bucket, Key=self._key, UploadId=self._upload_id,
                                         MultipartUpload={"Parts": self._parts})
        self._upload_id = ""
        try:
            client.copy({"Bucket": bucket, "Key": self._key}, bucket, dest)  # multipart copy when large
        finally:
            client.delete_object(Bucket=bucket, Key=self._key)
        return sha, self._size

    def abort(self) -> None:
        if self._upload_id:
            upload_id, self._upload_id = self._upload_id, ""
            self.store.client.abort_multipart_upload(Bucket=self.store.bucket, Key=self._key, UploadId=upload_id)
        self._buffer.clear()


class S3BlobStore:
    """A `BlobStore` in an S3 bucket (see the module's docstring)."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 client: Any = None, part_bytes: int = PART) -> None:
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.client("s3", endpoint_url=endpoint_url or None,
                                  config=Config(retries={"max_attempts": 5, "mode": "standard"}))
        self.client, self.bucket, self.prefix, self.part_bytes = client, bucket, prefix, part_bytes

    @classmethod
    def from_url(cls, url: str, *, endpoint_url: str | None = None) -> S3BlobStore:
        bucket, prefix = parse_url(url)
        return cls(bucket, prefix, endpoint_url=endpoint_url)

    def check(self) -> None:
        """Refuse to start on a bucket that cannot be reached, naming it and why."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            raise StartupError(f"the artifact store s3://{self.bucket}/{self.prefix} cannot be used: {e} "
                               "(credentials and region come from the AWS_* variables, the endpoint from "
                               "AWS_ENDPOINT_URL or --s3-endpoint)") from None

    def key(self, sha: str) -> str:
        return f"{self.prefix}blobs/{check_digest(sha)[:2]}/{sha}"

    def writer(self) -> BlobWriter:
        return _S3Writer(self)

    def size(self, sha: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self.key(sha))["ContentLength"])
        except Exception as e:
            if _missing(e):
                raise NotFound(f"artifact {sha} does not exist") from None
            raise

    def delete(self, sha: str) -> int:
        """Remove a blob; the bytes freed. NotFound if there is none."""
        size = self.size(sha)
        self.client.delete_object(Bucket=self.bucket, Key=self.key(sha))
        return size

    def read(self, sha: str) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(sha))["Body"]
        except Exception as e:
            if _missing(e):
                raise NotFound(f"artifact {sha} does not exist") from None
            raise
        digest = hashlib.sha256()
        try:
            for chunk in body.iter_chunks(CHUNK):
                digest.update(chunk)
                yield chunk
        finally:
            body.close()
        if digest.hexdigest() != sha:
            raise DataLoss(f"artifact {sha} is corrupted in the registry's store (its bytes hash to "
                           f"{digest.hexdigest()}); re-upload it")
