"""Shards on S3, for real: a local moto server, a bucket, ``s3://`` reads, faults, a training run.

The server is moto's, in a child process on 127.0.0.1 (``data_fixtures.MotoS3``); uploads go
through boto3, reads through our fsspec handler, s3fs and aiobotocore, as against AWS.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time

import pytest

from data_fixtures import AWS_TEST_ENV, MotoS3, ids, take, write_wds_shards
from mfrecipes.data.shards import Shards
from mfrecipes.errors import DataError

pytest.importorskip("s3fs")
pytest.importorskip("boto3")
pytest.importorskip("moto.server")

N, PER = 53, 10
BUCKET = "mfr-test"
PATTERN = f"s3://{BUCKET}/ids/shard-{{000000..000005}}.tar"
BAD = f"s3://{BUCKET}/bad/shard-{{000000..000005}}.tar"  # sample 12 corrupt, shard 2 truncated


def _uploads(tmp_path_factory) -> dict[str, str]:
    good = tmp_path_factory.mktemp("ids")
    write_wds_shards(good, N, PER)
    bad = tmp_path_factory.mktemp("bad")
    write_wds_shards(bad, N, PER, bad={12})
    raw = (bad / "shard-000002.tar").read_bytes()
    (bad / "shard-000002.tar").write_bytes(raw[:len(raw) // 2 + 100])  # cut inside a member
    return {f"{prefix}/{p.name}": str(p) for prefix, folder in (("ids", good), ("bad", bad))
            for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def aws_env():
    old = {k: os.environ.get(k) for k in AWS_TEST_ENV}
    os.environ.update(AWS_TEST_ENV)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory, aws_env):
    server = MotoS3(BUCKET, _uploads(tmp_path_factory),
                    str(tmp_path_factory.mktemp("moto") / "moto.log"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def s3_endpoint(s3_server) -> str:
    return s3_server.url


def opts(endpoint, **more) -> dict:
    return {"client_kwargs": {"endpoint_url": endpoint}, **more}


# -- reading -------------------------------------------------------------------------------------
def test_s3_shards_with_storage_options(s3_endpoint):
    o = opts(s3_endpoint)
    ds = Shards(urls=PATTERN, storage_options=o, seed=3, shuffle_buffer=5)
    assert ds.info.num_classes == 10 and ds.info.sample_shape == (2,)  # from the S3 manifest
    assert sorted(take(ds, N, batch_size=8)) == list(range(N))
    full = take(Shards(urls=PATTERN, storage_options=o, seed=3, shuffle_buffer=5), N + 30)
    again = Shards(urls=PATTERN, storage_options=o, seed=3, shuffle_buffer=5)
    assert take(again, 20, batch_size=4, start=N + 10) == full[N + 10:]


def test_s3_same_stream_as_local_files(s3_endpoint, tmp_path):
    write_wds_shards(tmp_path, N, PER)
    local = Shards(urls=str(tmp_path / "shard-{000000..000005}.tar"), seed=7, shuffle_buffer=4,
                   rank=1, world_size=2)
    remote = Shards(urls=PATTERN, storage_options=opts(s3_endpoint), seed=7, shuffle_buffer=4,
                    rank=1, world_size=2)
    assert take(remote, 70, batch_size=7) == take(local, 70, batch_size=7)


def test_s3_in_dataloader_workers_same_stream_as_local(s3_endpoint, tmp_path):
    write_wds_shards(tmp_path, N, PER)
    kw = {"seed": 4, "shuffle_buffer": 4, "num_workers": 2}
    local = Shards(urls=str(tmp_path / "shard-{000000..000005}.tar"), **kw)
    remote = Shards(urls=PATTERN, storage_options=opts(s3_endpoint), **kw)
    got = take(remote, 2 * N, batch_size=4, start=8)  # each worker opens its own S3 client
    assert got == take(local, 2 * N, batch_size=4, start=8)
    assert set(got) == set(range(N))


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


# -- faults: bad data, missing data, bad credentials --------------------------------------------
def test_s3_corrupt_sample_and_truncated_shard_are_skipped_and_counted(s3_endpoint):
    ds = Shards(urls=BAD, storage_options=opts(s3_endpoint), seed=0)
    readable = ids(ds.reference(10 * N, seed=0))
    lost = set(range(N)) - set(readable)
    assert 12 in lost and lost - {12} and lost - {12} <= set(range(20, 30))
    got = take(ds, len(readable), batch_size=4)  # one epoch
    assert sorted(got) == sorted(readable)
    assert ds.counters()["data/skipped"] == len(lost)  # the corrupt one + the truncated tail


def test_s3_missing_object_is_a_data_error(s3_endpoint):
    o = opts(s3_endpoint, key="test", secret="hunter2")
    ds = Shards(urls=f"s3://{BUCKET}/nope/shard-000000.tar", storage_options=o,
                sample_shape=[2])
    with pytest.raises(DataError, match="nope/shard-000000.tar") as err:
        next(ds.batches(1))
    assert f"bucket {BUCKET!r} exists" in str(err.value)
    assert "hunter2" not in str(err.value)


def test_s3_missing_bucket_is_one_error_naming_it(s3_endpoint):
    t0 = time.monotonic()
    with pytest.raises(DataError, match="bucket 'no-such-bucket' does not exist") as err:
        Shards(urls="s3://no-such-bucket/x/shard-{000000..000003}.tar",
               storage_options=opts(s3_endpoint))
    assert "s3://no-such-bucket/x/shard-000000.tar" in str(err.value)
    assert time.monotonic() - t0 < 10  # not retried: a missing bucket does not come back


def test_s3_bad_credentials_are_a_data_error(s3_endpoint):
    o = opts(s3_endpoint, secret="hunter2")  # a secret without its key
    with pytest.raises(DataError, match="credentials|Credentials") as err:
        Shards(urls=PATTERN, storage_options=o)
    assert "hunter2" not in str(err.value)


# -- faults: the server goes away ----------------------------------------------------------------
# botocore and s3fs retry a refused connection themselves for a few seconds; one attempt each
# keeps the outage here (~4 s) longer than theirs, so it is our retry that must bridge it.
FEW_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 1}}}


@pytest.fixture
def restartable(tmp_path_factory, aws_env):
    server = MotoS3(BUCKET, _uploads(tmp_path_factory), str(tmp_path_factory.mktemp("m") / "log"))
    server.start()
    yield server
    server.kill()


@pytest.mark.parametrize("where", ["mid_shard", "between_shards"])
def test_server_restart_mid_read_loses_no_sample(restartable, caplog, where):
    # Small fetch blocks: the reader asks for each ~2 KiB sample separately, so the outage hits
    # it inside a shard. Large blocks: each shard arrives whole, and it hits opening the next.
    block = 2048 if where == "mid_shard" else 1 << 20
    o = opts(restartable.url, default_block_size=block, **FEW_RETRIES)

    # The uninterrupted stream, two epochs: read from the local copies of the uploaded files
    # (the same stream as from S3, test_s3_same_stream_as_local_files).
    local = sorted(p for k, p in restartable.uploads.items() if k.startswith("ids/shard-"))
    expected = take(Shards(urls=local, seed=5, shuffle_buffer=3), 2 * N)
    ds = Shards(urls=PATTERN, storage_options=o, seed=5, shuffle_buffer=3, retry_timeout_s=60)
    stream = ds.batches(1)
    got = [ids(next(stream)[0])[0] for _ in range(15)]  # well inside the second shard
    restartable.kill()
    restart = threading.Timer(2.0, restartable.start)  # refilled before it listens again
    restart.start()
    with caplog.at_level(logging.WARNING, logger="mfrecipes.data.remote"):
        t0 = time.monotonic()
        got += [ids(next(stream)[0])[0] for _ in range(2 * N - 15)]
    restart.join()
    assert got == expected and ds.counters()["data/skipped"] == 0
    retried = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    verb = "reading" if where == "mid_shard" else "opening"
    assert any(m.startswith(verb) for m in retried), retried
    assert time.monotonic() - t0 > 2.0  # it really waited for the server


def test_server_gone_for_good_is_a_data_error_not_a_hang(restartable):
    o = opts(restartable.url, **FEW_RETRIES)
    ds = Shards(urls=PATTERN, storage_options=o, seed=0, retry_timeout_s=1.0)
    stream = ds.batches(4)
    next(stream)
    restartable.kill()
    t0 = time.monotonic()
    with pytest.raises(DataError, match="retrying for 1 s"):
        for _ in range(2 * N):
            next(stream)
    assert time.monotonic() - t0 < 30


# -- a training run reading s3:// -------------------------------------------------------------
RECIPE = """
run: {name: s3toy, seed: 1}
data: {name: shards, params: {urls: "s3://nowhere/x.tar", shuffle_buffer: 8}}
backbone: {name: mlp, params: {hidden: 16, depth: 2}}
objective: {name: meanflow, params: {}}
timestep_sampler: {name: logit_normal, params: {fm_ratio: 0.5}}
loss_weighting: {name: adaptive, params: {}}
gap_schedule: {name: constant, params: {}}
train: {total_images: 128, global_batch_size: 32, lr: 1.0e-3, ema_decays: [0.9],
        log_every_images: 32, checkpoint_every_images: 128, progress_bar: false}
eval: {at_end: false}
"""


def _run(tmp_path, overrides):
    from mfrecipes.recipe import load_recipe
    from mfrecipes.train.loop import Trainer

    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    recipe, resolved = load_recipe(str(path), overrides)
    trainer = Trainer(recipe, resolved, str(tmp_path / "run"))
    return trainer, trainer.run()


def test_training_run_reads_shards_by_s3_url(s3_endpoint, tmp_path):
    trainer, out = _run(tmp_path, [f"data.params.urls={BAD}",
                                   f"data.params.storage_options.client_kwargs.endpoint_url="
                                   f"{s3_endpoint}"])
    assert out["images"] == 128 and trainer.info.sample_shape == (2,)
    assert trainer.info.num_classes == 10  # from the manifest on S3
    recs = [json.loads(line) for line in
            (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["data/skipped"] for r in recs if "data/skipped" in r]
    assert len(skipped) == 4 and skipped[-1] >= 2  # 128 images > one epoch of 44 readable
    assert skipped == sorted(skipped)


def test_credentials_in_the_recipe_never_reach_the_run_directory(s3_endpoint, tmp_path):
    _run(tmp_path, [f"data.params.urls={PATTERN}",
                    f"data.params.storage_options.client_kwargs.endpoint_url={s3_endpoint}",
                    "data.params.storage_options.key=test",
                    "data.params.storage_options.secret=s3cr3t-value-42"])
    for root, _, files in os.walk(tmp_path / "run"):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                assert b"s3cr3t-value-42" not in fh.read(), f


# -- credentials on resume: the record holds ***, the resume takes them from elsewhere ---------
@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, aws_env):
    """A server that serves signed requests of one IAM user only (``credentials``)."""
    server = MotoS3(BUCKET, _uploads(tmp_path_factory),
                    str(tmp_path_factory.mktemp("moto-auth") / "moto.log"), require_auth=True)
    server.start()
    yield server
    server.kill()


def _no_aws_env(monkeypatch, tmp_path):
    """Nothing but what the test sets: no keys, no profile files, no instance metadata."""
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
              "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _cli(capsys, *args) -> tuple[int, str]:
    import s3fs

    from mfrecipes.cli import main

    s3fs.S3FileSystem.clear_instance_cache()  # as in a fresh process: no client kept from before
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _started_run(auth_server, tmp_path, capsys, monkeypatch):
    """A run of 64 images that logged in with credentials given as overrides."""
    _no_aws_env(monkeypatch, tmp_path)
    kid, secret = auth_server.credentials
    (tmp_path / "r.yaml").write_text(RECIPE)
    run_dir = tmp_path / "run"
    code, err = _cli(capsys, "run", tmp_path / "r.yaml", "--out", run_dir,
                     f"data.params.urls={PATTERN}", "train.total_images=64",
                     f"data.params.storage_options.client_kwargs.endpoint_url={auth_server.url}",
                     f"data.params.storage_options.key={kid}",
                     f"data.params.storage_options.secret={secret}")
    assert code == 0, err
    recorded = (run_dir / "recipe.resolved.yaml").read_text()
    assert "key: '***'" in recorded and "secret: '***'" in recorded and secret not in recorded
    from mfrecipes.cli import main

    assert main(["show", str(run_dir)]) == 0  # show keeps the record's placeholders
    shown = capsys.readouterr().out
    assert "key: '***'" in shown and secret not in shown
    return run_dir


def _secrets_nowhere(run_dir, secret: str) -> None:
    for root, _, files in os.walk(run_dir):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                assert secret.encode() not in fh.read(), f


def _images(run_dir) -> int:
    from mfrecipes.run.layout import read_jsonl

    return max(r["images"] for r in read_jsonl(str(run_dir / "metrics.jsonl")))


def test_resume_takes_credentials_from_the_environment(auth_server, tmp_path, capsys,
                                                       monkeypatch):
    run_dir = _started_run(auth_server, tmp_path, capsys, monkeypatch)
    kid, secret = auth_server.credentials
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", kid)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    code, err = _cli(capsys, "run", run_dir, "train.total_images=128")
    assert code == 0, err
    assert _images(run_dir) == 128
    _secrets_nowhere(run_dir, secret)


def test_resume_takes_credentials_from_the_same_override(auth_server, tmp_path, capsys,
                                                         monkeypatch):
    run_dir = _started_run(auth_server, tmp_path, capsys, monkeypatch)
    kid, secret = auth_server.credentials
    code, err = _cli(capsys, "run", run_dir, "train.total_images=128",
                     f"data.params.storage_options.key={kid}",
                     f"data.params.storage_options.secret={secret}")
    assert code == 0, err
    assert _images(run_dir) == 128
    _secrets_nowhere(run_dir, secret)  # records, history, env.json, metrics, checkpoints


def test_resume_without_credentials_is_one_error_saying_how(auth_server, tmp_path, capsys,
                                                            monkeypatch):
    run_dir = _started_run(auth_server, tmp_path, capsys, monkeypatch)
    sent = []
    import botocore.auth

    real = botocore.auth.SigV4Auth.add_auth

    def spy(self, request):  # what access key would go out, were there credentials
        sent.append(self.credentials.access_key if self.credentials else None)
        return real(self, request)
    monkeypatch.setattr(botocore.auth.SigV4Auth, "add_auth", spy)
    code, err = _cli(capsys, "run", run_dir, "train.total_images=128")
    assert code == 2 and "Traceback" not in err
    assert err.count("error:") == 1
    assert "data.params.storage_options.key, data.params.storage_options.secret redacted" in err
    assert "AWS_ACCESS_KEY_ID" in err and "data.params.storage_options.key=..." in err
    assert "***" not in sent  # the record's placeholder never went out as a key
    assert _images(run_dir) == 64  # nothing trained
