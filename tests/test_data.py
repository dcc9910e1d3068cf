"""Shards, the embedded datasets and the cache: coverage, determinism, resume, corruption."""
from __future__ import annotations

import io
import json
import os
import tarfile
import warnings

import numpy as np
import pytest
import torch

from data_fixtures import (ids, latent_ids_and_noise, take, write_latent_shards,
                           write_wds_shards)
from mfrecipes.data.cache import CacheRebuildWarning, ensure_cached
from mfrecipes.data.npy import NpyDecoder, encode_npy
from mfrecipes.data.shards import Shards
from mfrecipes.data.tar import iter_samples, write_tar
from mfrecipes.data.toy2d import TOYS
from mfrecipes.data.writer import write_shards
from mfrecipes.errors import DataError, MfrError
from mfrecipes.registry import DATASETS

N, PER = 53, 10  # 6 shards, the last one short


def build(name, params=None, tmp_path=None, **runtime):
    rt = {"seed": 0, "rank": 0, "world_size": 1, "cache_dir": str(tmp_path)} | runtime
    return DATASETS.build({"name": name, "params": params or {}}, **rt)


@pytest.fixture
def shard_dir(tmp_path):
    write_wds_shards(tmp_path / "s", N, PER)
    return tmp_path / "s"


def pattern(folder) -> str:
    return str(folder / "shard-{000000..000005}.tar")


# -- reading: coverage, determinism, resume ----------------------------------------------------
@pytest.mark.parametrize("world_size,manifest", [(1, True), (2, True), (2, False), (8, True)])
def test_epoch_covers_every_sample_once_across_ranks(tmp_path, world_size, manifest):
    # world_size 8 > 6 shards: shards are read as interleaved slices.
    write_wds_shards(tmp_path, N, PER, manifest=manifest)
    seen = []
    for rank in range(world_size):
        ds = Shards(urls=pattern(tmp_path), shuffle_buffer=4, seed=3, rank=rank,
                    world_size=world_size)
        n = ds.epoch_length(0)
        seen.append(take(ds, n, batch_size=1) if n else [])
    flat = [i for s in seen for i in s]
    assert sorted(flat) == list(range(N))  # together: every sample, exactly once
    if world_size == 2:
        assert seen[0] and seen[1]


def test_epochs_follow_each_other(shard_dir):
    ds = Shards(urls=pattern(shard_dir), seed=1)
    stream = take(ds, 3 * N, batch_size=7)
    for e in range(3):
        assert sorted(stream[e * N:(e + 1) * N]) == list(range(N))
    assert stream[:N] != stream[N:2 * N]  # a new order each epoch


def test_same_seed_same_batches_other_seed_other_order(shard_dir):
    a = take(Shards(urls=pattern(shard_dir), seed=5), 2 * N, batch_size=4)
    b = take(Shards(urls=pattern(shard_dir), seed=5), 2 * N, batch_size=4)
    c = take(Shards(urls=pattern(shard_dir), seed=6), 2 * N, batch_size=4)
    assert a == b
    assert a != c and sorted(a[:N]) == sorted(c[:N])
    x1, y1 = next(Shards(urls=pattern(shard_dir), seed=5).batches(8))
    x2, y2 = next(Shards(urls=pattern(shard_dir), seed=5).batches(8))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.parametrize("kw", [
    {},                                        # manifest counts
    {"manifest": False},                       # counts by scanning the shards
    {"rank": 1, "world_size": 2},
    {"resampled": True},
    {"world_size": 9, "rank": 4},              # slices of shards
])
@pytest.mark.parametrize("k", [3, 17, 10, N + 13, 3 * N + 1])
def test_resume_continues_the_uninterrupted_stream(tmp_path, kw, k):
    kw = dict(kw)
    write_wds_shards(tmp_path, N, PER, manifest=kw.pop("manifest", True))
    make = lambda: Shards(urls=pattern(tmp_path), shuffle_buffer=6, seed=11, **kw)  # noqa: E731
    full = take(make(), k + 25, batch_size=1)
    assert take(make(), 25, batch_size=5, start=k) == full[k:]


def test_workers_split_and_resume(shard_dir):
    make = lambda: Shards(urls=pattern(shard_dir), seed=2, num_workers=2)  # noqa: E731
    full = take(make(), 2 * N + 8, batch_size=4)
    counts = np.bincount(full, minlength=N)
    assert counts.min() >= 1 and counts.max() <= 3  # two epochs' worth: all seen, none hoarded
    assert take(make(), 24, batch_size=4, start=12) == full[12:36]
    assert take(make(), 16, batch_size=4, start=N + 3 - (N + 3) % 4) == \
        full[N + 3 - (N + 3) % 4:][:16]
    with pytest.raises(ValueError, match="multiple of the batch size"):
        next(make().batches(4, start=5))


# -- URL forms ---------------------------------------------------------------------------------
def test_url_forms_read_the_same_samples(shard_dir):
    paths = sorted(str(p) for p in shard_dir.glob("shard-*.tar"))
    forms = [pattern(shard_dir), paths, ["file://" + p for p in paths],
             "file://" + pattern(shard_dir)]
    epochs = [sorted(take(Shards(urls=u, seed=0), N, batch_size=N)) for u in forms]
    assert all(e == list(range(N)) for e in epochs)


def test_fsspec_memory_urls(shard_dir):
    # The same fsspec handler that serves s3:// serves memory:// (no server needed).
    import fsspec
    from webdataset.gopen import gopen_schemes

    from mfrecipes.data.remote import gopen_fsspec

    assert gopen_schemes["s3"] is gopen_fsspec and gopen_schemes["memory"] is gopen_fsspec

    fs = fsspec.filesystem("memory")
    for p in shard_dir.iterdir():
        fs.pipe(f"/mfr-test/ids/{p.name}", p.read_bytes())
    try:
        ds = Shards(urls="memory://mfr-test/ids/shard-{000000..000005}.tar", seed=0)
        assert ds.info.num_classes == 10  # from the manifest beside the shards
        assert sorted(take(ds, N, batch_size=10)) == list(range(N))
        with pytest.raises(DataError, match="shard-000009.tar"):
            next(Shards(urls="memory://mfr-test/ids/shard-000009.tar",
                        sample_shape=[2]).batches(1))
    finally:
        fs.rm("/mfr-test", recursive=True)


def test_storage_options_are_redacted_in_repr(shard_dir):
    ds = Shards(urls=pattern(shard_dir), storage_options={"key": "AKIAEXAMPLE",
                                                          "secret": "hunter2",
                                                          "client_kwargs": {"endpoint_url": "e"}})
    assert "hunter2" not in repr(ds) and "AKIAEXAMPLE" not in repr(ds)
    assert "endpoint_url" in repr(ds)


# -- bad input ---------------------------------------------------------------------------------
def test_missing_shard_names_the_path(shard_dir):
    with pytest.raises(DataError, match=r"s/shard-000006.tar and 1 more") as err:
        Shards(urls=str(shard_dir / "shard-{000000..000007}.tar"))
    assert "brace pattern" in str(err.value)


@pytest.mark.parametrize("urls", ["", [], [" "]])
def test_empty_url_list(urls):
    with pytest.raises(DataError, match="no shard URLs"):
        Shards(urls=urls)


def test_unknown_scheme_and_bad_manifest(shard_dir):
    with pytest.raises(DataError, match="valid"):
        Shards(urls="nosuchscheme://bucket/a.tar")
    (shard_dir / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json"):
        Shards(urls=pattern(shard_dir))
    (shard_dir / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="format"):
        Shards(urls=pattern(shard_dir))


def test_errors_reach_the_user_through_the_registry(tmp_path):
    with pytest.raises(MfrError, match="two_moons"):  # the valid kinds are listed
        build("toy2d", {"kind": "three_moons"}, tmp_path)
    with pytest.raises(MfrError, match="8, 16"):
        build("digits", {"resolution": 12}, tmp_path)


# -- corruption --------------------------------------------------------------------------------
def test_corrupt_sample_is_skipped_and_counted(tmp_path):
    write_wds_shards(tmp_path, N, PER, bad={12})
    ds = Shards(urls=pattern(tmp_path), seed=0)
    got = take(ds, 2 * (N - 1), batch_size=1)
    assert sorted(got[:N - 1]) == [i for i in range(N) if i != 12]
    assert ds.counters() == {"data/skipped": 2}  # once per epoch


@pytest.mark.parametrize("manifest", [True, False])
def test_truncated_shard_is_skipped_and_counted(tmp_path, manifest):
    paths = write_wds_shards(tmp_path, N, PER, manifest=manifest)
    raw = open(paths[2], "rb").read()
    open(paths[2], "wb").write(raw[:len(raw) // 2 + 100])  # cut inside a member
    ds = Shards(urls=pattern(tmp_path), seed=0)
    readable = ids(ds.reference(10 * N, seed=0))  # one epoch, everything that can be read
    lost = set(range(N)) - set(readable)
    assert 0 < len(lost) < PER and lost <= set(range(20, 30))
    assert len(set(readable)) == len(readable)
    got = take(ds, 2 * len(readable), batch_size=3)  # two epochs, no hang
    assert sorted(got[:len(readable)]) == sorted(readable)
    skipped = ds.counters()["data/skipped"]
    if manifest:  # every missing sample of the shard is accounted for, in each epoch
        assert skipped == 2 * len(lost)
    else:
        assert skipped == 2


@pytest.mark.parametrize("manifest", [False, True])
def test_all_shards_unreadable_is_an_error_not_a_hang(tmp_path, manifest):
    for s in range(2):
        (tmp_path / f"shard-00000{s}.tar").write_bytes(b"\x01" * 2048)
    if manifest:  # the manifest promises samples that cannot be read
        (tmp_path / "manifest.json").write_text(json.dumps({
            "format": "mfrecipes-shards", "version": 1, "name": "junk", "key": "x.npy",
            "modality": "points", "sample_shape": [2], "num_classes": None,
            "shards": [{"name": f"shard-00000{s}.tar", "count": 4} for s in range(2)]}))
    ds = Shards(urls=str(tmp_path / "shard-{000000..000001}.tar"), sample_shape=[2])
    with pytest.raises(DataError, match="no readable sample"):
        next(ds.batches(4))
    assert ds.counters()["data/skipped"] == (3 * 8 if manifest else 2)


def test_more_ranks_than_samples_still_streams(tmp_path):
    write_wds_shards(tmp_path, 2, 2)  # one shard of 2 samples, 4 ranks: some epochs are empty
    for rank in range(4):
        ds = Shards(urls=str(tmp_path / "shard-000000.tar"), seed=0, rank=rank, world_size=4)
        assert set(take(ds, 6)) <= {0, 1}


# -- byte formats ------------------------------------------------------------------------------
def test_our_tar_is_a_tar_and_reads_back():
    buf = io.BytesIO()
    long_key = "k" * 130
    samples = [{"__key__": "a", "x.npy": encode_npy(np.arange(3, dtype=np.float32)),
                "cls": "7"}, {"__key__": long_key, "x.npy": b"123"}]
    write_tar(buf, samples)
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tf:  # the standard library as the reference reader
        names = tf.getnames()
        arr = np.load(io.BytesIO(tf.extractfile("a.x.npy").read()))
    assert names == ["a.x.npy", "a.cls", long_key + ".x.npy"]
    assert arr.tolist() == [0.0, 1.0, 2.0]
    buf.seek(0)
    back = list(iter_samples(buf))
    assert [s["__key__"] for s in back] == ["a", long_key] and back[0]["cls"] == b"7"


def test_webdataset_reads_our_shards(tmp_path):
    import webdataset as wds

    rng = np.random.default_rng(0)
    xs = rng.standard_normal((7, 1, 4, 4)).astype(np.float32)
    write_shards(str(tmp_path), zip(xs, range(7)), name="t", samples_per_shard=3,
                 modality="image", sample_shape=(1, 4, 4), num_classes=10)
    got = list(wds.WebDataset(str(tmp_path / "shard-{000000..000002}.tar"), shardshuffle=False)
               .decode().to_tuple("x.npy", "cls"))
    assert len(got) == 7
    for (x, c), ref, i in zip(got, xs, range(7)):
        assert np.array_equal(x, ref) and c == i


def test_npy_decoder_matches_numpy_and_refuses_pickles():
    dec = NpyDecoder()
    for a in [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(2, np.float16)]:
        buf = io.BytesIO()
        np.save(buf, a)
        assert np.array_equal(dec(buf.getvalue()), a) and dec(buf.getvalue()).dtype == a.dtype
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        dec(buf.getvalue())
    with pytest.raises(ValueError):
        dec(encode_npy(np.ones(4, np.float32))[:-3])


# -- cache -------------------------------------------------------------------------------------
def test_embedded_shards_written_once_then_reused(tmp_path):
    ds = build("toy2d", {"num_points": 1000}, tmp_path)
    folder = tmp_path / "toy2d-checkerboard-n1000-s0"
    assert ds.folder == folder and (folder / "manifest.json").is_file()
    files = sorted(folder.iterdir())
    assert len([f for f in files if f.suffix == ".tar"]) == 8
    stamps = {f: f.stat().st_mtime_ns for f in files}
    os.utime(folder / "manifest.json", ns=(1, 1))  # any rewrite would change this
    stamps[folder / "manifest.json"] = 1
    build("toy2d", {"num_points": 1000}, tmp_path)
    assert {f: f.stat().st_mtime_ns for f in sorted(folder.iterdir())} == stamps
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no temp folders left


@pytest.mark.parametrize("damage", ["manifest", "shard"])
def test_invalid_cache_is_rebuilt_with_a_warning(tmp_path, damage):
    build("digits", {}, tmp_path)
    folder = tmp_path / "digits-r8"
    if damage == "manifest":
        (folder / "manifest.json").write_text("garbage")
    else:
        raw = (folder / "shard-000001.tar").read_bytes()
        (folder / "shard-000001.tar").write_bytes(raw[:1000])
    with pytest.warns(CacheRebuildWarning, match=damage if damage == "manifest" else "bytes"):
        ds = build("digits", {}, tmp_path)
    x, y = next(ds.batches(2000 - 203))  # one full epoch and no skips
    assert ds.counters()["data/skipped"] == 0 and len(x) == 1797
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-r8"]


def test_racing_first_use_keeps_one_valid_folder(tmp_path):
    def writer(tag):
        def build_fn(tmp):
            if tag == "slow":  # another process completes while this one is still writing
                ensure_cached(tmp_path, "race", writer("fast"), expect_total=5)
            return write_shards(tmp, ((np.full(2, i, np.float32), None) for i in range(5)),
                                name=tag, samples_per_shard=2, modality="points",
                                sample_shape=(2,))
        return build_fn

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folder = ensure_cached(tmp_path, "race", writer("slow"), expect_total=5)
    assert json.loads((folder / "manifest.json").read_text())["name"] == "fast"  # first wins
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race"]


# -- embedded datasets -------------------------------------------------------------------------
def test_digits_shapes_labels_range(tmp_path):
    ds = build("digits", {}, tmp_path)
    assert ds.info.modality == "image" and ds.info.num_classes == 10
    x, y = next(ds.batches(1797))
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    # Every image once per epoch, with its own label: compare with scikit-learn directly.
    from sklearn.datasets import load_digits
    d = load_digits()
    ref = {(bytes(((img / 16.0) * 2 - 1).astype(np.float32).tobytes()), int(t))
           for img, t in zip(d.images, d.target)}
    got = {(bytes(xi[0].numpy().tobytes()), int(yi)) for xi, yi in zip(x, y)}
    assert got == ref

    x16, _ = next(build("digits", {"resolution": 16}, tmp_path).batches(4))
    assert x16.shape == (4, 1, 16, 16)
    unc = build("digits", {"conditional": False}, tmp_path)
    assert unc.info.num_classes is None and next(unc.batches(3))[1] is None


@pytest.mark.parametrize("kind", sorted(TOYS))
def test_toy_shapes(tmp_path, kind):
    ds = build("toy2d", {"kind": kind, "num_points": 400}, tmp_path)
    assert ds.info.modality == "points" and ds.info.sample_shape == (2,)
    assert ds.info.num_classes is None
    x, y = next(ds.batches(400))
    assert x.shape == (400, 2) and y is None and bool(torch.isfinite(x).all())
    assert len({tuple(p) for p in x.tolist()}) == 400  # one epoch: each pool point once


def test_reference(tmp_path):
    toy = build("toy2d", {"num_points": 500, "data_seed": 0}, tmp_path)
    pool = {tuple(p) for p in next(toy.batches(500))[0].tolist()}
    ref = toy.reference(300, seed=0)
    assert ref.shape == (300, 2)
    assert not pool & {tuple(p) for p in ref.tolist()}  # fresh draws, not the training pool
    assert torch.equal(ref, toy.reference(300, seed=0))
    assert not torch.equal(ref, toy.reference(300, seed=1))

    dig = build("digits", {}, tmp_path)
    assert dig.reference(100, seed=0).shape == (100, 1, 8, 8)
    assert dig.reference(5000, seed=0).shape == (1797, 1, 8, 8)

    write_wds_shards(tmp_path / "s", N, PER)
    sh = build("shards", {"urls": pattern(tmp_path / "s")}, tmp_path)
    r = sh.reference(20, seed=4)
    assert r.shape == (20, 2) and len(set(ids(r))) == 20
    assert torch.equal(r, sh.reference(20, seed=4))
    assert sh.reference(10 * N, seed=0).shape == (N, 2)


# -- latents: mean + std * n, scaled ------------------------------------------------------------
def latent_pattern(folder) -> str:
    return str(folder / "shard-{000000..000005}.tar")


def test_latents_are_scaled_posterior_samples_with_standard_normal_noise(tmp_path):
    write_latent_shards(tmp_path, N, PER)
    ds = Shards(urls=latent_pattern(tmp_path), seed=2, shuffle_buffer=4)
    assert ds.info.modality == "latent" and ds.info.sample_shape == (2, 3, 3)
    assert ds.info.latent_scale == 0.5 and ds.info.vae == "some/vae"
    stream = ds.batches(N)
    x1, y1 = next(stream)
    x2, _ = next(stream)
    id1, n1 = latent_ids_and_noise(x1)
    id2, n2 = latent_ids_and_noise(x2)
    assert sorted(id1) == sorted(id2) == list(range(N)) and y1.tolist() == [i % 10 for i in id1]
    noise = n1.flatten()[n1.flatten() != 0]  # 53 * 17 draws
    assert abs(float(noise.mean())) < 0.15 and abs(float(noise.std()) - 1) < 0.1
    # The same sample in the next epoch gets a new draw.
    by_id = {i: n for i, n in zip(id2, n2)}
    assert all(not torch.allclose(n, by_id[i]) for i, n in zip(id1, n1))


@pytest.mark.parametrize("kw", [{}, {"rank": 1, "world_size": 2}, {"resampled": True}])
def test_latent_noise_is_exact_on_resume(tmp_path, kw):
    write_latent_shards(tmp_path, N, PER)
    make = lambda: Shards(urls=latent_pattern(tmp_path), seed=9, shuffle_buffer=5, **kw)  # noqa
    full = torch.cat([x for x, _ in zip((b[0] for b in make().batches(1)), range(N + 30))])
    resumed = torch.cat([x for x, _ in zip((b[0] for b in make().batches(5, start=N - 7)),
                                           range(7))])
    assert torch.equal(resumed, full[N - 7:N + 28])
    other = next(Shards(urls=latent_pattern(tmp_path), seed=10, **kw).batches(N))[0]
    assert not torch.equal(other, full[:N])


def test_latents_without_a_manifest_need_layout_and_scale(tmp_path):
    write_latent_shards(tmp_path, 12, 6, manifest=False)
    urls = str(tmp_path / "shard-{000000..000001}.tar")
    ds = Shards(urls=urls, key="latent.npy", layout="mean_std", latent_scale=0.5,
                num_classes=10)
    assert ds.info.sample_shape == (2, 3, 3)
    ids_, _ = latent_ids_and_noise(next(ds.batches(12))[0])
    assert sorted(ids_) == list(range(12))
    with pytest.raises(DataError, match="latent_scale"):
        Shards(urls=urls, key="latent.npy", layout="mean_std")
    with pytest.raises(DataError, match="mean_std, sample|sample, mean_std"):
        Shards(urls=urls, key="latent.npy", layout="posterior")
    # Read as plain samples, a [2, C, H, W] array is the sample itself, scaled.
    plain = Shards(urls=urls, key="latent.npy", layout="sample", latent_scale=0.5)
    assert plain.info.sample_shape == (2, 2, 3, 3)


def test_shards_static_info_only_when_the_recipe_says_it_all():
    assert Shards.static_info(urls="x") is None
    assert Shards.static_info(urls="x", sample_shape=[4, 32, 32]) is None  # classes unknown
    info = Shards.static_info(urls="x", sample_shape=[4, 32, 32], num_classes=1000,
                              key="latent.npy", latent_scale=0.18215)
    assert info.modality == "latent" and info.sample_shape == (4, 32, 32)
    assert info.num_classes == 1000
    assert Shards.static_info(urls="x", sample_shape=[2], conditional=False).modality == "points"
