"""Opening shard URLs: local paths, ``file://``, and any fsspec protocol (``s3://``, ``gs://``...).

WebDataset 1.0 has no fsspec integration (its ``gopen`` table knows pipes, curl and gsutil), so
we register one fsspec handler for the object-store schemes in ``webdataset.gopen.gopen_schemes``.
Both our reader and any plain ``wds.WebDataset`` then open ``s3://bucket/prefix/shard.tar``.

Credentials come from the standard environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_PROFILE``...), the endpoint from ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` and the region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION``; a recipe's
``data.params.storage_options`` (fsspec's keyword arguments, e.g. ``{"client_kwargs":
{"endpoint_url": ...}}``, ``key``/``secret``) overrides them. Nothing here prints an option value
without passing it through ``redact``, and ``redact_recipe`` is what a run directory records.

Object stores fail transiently (a dropped connection, a 503, a server restarting). ``Retry``
retries such errors with exponential backoff until its time budget is spent, and a shard opened
through fsspec is a ``ResumableFile``: a read that fails mid-shard reopens the object and
continues at the same byte offset, so a restart costs time, not samples. Errors that retrying
cannot fix (missing object or bucket, denied access, bad credentials) propagate at once.
"""
from __future__ import annotations

import copy
import errno
import importlib
import io
import logging
import os
import time
from typing import Any, BinaryIO, Callable, Mapping, Optional, TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

import attrs

from mfrecipes.errors import DataError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Schemes routed through fsspec (the backend package must be installed: s3fs, gcsfs, adlfs...).
FSSPEC_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory", "hdfs")

# A mapping key is secret when one of its words (split at "_", "-", "." and camelCase) is one of
# these or ends in key/secret/token/password ("accessKey", "aws_secret_access_key", "apikey").
_SECRET_WORDS = frozenset(("key", "secret", "token", "password", "passwd", "credential",
                           "credentials", "session", "sas", "auth", "authorization", "cookie"))
_SECRET_ENDINGS = ("key", "secret", "token", "password")
# Recipe paths whose key merely looks secret: the shards' ``key`` names a sample's member file
# (``latent.npy``). Anywhere else, ``key`` is treated as a credential.
NOT_SECRET_PATHS = frozenset({("data", "params", "key")})
REDACTED = "***"
_seen_secrets: set[str] = set()


def is_secret_key(name: Any) -> bool:
    """Whether a mapping key looks like it holds a secret (``key``, ``secret``, ``token``...)."""
    import re

    words = re.split(r"[^0-9a-zA-Z]+|(?<=[a-z0-9])(?=[A-Z])", str(name))
    return any(w.lower() in _SECRET_WORDS or w.lower().endswith(_SECRET_ENDINGS)
               for w in words if w)


def _remember(value: Any) -> None:
    """Keep the text of a redacted value so that ``scrub`` can hide it in any message."""
    if isinstance(value, Mapping):
        for v in value.values():
            _remember(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _remember(v)
    elif value is not None and not isinstance(value, bool) and len(str(value)) >= 4 \
            and str(value) != REDACTED:
        _seen_secrets.add(str(value))


def redact(options: Any, _path: tuple = (), _exempt: frozenset = frozenset()) -> Any:
    """A copy of ``options`` safe to print or record: the value under every secret-looking key,
    at any depth, becomes ``***`` (and is remembered for ``scrub``)."""
    if isinstance(options, Mapping):
        out = {}
        for k, v in options.items():
            path = (*_path, str(k))
            if is_secret_key(k) and v is not None and path not in _exempt:
                _remember(v)
                out[k] = REDACTED
            else:
                out[k] = redact(v, path, _exempt)
        return out
    if isinstance(options, (list, tuple)):
        return type(options)(redact(v, _path, _exempt) for v in options)
    return options


def redact_recipe(resolved: Mapping) -> dict:
    """A copy of a recipe mapping with every secret-looking value redacted, at any depth.

    This is what every record of a run directory holds (``recipe.resolved.yaml``, the history)
    and what messages show: credentials given in a recipe or an override, also inside a whole
    block (``data={...}``), never reach the disk.
    """
    return redact(copy.deepcopy(dict(resolved)), (), NOT_SECRET_PATHS)


def drop_redacted(data: Any, _path: tuple = ()) -> tuple[Any, list[str]]:
    """A copy of ``data`` without the mapping entries whose value is ``***`` (at any depth),
    and their dotted key paths. A resumed run reads its recipe from a redacted record: what was
    a credential there is dropped, so the client falls back to its own environment
    (``AWS_ACCESS_KEY_ID``..., fsspec's defaults) and ``***`` is never sent as a credential."""
    dropped: list[str] = []
    if isinstance(data, Mapping):
        out = {}
        for k, v in data.items():
            path = (*_path, str(k))
            if isinstance(v, str) and v == REDACTED:
                dropped.append(".".join(path))
                continue
            out[k], more = drop_redacted(v, path)
            dropped += more
        return out, dropped
    if isinstance(data, list):
        out_list = []
        for i, v in enumerate(data):
            item, more = drop_redacted(v, (*_path, f"[{i}]"))
            out_list.append(item)
            dropped += more
        return out_list, dropped
    return data, dropped


def scrub(text: str) -> str:
    """``text`` with every secret value redaction has seen replaced by ``***``."""
    for secret in sorted(_seen_secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def scheme(url: str) -> str:
    return urlparse(url).scheme


def local_path(url: str) -> str | None:
    """The filesystem path of a local URL (plain path or ``file://``), else None."""
    pr = urlparse(url)
    if pr.scheme == "":
        return url
    if pr.scheme == "file":
        return url2pathname(pr.path)
    if len(pr.scheme) == 1:  # a Windows drive letter, "C:\\..."
        return url
    return None


def env_storage_options(protocol: str) -> dict:
    """Storage options implied by the standard environment (the S3 endpoint only).

    botocore reads the credentials and the region from the environment itself.
    """
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def merged_storage_options(protocol: str, options: Mapping | None) -> dict:
    """Environment defaults overridden by explicit ``options`` (``client_kwargs`` merged)."""
    out = env_storage_options(protocol)
    options, _ = drop_redacted(dict(options or {}))  # a redacted record never logs anyone in
    for k, v in options.items():
        if k == "client_kwargs" and isinstance(v, Mapping):
            out["client_kwargs"] = {**out.get("client_kwargs", {}), **v}
        else:
            out[k] = copy.deepcopy(v)
    return out


# -- transient errors ----------------------------------------------------------------------------
class ObjectChanged(OSError):
    """A remote object was rewritten while being read; retrying cannot help."""


_PERMANENT_OS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                 FileExistsError, ObjectChanged)
# OSError numbers s3fs gives to requests that will fail the same way again (400-class answers).
_PERMANENT_ERRNO = {errno.EINVAL, errno.ENAMETOOLONG, errno.ENOSYS, errno.EMSGSIZE, errno.EPERM,
                    errno.ENOTEMPTY}
# botocore/aiobotocore exception classes that mean "the connection failed, try again".
_TRANSIENT_BOTO = {"ConnectionError", "HTTPClientError", "EndpointConnectionError",
                   "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                   "ResponseStreamingError", "IncompleteReadError", "ProxyConnectionError"}


def is_transient(err: BaseException) -> bool:
    """Whether retrying might help: dropped connections, timeouts, 5xx answers, stale handles."""
    if isinstance(err, _PERMANENT_OS):
        return False
    if isinstance(err, (TimeoutError, ConnectionError)):
        return True
    if isinstance(err, OSError):
        return err.errno not in _PERMANENT_ERRNO
    for cls in type(err).__mro__:
        top = cls.__module__.split(".", 1)[0]
        if top in ("botocore", "aiobotocore") and cls.__name__ in _TRANSIENT_BOTO:
            return True
        if top in ("aiohttp", "urllib3", "http") and cls.__name__ in (
                "ClientError", "HTTPError", "HTTPException"):
            return True
    return False


@attrs.frozen
class Retry:
    """Retry transient errors with exponential backoff until ``timeout_s`` has passed.

    Waits ``backoff_s``, then twice as long each time, at most ``max_backoff_s``; the budget
    counts from the first failure, so an outage shorter than ``timeout_s`` is survived however
    many attempts it takes.
    """

    timeout_s: float = attrs.field(default=120.0, validator=attrs.validators.ge(0))
    backoff_s: float = attrs.field(default=0.5, validator=attrs.validators.gt(0))
    max_backoff_s: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))

    def call(self, fn: Callable[[], T], what: str, *,
             on_retry: Optional[Callable[[], None]] = None) -> T:
        """``fn()``, retried on transient errors; the last one propagates past the budget."""
        first = None
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as err:
                now = time.monotonic()
                first = now if first is None else first
                if not is_transient(err) or now - first >= self.timeout_s:
                    raise
                delay = min(self.backoff_s * 2 ** attempt, self.max_backoff_s,
                            max(self.timeout_s - (now - first), 0.0))
                attempt += 1
                log.warning("%s failed (%s: %s); retry %d in %.1f s (gives up %.0f s after "
                            "the first failure)", what, type(err).__name__, err, attempt, delay,
                            self.timeout_s)
                time.sleep(delay)
                if on_retry is not None:
                    on_retry()


def unreachable(url: str, err: BaseException, retry: Retry) -> DataError:
    return DataError(f"still failing after retrying for {retry.timeout_s:.0f} s: "
                     f"{type(err).__name__}: {err}; check the endpoint and the network, or "
                     f"raise data.params.retry_timeout_s", path=url)


# -- opening ------------------------------------------------------------------------------------
def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, *,
                 storage_options: Mapping | None = None, **_: Any) -> BinaryIO:
    """``webdataset.gopen`` handler: open ``url`` through fsspec (s3fs for ``s3://``...)."""
    import fsspec

    opts = merged_storage_options(scheme(url), storage_options)
    return fsspec.open(url, mode, **opts).open()


def register_fsspec_handlers(schemes: tuple[str, ...] = FSSPEC_SCHEMES) -> None:
    """Route ``schemes`` in WebDataset's gopen table through fsspec (idempotent)."""
    table = _gopen_module().gopen_schemes
    for s in schemes:
        table[s] = gopen_fsspec


def _gopen_module():
    # The module: the attribute ``webdataset.gopen`` is the function of the same name.
    return importlib.import_module("webdataset.gopen")


def known_schemes() -> list[str]:
    table = _gopen_module().gopen_schemes
    return sorted(["file", *(k for k in table if not k.startswith("__"))])


class ResumableFile(io.RawIOBase):
    """A read-only fsspec file that survives transient errors by reopening at its offset.

    If the object changes size between two opens (it was rewritten), reading fails with an
    ``OSError`` that is not retried: the caller skips the shard and counts it.
    """

    def __init__(self, url: str, storage_options: Mapping | None, retry: Retry):
        super().__init__()
        self.url, self._opts, self._retry = url, storage_options, retry
        self._pos = 0
        self._f = retry.call(self._open_raw, f"opening {url}")
        self._size = getattr(self._f, "size", None)

    def _open_raw(self):
        return gopen_fsspec(self.url, "rb", storage_options=self._opts)

    def _reopen(self) -> None:
        try:
            self._f.close()
        except Exception:  # the old handle is already broken
            pass
        f = self._open_raw()
        size = getattr(f, "size", None)
        if self._size is not None and size is not None and size != self._size:
            f.close()
            raise ObjectChanged(f"{self.url} changed size while being read ({self._size} -> "
                                f"{size} bytes)")
        f.seek(self._pos)
        self._f = f

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        broken = False

        def attempt() -> bytes:
            nonlocal broken
            if broken:
                self._reopen()
            try:
                return self._f.read(n)
            except Exception:
                broken = True
                raise

        try:
            data = self._retry.call(attempt, f"reading {self.url} at byte {self._pos}")
        except Exception as err:
            if is_transient(err):
                raise unreachable(self.url, err, self._retry) from err
            raise
        self._pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            try:
                self._f.close()
            finally:
                super().close()


def open_url(url: str, *, storage_options: Mapping | None = None,
             retry: Retry = Retry()) -> BinaryIO:
    """Open a shard or manifest for reading, retrying transient errors (see ``Retry``).

    fsspec URLs give a ``ResumableFile``. ``FileNotFoundError`` and ``PermissionError`` propagate
    at once; an unknown scheme raises ``ValueError`` (from WebDataset's gopen); a transient error
    that outlasts the retry budget becomes a ``DataError`` naming the URL.
    """
    register_fsspec_handlers()
    if scheme(url) in FSSPEC_SCHEMES:
        try:
            return ResumableFile(url, storage_options, retry)
        except Exception as err:
            if is_transient(err):
                raise unreachable(url, err, retry) from err
            raise
    gopen = _gopen_module().gopen
    try:
        return retry.call(lambda: gopen(url, "rb"), f"opening {url}")
    except Exception as err:
        if is_transient(err):
            raise unreachable(url, err, retry) from err
        raise


def missing_message(url: str, storage_options: Mapping | None) -> str:
    """Why ``url`` was not found: its bucket is missing, or only the object is."""
    pr = urlparse(url)
    if pr.scheme not in FSSPEC_SCHEMES or not pr.netloc:
        return "not found"
    try:
        import fsspec

        fs = fsspec.filesystem(pr.scheme, **merged_storage_options(pr.scheme, storage_options))
        bucket_there = fs.exists(pr.netloc)
    except Exception:  # cannot tell: say what is certain
        return "not found"
    if not bucket_there:
        return (f"bucket {pr.netloc!r} does not exist (or is not visible with these "
                f"credentials)")
    return f"not found (bucket {pr.netloc!r} exists; check the key prefix and the pattern)"
