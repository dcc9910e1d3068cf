"""Faults without a server: which errors are retried, how long, resuming a read mid-shard,
objects rewritten under the reader, and keeping credentials out of what is printed or recorded.

Remote shards live in fsspec's ``memory://`` filesystem here; faults are injected between our
reader and fsspec, so they hit exactly the code an S3 read goes through.
"""
from __future__ import annotations

import errno
import io

import pytest

from data_fixtures import ids, take, write_wds_shards
from mfrecipes.data import remote
from mfrecipes.data.remote import Retry, is_transient, redact, redact_recipe
from mfrecipes.data.shards import Shards
from mfrecipes.errors import DataError

N, PER = 53, 10
URLS = "memory://faults/ids/shard-{000000..000005}.tar"


@pytest.fixture
def memory_shards(tmp_path):
    import fsspec

    write_wds_shards(tmp_path, N, PER)
    fs = fsspec.filesystem("memory")
    for p in tmp_path.iterdir():
        fs.pipe(f"/faults/ids/{p.name}", p.read_bytes())
    yield fs
    fs.rm("/faults", recursive=True)


@pytest.fixture
def no_sleep(monkeypatch):
    """Record the backoff delays instead of sleeping them."""
    slept: list[float] = []
    monkeypatch.setattr(remote.time, "sleep", slept.append)
    return slept


# -- classification ----------------------------------------------------------------------------
@pytest.mark.parametrize("err,transient", [
    (TimeoutError("read timed out"), True),
    (ConnectionResetError("reset by peer"), True),
    (OSError(errno.EIO, "We encountered an internal error"), True),     # s3fs: 500
    (OSError(errno.EBUSY, "Slow Down"), True),                          # s3fs: 503
    (OSError("no errno"), True),
    (FileNotFoundError("NoSuchKey"), False),
    (PermissionError("AccessDenied"), False),
    (OSError(errno.EINVAL, "InvalidBucketName"), False),                # s3fs: 400
    (remote.ObjectChanged("rewritten"), False),
    (ValueError("no gopen handler"), False),
    (KeyError("x"), False),
])
def test_which_errors_are_transient(err, transient):
    assert is_transient(err) is transient


def test_botocore_connection_errors_are_transient_credentials_are_not():
    exc = pytest.importorskip("botocore.exceptions")
    assert is_transient(exc.EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(exc.ReadTimeoutError(endpoint_url="http://x"))
    assert is_transient(exc.ConnectionClosedError(endpoint_url="http://x"))
    assert not is_transient(exc.NoCredentialsError())
    assert not is_transient(exc.PartialCredentialsError(provider="env", cred_var="key"))


# -- Retry -------------------------------------------------------------------------------------
def test_retry_backs_off_exponentially_then_succeeds(no_sleep):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) <= 5:
            raise TimeoutError("slow")
        return "ok"

    assert Retry(timeout_s=1e9, backoff_s=0.5, max_backoff_s=4.0).call(flaky, "x") == "ok"
    assert no_sleep == [0.5, 1.0, 2.0, 4.0, 4.0]  # doubling, capped


def test_retry_gives_up_after_its_budget_and_never_retries_permanent_errors():
    calls = []

    def down():
        calls.append(1)
        raise ConnectionRefusedError("refused")

    with pytest.raises(ConnectionRefusedError):
        Retry(timeout_s=0.3, backoff_s=0.05, max_backoff_s=0.1).call(down, "x")
    assert 3 <= len(calls) <= 10

    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("NoSuchKey")

    with pytest.raises(FileNotFoundError):
        Retry(timeout_s=100).call(missing, "x")
    assert len(calls) == 1


# -- injected faults on the read path ----------------------------------------------------------
class FlakyFile(io.RawIOBase):
    """Wraps a file: a read that covers a byte offset in ``faults`` fails once, transiently."""

    def __init__(self, f, faults: set[int], log: list):
        super().__init__()
        self.f, self.faults, self.log = f, faults, log
        self.size = getattr(f, "size", None)

    def read(self, n=-1):
        pos = self.f.tell()
        end = pos + (n if n >= 0 else 1 << 62)
        hit = sorted(o for o in self.faults if pos <= o < end)
        if hit:
            self.faults.discard(hit[0])
            self.log.append(hit[0])
            raise OSError(errno.EIO, "We encountered an internal error. Please try again.")
        return self.f.read(n)

    def seek(self, pos, whence=0):
        return self.f.seek(pos, whence)

    def close(self):
        self.f.close()
        super().close()


@pytest.fixture
def inject(monkeypatch):
    """``inject(url_part, offsets)``: reads of each matching URL fail once at each offset."""
    plan: dict[str, list[int]] = {}
    pending: dict[str, set[int]] = {}  # per URL: the faults not hit yet
    log: list = []
    opens: list[str] = []
    real = remote.gopen_fsspec

    def gopen(url, mode="rb", bufsize=8192, **kw):
        opens.append(url)
        f = real(url, mode, bufsize, **kw)
        for part, offsets in plan.items():
            if part in url:
                return FlakyFile(f, pending.setdefault(url, set(offsets)), log)
        return f

    monkeypatch.setattr(remote, "gopen_fsspec", gopen)

    def add(url_part: str, offsets):
        plan[url_part] = list(offsets)
        return log, opens
    return add


def test_transient_read_errors_mid_shard_lose_no_sample(memory_shards, inject, no_sleep):
    make = lambda: Shards(urls=URLS, seed=4, shuffle_buffer=3)  # noqa: E731
    expected = take(make(), 2 * N, batch_size=4)
    # Every shard fails at 3 offsets inside it (shards are ~20 KiB), some in the middle of a
    # member: the reader must reopen and continue at exactly the byte where it stopped.
    log, opens = inject("faults/ids/shard-", [700, 5000, 12345])
    ds = make()
    assert take(ds, 2 * N, batch_size=4) == expected
    assert ds.counters()["data/skipped"] == 0
    assert len(log) == 3 * 6  # every fault was hit once, then the reopened file read on
    assert len(no_sleep) == len(log)


def test_transient_errors_opening_a_shard_are_retried(memory_shards, monkeypatch, no_sleep):
    real = remote.gopen_fsspec
    failures = {"left": 4}

    def gopen(url, *a, **kw):
        if url.endswith("shard-000003.tar") and failures["left"]:
            failures["left"] -= 1
            raise TimeoutError("connect timeout")
        return real(url, *a, **kw)

    monkeypatch.setattr(remote, "gopen_fsspec", gopen)
    ds = Shards(urls=URLS, seed=0)
    assert sorted(take(ds, N, batch_size=N)) == list(range(N))
    assert failures["left"] == 0 and len(no_sleep) == 4


def test_object_rewritten_under_the_reader_is_skipped_and_counted(memory_shards, inject,
                                                                   no_sleep, monkeypatch, caplog):
    # Shard 1 fails mid-read; by the time the reader reopens it, it has been replaced by a
    # different (shorter) object: continuing at the old offset would read garbage.
    log, _ = inject("faults/ids/shard-000001.tar", [9000])
    flaky = remote.gopen_fsspec

    def gopen(url, *a, **kw):
        if log and url.endswith("shard-000001.tar"):
            memory_shards.pipe("/faults/ids/shard-000001.tar", b"\0" * 1024)
        return flaky(url, *a, **kw)

    monkeypatch.setattr(remote, "gopen_fsspec", gopen)
    ds = Shards(urls=URLS, seed=0, shuffle_buffer=1)
    got = ids(ds.reference(10 * N, seed=0))  # one epoch: all that could be read
    lost = set(range(N)) - set(got)
    assert lost and lost <= set(range(10, 20)) and len(got) == len(set(got))
    assert "changed size" in caplog.text and len(log) == 1


# -- credentials -------------------------------------------------------------------------------
def test_redact_hides_secrets_at_any_depth():
    opts = {"key": "AKIAEXAMPLE", "secret": "hunter2", "token": None,
            "client_kwargs": {"endpoint_url": "http://e", "aws_session_token": "tok"},
            "anon": False}
    out = redact(opts)
    assert out == {"key": "***", "secret": "***", "token": None,
                   "client_kwargs": {"endpoint_url": "http://e", "aws_session_token": "***"},
                   "anon": False}
    assert opts["secret"] == "hunter2"  # a copy


def test_redact_recipe_only_touches_storage_options():
    resolved = {"run": {"name": "x", "seed": 0},
                "data": {"name": "shards", "params": {
                    "urls": "s3://b/p/{0..3}.tar",
                    "storage_options": {"key": "AKIA", "secret": "hunter2",
                                        "client_kwargs": {"endpoint_url": "http://e"}}}},
                "train": {"lr": 1e-4}}
    out = redact_recipe(resolved)
    assert out["data"]["params"]["storage_options"] == {
        "key": "***", "secret": "***", "client_kwargs": {"endpoint_url": "http://e"}}
    assert out["data"]["params"]["urls"] == "s3://b/p/{0..3}.tar"
    assert {k: v for k, v in out.items() if k != "data"} == \
        {k: v for k, v in resolved.items() if k != "data"}
    assert resolved["data"]["params"]["storage_options"]["secret"] == "hunter2"  # a copy
    for plain in ({}, {"data": {"name": "digits", "params": {}}}, {"data": None}):
        assert redact_recipe(plain) == plain


def test_missing_remote_shard_is_one_error_naming_it(memory_shards):
    ds = Shards(urls="memory://faults/ids/shard-{000004..000006}.tar", seed=0,
                sample_shape=[2], num_classes=10, shuffle_buffer=1)
    with pytest.raises(DataError, match=r"memory://faults/ids/shard-000006.tar") as err:
        take(ds, 3 * N)
    assert "not found" in str(err.value)
