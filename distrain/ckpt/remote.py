"""Object storage through fsspec: a checkpoint root given as a URL (``s3://bucket/run``).

:class:`Remote` is one fsspec filesystem plus the policy distrain needs on top of it: whole
objects written and read in one call (fsspec's ``pipe_file``/``cat_file``, which s3fs turns into
parallel multipart uploads and ranged reads), retries with backoff on transient errors within a
deadline, and every failure raised as an ``OSError`` naming the object (so the checkpoint code
handles a full disk and an unreachable store alike). :class:`ObjectPath` is a key under it with
the few ``pathlib`` methods the checkpoint readers use (``/``, ``name``, ``read_bytes``,
``is_file``, ``stat``, ``open``), so a checkpoint is read the same way from a disk or a bucket.

Credentials and endpoint come from the standard variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``) or ``storage_options``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from distrain.errors import ConfigError

T = TypeVar("T")

# The extra that brings each protocol's fsspec implementation, and that library's name.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
LIBRARIES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
# Bounded waits for S3: botocore's own retries are few, ours (with backoff) come on top.
S3_DEFAULTS: dict[str, Any] = {
    "config_kwargs": {"connect_timeout": 5, "read_timeout": 60,
                      "retries": {"max_attempts": 2, "mode": "standard"}},
    "use_listings_cache": False,  # other ranks and hosts write here: never trust a cached listing
}
PART_SIZE = 16 << 20  # multipart chunk: parts of a ~100 MB object upload side by side


def is_url(root: object) -> bool:
    """True for ``proto://...`` strings (``file://`` included); False for plain paths."""
    return isinstance(root, str) and "://" in root and not root.startswith("/")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """``attempts`` tries per operation, sleeping ``base * 2**i`` (jittered) in between, never
    past ``deadline`` seconds from the first try."""

    attempts: int = 4
    base: float = 0.25
    deadline: float = 60.0
    # After a call failed every try, later calls within this many seconds try once: a save
    # that found the store down fails (and cleans up) without retrying every step again.
    cooldown: float = 30.0


class Remote:
    """One fsspec filesystem holding checkpoint objects; every call retried and bounded."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, *,
                 retry: RetryPolicy | None = None) -> None:
        protocol = url.split("://", 1)[0].lower()
        options = dict(storage_options or {})
        if protocol in ("s3", "s3a"):
            options = {**S3_DEFAULTS, **options}
            endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
            if endpoint and "endpoint_url" not in options and "client_kwargs" not in options:
                options["endpoint_url"] = endpoint  # older botocore ignores the variable itself
        try:
            from fsspec.core import url_to_fs

            self.fs, path = url_to_fs(url, **options)
        except ImportError as error:
            extra = EXTRAS.get(protocol)
            library = LIBRARIES.get(protocol, error.name or f"the library for {protocol}://")
            fix = f"pip install 'distrain[{extra}]'" if extra else f"pip install {library}"
            raise ConfigError("checkpoint root", url, f"a URL whose storage library is installed "
                              f"({library} is missing)", fix) from None
        except ValueError as error:
            raise ConfigError("checkpoint root", url, "a local path or an fsspec URL "
                              "(s3://bucket/prefix, gs://, memory://, file://)", str(error)) from None
        self.protocol = protocol
        self.url = url.rstrip("/")
        self.base = str(path).rstrip("/")
        self.retry = retry or RetryPolicy()
        self._down_until = 0.0  # see RetryPolicy.cooldown
        self._keep: Callable[[str], bool] | None = None  # see read_once
        self._kept: dict[str, bytes] = {}

    def key(self, url: str) -> str:
        """The filesystem's own path of ``url`` (a URL under this root, or a bare key)."""
        if "://" in url:
            return self.base + url[len(self.url):] if url.startswith(self.url) else str(
                self.fs._strip_protocol(url))
        return url

    def url_of(self, key: str) -> str:
        return self.url + key[len(self.base):] if key.startswith(self.base) else key

    def call(self, what: str, url: str, op: Callable[[], T]) -> T:
        """``op()``, retried on transient errors; a final failure is an ``OSError`` naming ``url``.
        A missing object is not transient: ``FileNotFoundError`` at once."""
        start = time.monotonic()
        attempts = self.retry.attempts if start >= self._down_until else 1
        for attempt in range(attempts):
            try:
                result = op()
                self._down_until = 0.0
                return result
            except FileNotFoundError:
                raise
            except (ValueError, TypeError, KeyError):
                raise
            except Exception as error:
                delay = self.retry.base * 2**attempt * (0.5 + random.random())
                if attempt == attempts - 1 or time.monotonic() - start + delay > self.retry.deadline:
                    self._down_until = time.monotonic() + self.retry.cooldown
                    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
                    raise OSError(errno.EIO, f"{what} failed after {attempt + 1} tries: {detail}",
                                  url) from error
                time.sleep(delay)  # backoff before the next try of a store call
        raise AssertionError("unreachable")

    # -- objects (URLs in, URLs out) ---------------------------------------------------------

    def put(self, url: str, data: bytes | bytearray) -> None:
        """Upload ``data`` as one object (no copy: the store's client slices it into parts)."""
        key = self.key(url)
        kwargs = {"chunksize": PART_SIZE} if self.protocol in ("s3", "s3a") else {}
        self.call("upload", url, lambda: self.fs.pipe_file(key, data, **kwargs))

    def get(self, url: str) -> bytes:
        kept = self._kept.pop(url, None)
        if kept is not None:
            return kept
        key = self.key(url)
        data: bytes = self.call("download", url, lambda: self.fs.cat_file(key))
        if self._keep is not None and self._keep(url):
            self._kept[url] = data
        return data

    @contextlib.contextmanager
    def read_once(self, keep: Callable[[str], bool]) -> Iterator[None]:
        """Within it, an object whose URL ``keep`` accepts stays in memory after its download and
        its next read is served from there (then dropped): a reader that checks an object's
        digest and then loads it (``distrain ckpt inspect``) downloads it once."""
        self._keep, self._kept = keep, {}
        try:
            yield
        finally:
            self._keep, self._kept = None, {}

    def size(self, url: str) -> int:
        key = self.key(url)
        return int(self.call("stat", url, lambda: self.fs.size(key)))

    def is_file(self, url: str) -> bool:
        key = self.key(url)
        return bool(self.call("stat", url, lambda: self.fs.isfile(key)))

    def is_dir(self, url: str) -> bool:
        key = self.key(url)
        return bool(self.call("list", url, lambda: self.fs.isdir(key)))

    def names(self, url: str) -> list[str]:
        """Names directly under ``url`` (objects and "directories"); [] when there is none."""
        key = self.key(url)
        try:
            found = self.call("list", url, lambda: self.fs.ls(key, detail=False))
        except FileNotFoundError:
            return []
        return sorted({str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in found} - {""})

    def remove(self, url: str, *, recursive: bool = False) -> None:
        key = self.key(url)
        with contextlib.suppress(FileNotFoundError):
            self.call("delete", url, lambda: self.fs.rm(key, recursive=recursive))

    def make_root(self) -> None:
        self.call("create", self.url, lambda: self.fs.makedirs(self.base, exist_ok=True))


class ObjectPath:
    """A key under a :class:`Remote`, read like a ``pathlib.Path`` by the checkpoint readers."""

    __slots__ = ("remote", "url")

    def __init__(self, remote: Remote, url: str) -> None:
        self.remote = remote
        self.url = url.rstrip("/")

    def __truediv__(self, name: str) -> ObjectPath:
        return ObjectPath(self.remote, f"{self.url}/{name}")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ObjectPath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def read_bytes(self) -> bytes:
        return self.remote.get(self.url)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        self.remote.put(self.url, data)

    def open(self, mode: str = "rb") -> io.BytesIO:
        """The whole object in memory (read in parallel parts): ``torch.load`` seeks in it."""
        if mode != "rb":
            raise ValueError(f"ObjectPath.open supports 'rb' only, not {mode!r}")
        return io.BytesIO(self.read_bytes())

    def is_file(self) -> bool:
        return self.remote.is_file(self.url)

    def is_dir(self) -> bool:
        return self.remote.is_dir(self.url)

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def stat(self) -> os.stat_result:
        return os.stat_result((0, 0, 0, 0, 0, 0, self.remote.size(self.url), 0, 0, 0))

    def iterdir(self) -> list[ObjectPath]:
        return [self / name for name in self.remote.names(self.url)]

    def unlink(self, missing_ok: bool = True) -> None:
        self.remote.remove(self.url)
