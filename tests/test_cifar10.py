"""CIFAR-10 from the official python archive: a fake archive in the same format (pickled dicts of
bytes keys, uint8 data [N, 3072] in R, G, B planes, label lists), built here; the restricted
unpickler refuses anything but numpy's array reconstruction; shards read back as images."""
from __future__ import annotations

import io
import json
import os
import pickle
import sys
import tarfile

import numpy as np
import pytest
import torch

from mfrecipes.data.make_shards import build_cifar10_shards, read_cifar10_archive
from mfrecipes.data.shards import Shards
from mfrecipes.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_BATCH = 6


def _batch(seed, n=PER_BATCH):
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"training batch", b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)]}


def _archive(path, batches, protocol=2):
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in batches.items():
            data = obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=protocol)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture
def archive(tmp_path):
    batches = {f"data_batch_{i}": _batch(i) for i in range(1, 6)}
    batches["test_batch"] = _batch(99)
    batches["batches.meta"] = {b"label_names": [b"airplane"]}
    return _archive(tmp_path / "cifar-10-python.tar.gz", batches), batches


def test_reads_batches_in_order_as_rgb_planes(archive):
    path, batches = archive
    x, y = read_cifar10_archive(path, "train")
    assert x.shape == (5 * PER_BATCH, 3, 32, 32) and x.dtype == np.uint8
    assert y.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    row = batches["data_batch_2"][b"data"][1]
    # pixel (r, c) of channel k is entry k * 1024 + r * 32 + c of the row
    for k, r, c in [(0, 0, 0), (1, 3, 7), (2, 31, 30)]:
        assert x[PER_BATCH + 1, k, r, c] == row[k * 1024 + r * 32 + c]
    xt, yt = read_cifar10_archive(path, "test")
    assert len(xt) == PER_BATCH and yt.tolist() == batches["test_batch"][b"labels"]


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))  # would create the file if it were ever called


def test_refuses_anything_but_numpy_arrays(tmp_path):
    target = tmp_path / "created"
    evil = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Payload(str(target))}
    batches = {f"data_batch_{i}": _batch(i) for i in range(1, 6)}
    batches["data_batch_3"] = evil
    path = _archive(tmp_path / "evil.tar.gz", batches)
    with pytest.raises(DataError, match=r"refused global (builtins|io)\.open") as err:
        read_cifar10_archive(path)
    assert "data_batch_3" in str(err.value) and not target.exists()


@pytest.mark.parametrize("batches, match", [
    ({"data_batch_1": _batch(1)}, "no data_batch_2"),
    ({f"data_batch_{i}": {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
      for i in range(1, 6)}, "expected uint8 data"),
    ({f"data_batch_{i}": b"not a pickle" for i in range(1, 6)}, "not a CIFAR-10 batch"),
])
def test_bad_archives_are_data_errors(tmp_path, batches, match):
    with pytest.raises(DataError, match=match):
        read_cifar10_archive(_archive(tmp_path / "a.tar.gz", batches))
    (tmp_path / "plain.txt").write_text("x")
    with pytest.raises(DataError, match="tar archive"):
        read_cifar10_archive(str(tmp_path / "plain.txt"))


def test_shards_hold_the_images_in_minus_one_one(archive, tmp_path):
    path, _ = archive
    m = build_cifar10_shards(path, str(tmp_path / "s"), num_shards=3, log=lambda _: None)
    assert m.total == 30 and m.sample_shape == (3, 32, 32) and m.num_classes == 10
    assert m.classes["truck"] == 9 and len(m.shards) == 3
    x_ref, y_ref = read_cifar10_archive(path)
    ds = Shards(urls=str(tmp_path / "s" / "shard-{000000..000002}.tar"), shuffle_buffer=1)
    x, y = next(ds.batches(30))
    ref = {(int(c), tuple((img.astype(np.float32) / 127.5 - 1).ravel()[:50].round(5)))
           for img, c in zip(x_ref, y_ref)}
    got = {(int(c), tuple(img.numpy().ravel()[:50].round(5))) for img, c in zip(x, y)}
    assert got == ref and x.min() >= -1 and x.max() <= 1


def test_the_tool_writes_cifar10(archive, tmp_path, capsys):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import make_shards as tool
    finally:
        sys.path.pop(0)
    path, _ = archive
    assert tool.main(["cifar10", "--source", path, "--out", str(tmp_path / "c"),
                      "--num-shards", "2"]) == 0
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["name"] == "cifar10-train"
    assert tool.main(["cifar10", "--out", str(tmp_path / "d")]) == 2
    assert "--source" in capsys.readouterr().err


# -- the recipes ---------------------------------------------------------------------------------
RECIPES = os.path.join(REPO, "recipes", "cifar10")
NAMES = ("meanflow", "meanflow_v0", "flow_matching", "dmf", "dmf_dagger")


@pytest.mark.parametrize("name", NAMES)
def test_full_recipes_check(name):
    from mfrecipes.recipe import load_recipe
    from mfrecipes.recipe.build import check_recipe

    recipe, _ = load_recipe(os.path.join(RECIPES, f"{name}.yaml"))
    check_recipe(recipe)
    assert recipe.train.global_batch_size == 1024 and recipe.train.lr == 6e-4
    assert recipe.backbone.name == "unet_cifar10"


@pytest.mark.slow  # five short trainings of the tiny U-Net: minutes on a shared 2-core CPU
def test_cpu_recipes_train_on_a_cifar_shaped_set(archive, tmp_path):
    import time

    from mfrecipes.recipe import load_recipe
    from mfrecipes.train.loop import Trainer

    path, _ = archive
    build_cifar10_shards(path, str(tmp_path / "s"), num_shards=3, log=lambda _: None)
    urls = f"data.params.urls={tmp_path / 's' / 'shard-{000000..000002}.tar'}"
    fm_run = tmp_path / "runs" / "flow_matching"
    for name in ("flow_matching", "meanflow", "meanflow_v0", "dmf", "dmf_dagger"):
        overrides = [urls] + ([f"init_from.path={fm_run}"] if name.startswith("dmf") else [])
        recipe, data = load_recipe(os.path.join(RECIPES, "cpu", f"{name}.yaml"), overrides)
        t0 = time.time()
        out = Trainer(recipe, data, str(tmp_path / "runs" / name)).run()
        print(f"cpu/{name}.yaml: {time.time() - t0:.1f} s")
        assert out["images"] == 64 and out["nonfinite"] == 0
        recs = [json.loads(line) for line in
                (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in recs if "loss" in r]
        assert losses and all(np.isfinite(losses))


# -- EDM augmentation through the trainer -------------------------------------------------------
def _cpu_meanflow(archive, tmp_path, *overrides):
    from mfrecipes.recipe import load_recipe

    path, _ = archive
    if not (tmp_path / "s").exists():
        build_cifar10_shards(path, str(tmp_path / "s"), num_shards=3, log=lambda _: None)
    urls = f"data.params.urls={tmp_path / 's' / 'shard-{000000..000002}.tar'}"
    return load_recipe(os.path.join(RECIPES, "cpu", "meanflow.yaml"),
                       [urls, "train.total_images=16", "train.checkpoint_every_images=null",
                        "train.log_every_images=8", *overrides])


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in
            (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_augmentation_reaches_the_unet_through_the_trainer(archive, tmp_path):
    """cpu/meanflow.yaml (unet_tiny, augment_dim 6, edm_augment) trains; p = 0 gives the same
    losses as no augmentation (the label planes add exactly nothing), p = 1 changes them, and the
    same seed repeats them."""
    from mfrecipes.train.loop import Trainer

    runs = {}
    for name, extra in (("p12", []), ("p12_again", []),
                        ("p0", ["train.augment.params.p=0.0"]),
                        ("p1", ["train.augment.params.p=1.0"]), ("off", ["train.augment=null"])):
        recipe, data = _cpu_meanflow(archive, tmp_path, *extra)
        out = Trainer(recipe, data, str(tmp_path / name)).run()
        assert out["images"] == 16 and out["nonfinite"] == 0
        runs[name] = _losses(tmp_path / name)
    assert len(runs["off"]) == 2 and all(np.isfinite(runs["p12"]))
    assert runs["p12"] == runs["p12_again"]
    assert np.allclose(runs["p0"], runs["off"], rtol=1e-5, atol=0)
    assert not np.allclose(runs["p1"], runs["off"], rtol=1e-3, atol=0)


def test_augmentation_needs_the_backbone_labels(archive, tmp_path):
    from mfrecipes.errors import RecipeError
    from mfrecipes.train.loop import Trainer

    recipe, data = _cpu_meanflow(archive, tmp_path, "backbone.params.augment_dim=0")
    with pytest.raises(RecipeError, match="gives 6 conditioning labels but the backbone") as err:
        Trainer(recipe, data, str(tmp_path / "bad"))
    assert err.value.path == "backbone.params.augment_dim"
