"""Where shards live: a local folder or an S3-compatible object store (`s3://bucket/prefix`), behind one interface —
read the index, read a byte range of a shard, list what is there, put a finished file.

S3 goes through boto3. Its endpoint is `endpoint_url` when given, else boto3's own resolution: the AWS_ENDPOINT_URL
(or AWS_ENDPOINT_URL_S3) variable, then ~/.aws/config, then AWS itself; credentials likewise come from boto3's chain
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, an instance role). Every failure a user can fix — a server
that does not answer, a bucket or key that does not exist, access denied — is a DataError naming the URL and the fix.
A client is made once per process (loader workers are forked, and boto3 clients must not cross a fork).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from pipeline.data.errors import DataError

INDEX = "dataset.json"  # the index the converter writes last, beside the shards
CONNECT_TIMEOUT_S = 5  # an endpoint that does not answer fails the run in seconds, not after boto3's 60 s
READ_TIMEOUT_S = 60
ATTEMPTS = 3  # boto3's retries of a throttled or dropped request


class _Limited(io.RawIOBase):
    """The bytes of an open file from its position up to `length` more: tarfile's stream mode reads a shard's byte
    range from it like a whole archive."""

    def __init__(self, file: BinaryIO, length: int | None) -> None:
        self.file, self.left = file, length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)
        want = len(view) if self.left is None else min(len(view), self.left)
        data = self.file.read(want)
        view[: len(data)] = data
        if self.left is not None:
            self.left -= len(data)
        return len(data)

    def close(self) -> None:
        self.file.close()
        super().close()


@dataclass(frozen=True)
class Store:
    """A local folder (`url` a path or file://) or an S3 prefix (`url` s3://bucket/prefix)."""

    url: str
    endpoint_url: str | None = None

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")

    @property
    def folder(self) -> Path:
        return Path(self.url.removeprefix("file://")).expanduser()

    @property
    def bucket_and_prefix(self) -> tuple[str, str]:
        parsed = urlparse(self.url)
        prefix = parsed.path.strip("/")
        return parsed.netloc, f"{prefix}/" if prefix else ""

    def where(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/{name}"

    # --- reading --------------------------------------------------------------------------------------------------
    def read_bytes(self, name: str) -> bytes:
        with self.open_range(name, 0, None) as stream:
            return stream.read()

    def read_json(self, name: str) -> Any:
        data = self.read_bytes(name)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(
                f"{self.where(name)} is not a shard index ({error}): point data.url at a folder or s3:// prefix that "
                "`python -m pipeline.shard` wrote."
            ) from error

    def open_range(self, name: str, start: int, stop: int | None) -> BinaryIO:
        """The bytes [start, stop) of object `name` (stop None: to its end), as a stream read once, front to back."""
        if not self.is_s3:
            path = self.folder / name
            try:
                file = path.open("rb")
            except OSError as error:
                raise DataError(f"{path}: cannot be read ({error.strerror}). {self._advice()}") from error
            file.seek(start)
            return io.BufferedReader(_Limited(file, None if stop is None else stop - start), buffer_size=1 << 20)
        bucket, prefix = self.bucket_and_prefix
        wanted = f"bytes={start}-" + ("" if stop is None else str(stop - 1))
        response = self._call("get_object", name, Bucket=bucket, Key=prefix + name, Range=wanted)
        return response["Body"]

    def sizes(self) -> dict[str, int]:
        """Every object under the store (its name relative to the prefix) and its size in bytes."""
        if not self.is_s3:
            if not self.folder.is_dir():
                raise DataError(f"data.url={self.url}: no such folder. {self._advice()}")
            return {path.name: path.stat().st_size for path in self.folder.iterdir() if path.is_file()}
        bucket, prefix = self.bucket_and_prefix
        found: dict[str, int] = {}
        token: dict[str, str] = {}
        while True:
            page = self._call("list_objects_v2", "", Bucket=bucket, Prefix=prefix, **token)
            found.update({item["Key"][len(prefix) :]: int(item["Size"]) for item in page.get("Contents", [])})
            if not page.get("IsTruncated"):
                return found
            token = {"ContinuationToken": page["NextContinuationToken"]}

    # --- writing (the converter) ----------------------------------------------------------------------------------
    def put_file(self, name: str, path: Path) -> None:
        if not self.is_s3:
            self.folder.mkdir(parents=True, exist_ok=True)
            if path != self.folder / name:
                os.replace(path, self.folder / name)
            return
        bucket, prefix = self.bucket_and_prefix
        try:
            client(self.endpoint_url).upload_file(str(path), bucket, prefix + name)
        except Exception as error:
            raise self._explained(error, name) from error

    # --- S3 -------------------------------------------------------------------------------------------------------
    def _call(self, method: str, name: str, **kwargs: Any) -> Any:
        try:
            return getattr(client(self.endpoint_url), method)(**kwargs)
        except Exception as error:
            raise self._explained(error, name) from error

    def _advice(self) -> str:
        return (
            "Point data.url at the folder or s3://bucket/prefix that `python -m pipeline.shard` wrote "
            f"(it holds {INDEX} and the .tar shards)."
        )

    def _explained(self, error: Exception, name: str) -> DataError:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = self.where(name) if name else self.url
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or "AWS's default endpoint"
        if isinstance(error, EndpointConnectionError):
            return DataError(
                f"{where}: the S3 endpoint {endpoint} does not answer ({error}). Start the server, or set the right "
                "endpoint with data.endpoint_url=http://host:port (or AWS_ENDPOINT_URL)."
            )
        if isinstance(error, NoCredentialsError):
            return DataError(
                f"{where}: no S3 credentials. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile)."
            )
        if isinstance(error, ClientError):
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                return DataError(f"{where}: no such object. {self._advice()}")
            if code == "NoSuchBucket":
                return DataError(f"{where}: no such bucket at {endpoint}. {self._advice()}")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return DataError(f"{where}: access denied ({code}). Check the S3 credentials and the bucket's policy.")
            return DataError(f"{where}: the S3 server refused the request ({code}: {error}).")
        return DataError(f"{where}: cannot be read from {endpoint} ({type(error).__name__}: {error}).")


_clients: dict[tuple[int, str | None], Any] = {}


def client(endpoint_url: str | None) -> Any:
    """This process's boto3 S3 client for `endpoint_url` (None: boto3's resolution, AWS_ENDPOINT_URL first)."""
    key = (os.getpid(), endpoint_url)
    if key not in _clients:
        import boto3
        from botocore.config import Config

        config = Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            retries={"max_attempts": ATTEMPTS, "mode": "standard"},
        )
        _clients[key] = boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)
    return _clients[key]


def check_url(url: str) -> None:
    """Refuse a URL scheme the store cannot read, before anything is fetched."""
    scheme = urlparse(url).scheme
    if scheme not in ("", "file", "s3") or (scheme == "s3" and not urlparse(url).netloc):
        raise DataError(
            f"data.url={url}: must be a folder or s3://bucket/prefix (e.g. data.url=s3://my-bucket/digits-shards)."
        )
