"""The shard builder: ADM crop, image folder -> SD-VAE latent shards (a tiny random VAE), the
embedded sets, destinations (local, s3:// on a moto server), bad input; and decoding latents."""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest
import torch

from data_fixtures import AWS_TEST_ENV, MotoS3, save_tiny_vae, write_image_folder
from mfrecipes.data.images import center_crop_arr, scan_image_folder, scan_unlabelled_folder
from mfrecipes.data.make_shards import build_embedded_shards, build_latent_shards
from mfrecipes.data.shards import Shards
from mfrecipes.errors import DataError

diffusers = pytest.importorskip("diffusers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = {"n01": 5, "n02": 4, "n03": 3}  # 12 images
R = 32                                     # crop size; the tiny VAE halves it: latents 4x16x16


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> str:
    return save_tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "imgs"
    write_image_folder(root, CLASSES, size=(45, 37))
    return root


def build(src, out, vae, **kw):
    kw = {"resolution": R, "batch_size": 5, "samples_per_shard": 5, "progress": False,
          "log": lambda _: None} | kw
    return build_latent_shards(str(src), str(out), vae=vae, **kw)


# -- the ADM centre crop ---------------------------------------------------------------------
def test_center_crop_takes_the_middle_without_resampling_when_the_short_side_fits():
    from PIL import Image

    arr = np.random.default_rng(0).integers(0, 256, (16, 48, 3), dtype=np.uint8)  # H 16, W 48
    out = center_crop_arr(Image.fromarray(arr), 16)
    assert out.shape == (16, 16, 3) and np.array_equal(out, arr[:, 16:32])


def test_center_crop_box_halves_large_images_first():
    from PIL import Image

    arr = np.random.default_rng(1).integers(0, 256, (32, 96, 3), dtype=np.uint8)
    out = center_crop_arr(Image.fromarray(arr), 16)  # 32 >= 2 * 16: one 2x2 box average
    box = arr.reshape(16, 2, 48, 2, 3).astype(np.float64).mean(axis=(1, 3))  # [16, 48, 3]
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(np.float64) - box[:, 16:32]).max() <= 1.0  # rounding only


def test_center_crop_upscales_small_images_to_the_size():
    from PIL import Image

    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, 10:] = 255  # left half black, right half white
    out = center_crop_arr(Image.fromarray(arr), 30)  # -> 30 x 60, centre 30 x 30
    assert out.shape == (30, 30, 3)
    assert out[:, :10].max() < 40 and out[:, 20:].min() > 215  # black left, white right


# -- latent shards from an image folder ----------------------------------------------------
def test_latent_shards_hold_the_vae_posterior_of_each_image(image_folder, tiny_vae, tmp_path):
    from diffusers import AutoencoderKL
    from PIL import Image

    (image_folder / "n02" / "notes.txt").write_text("not an image")
    (image_folder / "n03" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    m = build(image_folder, tmp_path / "out", tiny_vae)
    out = tmp_path / "out"

    assert m.total == 12 and [s.count for s in m.shards] == [5, 5, 2]
    assert m.sample_shape == (4, R // 2, R // 2) and m.layout == "mean_std"
    assert m.classes == {"n01": 0, "n02": 1, "n03": 2} and m.num_classes == 3
    assert m.latent_scale == 0.18215 and m.vae == os.path.abspath(tiny_vae)
    assert m.params["skipped_files"] == 2
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["total"] == 12 and on_disk["classes"]["n03"] == 2
    assert on_disk["shards"][0]["bytes"] == (out / "shard-000000.tar").stat().st_size

    # The reference: the standard library reads the tar, diffusers encodes the image itself.
    rows = {r["key"]: r for r in csv.DictReader(open(out / "sources.tsv"), delimiter="\t")}
    vae = AutoencoderKL.from_pretrained(tiny_vae, low_cpu_mem_usage=False).eval()
    seen_classes = []
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tf:
            for member in tf.getmembers():
                if not member.name.endswith(".latent.npy"):
                    continue
                key = member.name.split(".")[0]
                stored = np.load(io.BytesIO(tf.extractfile(member).read()))
                label = int(tf.extractfile(f"{key}.cls").read())
                row = rows[key]
                assert int(row["cls"]) == label == m.classes[row["source"].split("/")[0]]
                seen_classes.append(label)
                if key in ("00000000", "00000011"):
                    with Image.open(image_folder / row["source"]) as im:
                        img = center_crop_arr(im.convert("RGB"), R)
                    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
                    with torch.no_grad():
                        dist = vae.encode(x).latent_dist
                    assert stored.shape == (2, 4, R // 2, R // 2) and stored.dtype == np.float32
                    np.testing.assert_allclose(stored[0], dist.mean[0].numpy(), atol=1e-5)
                    np.testing.assert_allclose(stored[1], dist.std[0].numpy(), atol=1e-5)
    assert sorted(seen_classes) == sorted(c for c, n in enumerate(CLASSES.values())
                                          for _ in range(n))
    assert seen_classes[:5] != sorted(seen_classes[:5])  # the file order was shuffled


def test_latent_shards_train_as_scaled_posterior_samples(image_folder, tiny_vae, tmp_path):
    build(image_folder, tmp_path / "out", tiny_vae, dtype="float16")
    ds = Shards(urls=str(tmp_path / "out" / "shard-{000000..000002}.tar"), seed=0)
    assert ds.info.modality == "latent" and ds.info.sample_shape == (4, 16, 16)
    assert ds.info.num_classes == 3 and ds.info.latent_scale == 0.18215
    x, y = next(ds.batches(12))
    assert x.dtype == torch.float32 and sorted(y.tolist()) == [0] * 5 + [1] * 4 + [2] * 3


def test_shard_size_target_in_bytes_and_names(image_folder, tiny_vae, tmp_path):
    m = build(image_folder, tmp_path / "out", tiny_vae, samples_per_shard=None,
              shard_size_mb=25_000 / 2**20, prefix="train")  # a sample is 10,240 tar bytes
    assert m.total == 12 and [s.count for s in m.shards] == [2] * 6
    assert all(s.bytes <= 25_000 for s in m.shards)
    assert [s.name for s in m.shards] == [f"train-{i:06d}.tar" for i in range(6)]
    ds = Shards(urls=str(tmp_path / "out" / "train-{000000..000005}.tar"))
    assert ds.info.num_classes == 3  # the manifest is found beside any shard names
    with pytest.raises(DataError, match="prefix"):
        build(image_folder, tmp_path / "o2", tiny_vae, prefix="a/b")


def test_empty_and_imageless_folders_are_clear_errors(tmp_path, tiny_vae):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        build(tmp_path / "empty", tmp_path / "o1", tiny_vae)
    (tmp_path / "bare" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no files"):
        build(tmp_path / "bare", tmp_path / "o2", tiny_vae)
    (tmp_path / "bare" / "cls" / "a.txt").write_text("hello")
    with pytest.raises(DataError, match="no readable image.*1 files skipped"):
        build(tmp_path / "bare", tmp_path / "o3", tiny_vae)
    assert not list((tmp_path / "o3").glob("manifest.json"))  # nothing claims to be complete
    with pytest.raises(DataError, match="not a folder"):
        build(tmp_path / "nowhere", tmp_path / "o4", tiny_vae)
    with pytest.raises(DataError, match="cannot load the VAE"):
        build(tmp_path / "bare", tmp_path / "o5", str(tmp_path / "no-vae-here"))


def test_bad_out_is_a_clear_error(image_folder, tiny_vae, tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        build(image_folder, tmp_path / "a_file", tiny_vae)
    with pytest.raises(DataError, match="unknown scheme 'nosuch'"):
        build(image_folder, "nosuch://bucket/x", tiny_vae)
    build(image_folder, tmp_path / "out", tiny_vae)
    with pytest.raises(DataError, match="already holds a shard set.*--overwrite"):
        build(image_folder, tmp_path / "out", tiny_vae)
    m = build(image_folder, tmp_path / "out", tiny_vae, samples_per_shard=12, overwrite=True)
    assert len(m.shards) == 1
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["shard-000000.tar"]


def test_scan_lists_classes_sorted_and_ignores_hidden(tmp_path):
    write_image_folder(tmp_path, {"b": 1, "a": 2})
    (tmp_path / ".cache").mkdir()
    (tmp_path / "a" / ".DS_Store").write_text("x")
    files, classes = scan_image_folder(str(tmp_path))
    assert classes == {"a": 0, "b": 1}
    assert [(os.path.basename(p), c) for p, c in files] == \
        [("img000.png", 0), ("img001.png", 0), ("img000.png", 1)]


def test_unlabelled_folder_gives_shards_without_labels(tmp_path, tiny_vae):
    """FFHQ's layout: images in numbered storage folders, a licence file beside them. The
    folders are not classes: no ``cls`` member, ``num_classes`` None, and the reader yields
    ``y = None`` (an unconditional data set)."""
    root = tmp_path / "ffhq"
    write_image_folder(root, {"00000": 3, "01000": 2}, size=(40, 40))
    write_image_folder(root / "deeper", {"x": 1}, size=(40, 40), seed=1)
    (root / "LICENSE.txt").write_text("licence")
    (root / "00000" / ".hidden.png").write_bytes(b"x")
    files = scan_unlabelled_folder(str(root))
    assert [os.path.relpath(p, root) for p, _ in files] == [
        "00000/img000.png", "00000/img001.png", "00000/img002.png", "01000/img000.png",
        "01000/img001.png", "deeper/x/img000.png"]
    assert all(label is None for _, label in files)

    m = build(root, tmp_path / "out", tiny_vae, labels=False)
    out = tmp_path / "out"
    assert m.total == 6 and m.num_classes is None and m.classes is None
    assert m.params["skipped_files"] == 0   # the licence is not an image file, not a skip
    assert json.loads((out / "manifest.json").read_text())["num_classes"] is None
    names = [n for shard in sorted(out.glob("shard-*.tar"))
             for n in tarfile.open(shard).getnames()]
    assert len([n for n in names if n.endswith(".latent.npy")]) == 6
    assert not [n for n in names if n.endswith(".cls")]
    rows = list(csv.DictReader(open(out / "sources.tsv"), delimiter="\t"))
    assert sorted(r["source"] for r in rows) == sorted(os.path.relpath(p, root) for p, _ in files)
    assert all(r["cls"] == "" for r in rows)

    ds = Shards(urls=str(out / "shard-{000000..000001}.tar"), seed=0)
    assert ds.info.num_classes is None and ds.info.sample_shape == (4, R // 2, R // 2)
    x, y = next(ds.batches(6))
    assert y is None and x.shape == (6, 4, R // 2, R // 2)

    # A labelled scan of the same folder would have made classes of the storage folders.
    assert build(root, tmp_path / "labelled", tiny_vae).num_classes == 3
    with pytest.raises(DataError, match="no image files"):
        scan_unlabelled_folder(str(tmp_path / "out"))


# -- embedded datasets -----------------------------------------------------------------------
def test_embedded_digits_are_the_cached_bytes(tmp_path):
    from mfrecipes.registry import DATASETS

    m = build_embedded_shards("digits", str(tmp_path / "d"), log=lambda _: None)
    cached = DATASETS.build({"name": "digits", "params": {}}, seed=0, rank=0, world_size=1,
                            cache_dir=str(tmp_path / "cache"))
    assert m.total == 1797
    for s in m.shards:
        assert (tmp_path / "d" / s.name).read_bytes() == (cached.folder / s.name).read_bytes()


def test_embedded_toy_is_the_exact_pool(tmp_path):
    from mfrecipes.data.toy2d import sample_toy

    m = build_embedded_shards("toy2d/two_moons", str(tmp_path / "t"), num_points=300,
                              data_seed=5, log=lambda _: None)
    assert m.total == 300 and m.sample_shape == (2,)
    ds = Shards(urls=str(tmp_path / "t" / "shard-{000000..000007}.tar"), shuffle_buffer=1)
    x, y = next(ds.batches(300))
    ref = sample_toy("two_moons", 300, torch.Generator().manual_seed(5))
    assert y is None and {tuple(p) for p in x.tolist()} == {tuple(p) for p in ref.tolist()}
    with pytest.raises(DataError, match="toy2d/checkerboard"):
        build_embedded_shards("toy2d/three_moons", str(tmp_path / "u"))


def test_the_tool_is_a_thin_command_line(tmp_path, capsys):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import make_shards as tool
    finally:
        sys.path.pop(0)
    assert tool.main(["digits", "--out", str(tmp_path / "d"), "--resolution", "16"]) == 0
    assert "digits" in json.loads((tmp_path / "d" / "manifest.json").read_text())["name"]
    assert "shard-{000000..000003}.tar" in capsys.readouterr().out
    assert tool.main(["digits", "--out", str(tmp_path / "d")]) == 2
    assert "already holds a shard set" in capsys.readouterr().err
    assert tool.parse_args(["imgs", "--out", "o", "--unlabelled"]).unlabelled
    assert not tool.parse_args(["imgs", "--out", "o"]).unlabelled


# -- to and from S3 --------------------------------------------------------------------------
@pytest.fixture
def s3(tmp_path, monkeypatch):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    for k, v in AWS_TEST_ENV.items():
        monkeypatch.setenv(k, v)
    server = MotoS3("mfr-out", {}, str(tmp_path / "moto.log"))
    server.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    yield server
    server.kill()


def test_latent_shards_to_s3_read_back_by_url(image_folder, tiny_vae, tmp_path, s3):
    local = build(image_folder, tmp_path / "local", tiny_vae)
    remote = build(image_folder, "s3://mfr-out/imgs/latents", tiny_vae)
    assert [(s.name, s.count, s.bytes) for s in remote.shards] == \
        [(s.name, s.count, s.bytes) for s in local.shards]
    a = Shards(urls=str(tmp_path / "local" / "shard-{000000..000002}.tar"), seed=3)
    b = Shards(urls="s3://mfr-out/imgs/latents/shard-{000000..000002}.tar", seed=3)
    assert b.info == a.info  # the manifest came along
    xa, ya = next(a.batches(12))
    xb, yb = next(b.batches(12))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)

    with pytest.raises(DataError, match="bucket 'no-bucket' does not exist"):
        build(image_folder, "s3://no-bucket/x", tiny_vae)
    with pytest.raises(DataError, match="already holds"):
        build_embedded_shards("digits", "s3://mfr-out/imgs/latents")


# -- decoding --------------------------------------------------------------------------------
def test_decode_latents_divides_by_the_scale_and_decodes(tiny_vae):
    from diffusers import AutoencoderKL

    from mfrecipes.data.base import DataInfo
    from mfrecipes.data.vae import decode_latents, load_vae

    info = DataInfo(name="t", modality="latent", sample_shape=(4, 8, 8), num_classes=3,
                    latent_scale=0.18215, vae=tiny_vae)
    z = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = decode_latents(z, info, batch_size=2)  # loads info.vae
    assert images.shape == (5, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    ref_vae = AutoencoderKL.from_pretrained(tiny_vae, low_cpu_mem_usage=False).eval()
    with torch.no_grad():
        ref = ref_vae.decode(z / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(images, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decode_latents(z, info, vae=load_vae(tiny_vae), batch_size=5),
                               images, atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="sample shape"):
        decode_latents(torch.zeros(2, 4, 4, 4), info)
    with pytest.raises(DataError, match="latent"):
        decode_latents(z, DataInfo(name="d", modality="image", sample_shape=(4, 8, 8)))
