"""Opening shard URLs: local paths, ``file://``, and any fsspec protocol (``s3://``, ``gs://``...).

WebDataset 1.0 has no fsspec integration (its ``gopen`` table knows pipes, curl and gsutil), so
we register one fsspec handler for the object-store schemes in ``webdataset.gopen.gopen_schemes``.
Both our reader and any plain ``wds.WebDataset`` then open ``s3://bucket/prefix/shard.tar``.

Credentials come from the standard environment (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``...), the
endpoint from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` or from a recipe's
``storage_options`` (fsspec's keyword arguments, e.g. ``{"client_kwargs": {"endpoint_url": ...}}``).
Nothing here prints an option value without passing it through ``redact``. s3fs and the other
backends are imported by fsspec only when such a URL is opened.
"""
from __future__ import annotations

import copy
import importlib
import logging
import os
import time
from typing import Any, BinaryIO, Mapping
from urllib.parse import urlparse
from urllib.request import url2pathname

log = logging.getLogger(__name__)

# Schemes routed through fsspec (the backend package must be installed: s3fs, gcsfs, adlfs...).
FSSPEC_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory", "hdfs")

_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "session", "sas")


def redact(options: Any) -> Any:
    """A copy of ``options`` safe to print: values under secret-looking keys become ``***``."""
    if isinstance(options, Mapping):
        return {k: ("***" if any(w in str(k).lower() for w in _SECRET_WORDS) and v is not None
                    else redact(v)) for k, v in options.items()}
    if isinstance(options, (list, tuple)):
        return type(options)(redact(v) for v in options)
    return options


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
    """Storage options implied by the standard environment (the S3 endpoint only)."""
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def merged_storage_options(protocol: str, options: Mapping | None) -> dict:
    """Environment defaults overridden by explicit ``options`` (``client_kwargs`` merged)."""
    out = env_storage_options(protocol)
    for k, v in (options or {}).items():
        if k == "client_kwargs" and isinstance(v, Mapping):
            out["client_kwargs"] = {**out.get("client_kwargs", {}), **v}
        else:
            out[k] = copy.deepcopy(v)
    return out


def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, *,
                 storage_options: Mapping | None = None, **_: Any) -> BinaryIO:
    """``webdataset.gopen`` handler: open ``url`` through fsspec (s3fs for ``s3://``...)."""
    import fsspec

    protocol = scheme(url)
    opts = merged_storage_options(protocol, storage_options)
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


def open_url(url: str, *, storage_options: Mapping | None = None, retries: int = 3,
             backoff_s: float = 1.0) -> BinaryIO:
    """Open a shard or manifest for reading; retry transient errors with exponential backoff.

    ``FileNotFoundError`` and ``PermissionError`` are not transient and propagate at once; an
    unknown scheme raises ``ValueError`` (from WebDataset's gopen).
    """
    gopen = _gopen_module().gopen
    register_fsspec_handlers()
    kw = {"storage_options": storage_options} if scheme(url) in FSSPEC_SCHEMES else {}
    for attempt in range(retries + 1):
        try:
            return gopen(url, "rb", **kw)
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        except (OSError, TimeoutError, ConnectionError) as err:
            if attempt == retries:
                raise
            log.warning("opening %s failed (%s: %s); retry %d of %d", url, type(err).__name__,
                        err, attempt + 1, retries)
            time.sleep(backoff_s * 2 ** attempt)
    raise AssertionError("unreachable")
