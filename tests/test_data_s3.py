"""Shards on S3, for real: a local moto server, a bucket, boto3 uploads, ``s3://`` reads."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from data_fixtures import take, write_wds_shards
from mfrecipes.data.shards import Shards
from mfrecipes.errors import DataError

pytest.importorskip("s3fs")
boto3 = pytest.importorskip("boto3")

N, PER = 53, 10
BUCKET = "mfr-test"
PATTERN = f"s3://{BUCKET}/ids/shard-{{000000..000005}}.tar"


def _moto_server() -> str | None:
    local = Path(sys.executable).parent / "moto_server"
    return str(local) if local.exists() else shutil.which("moto_server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    exe = _moto_server()
    if exe is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.skip("moto_server exited at start-up")
                time.sleep(0.1)
        else:
            pytest.skip("moto_server did not answer within 15 s")
        creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1"}
        old = {k: os.environ.get(k) for k in creds}
        os.environ.update(creds)
        s3 = boto3.client("s3", endpoint_url=url)
        s3.create_bucket(Bucket=BUCKET)
        folder = tmp_path_factory.mktemp("shards")
        write_wds_shards(folder, N, PER)
        for p in sorted(folder.iterdir()):
            s3.upload_file(str(p), BUCKET, f"ids/{p.name}")
        yield url
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_s3_shards_with_storage_options(s3_endpoint):
    opts = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    ds = Shards(urls=PATTERN, storage_options=opts, seed=3, shuffle_buffer=5)
    assert ds.info.num_classes == 10 and ds.info.sample_shape == (2,)  # from the S3 manifest
    assert sorted(take(ds, N, batch_size=8)) == list(range(N))
    full = take(Shards(urls=PATTERN, storage_options=opts, seed=3, shuffle_buffer=5), N + 30)
    again = Shards(urls=PATTERN, storage_options=opts, seed=3, shuffle_buffer=5)
    assert take(again, 20, batch_size=4, start=N + 10) == full[N + 10:]


def test_s3_endpoint_from_environment_and_plain_webdataset(s3_endpoint, monkeypatch):
    import webdataset as wds

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    ranks = [take(Shards(urls=PATTERN, seed=1, rank=r, world_size=2),
                  Shards(urls=PATTERN, seed=1, rank=r, world_size=2).epoch_length(0))
             for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(range(N))
    # The registered gopen handler serves WebDataset's own pipeline too.
    got = list(wds.WebDataset(PATTERN, shardshuffle=False).decode().to_tuple("x.npy", "cls"))
    assert sorted(int(x[0]) for x, _ in got) == list(range(N))


def test_s3_missing_object_is_a_data_error(s3_endpoint):
    opts = {"client_kwargs": {"endpoint_url": s3_endpoint}, "key": "test", "secret": "hunter2"}
    ds = Shards(urls=f"s3://{BUCKET}/nope/shard-000000.tar", storage_options=opts,
                sample_shape=[2])
    with pytest.raises(DataError, match="nope/shard-000000.tar") as err:
        next(ds.batches(1))
    assert "hunter2" not in str(err.value)


def test_s3_bad_credentials_are_a_data_error(s3_endpoint):
    opts = {"client_kwargs": {"endpoint_url": s3_endpoint}, "secret": "hunter2"}  # no key
    with pytest.raises(DataError, match="credentials|Credentials") as err:
        Shards(urls=PATTERN, storage_options=opts)
    assert "hunter2" not in str(err.value)
