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
    from mfrecipes.build import check_recipe

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



def test_colour_augmentation_trains_with_twelve_labels(archive, tmp_path):
    """colour: true gives 12 labels: a unet_tiny with augment_dim 12 trains on them (every colour
    label's input weight moves, so the labels reach the network), and augment_dim 6 is refused
    with the message naming 12."""
    from mfrecipes.errors import RecipeError
    from mfrecipes.train.loop import Trainer

    colour = ["train.augment.params.colour=true", "train.augment.params.p=1.0"]
    recipe, data = _cpu_meanflow(archive, tmp_path, *colour, "backbone.params.augment_dim=12",
                                 "train.total_images=16", "train.lr_schedule.kind=constant")
    trainer = Trainer(recipe, data, str(tmp_path / "colour"))
    before = trainer.net.map_augment.weight.detach().clone()
    assert before.shape[1] == 12
    out = trainer.run()
    assert out["images"] == 16 and out["nonfinite"] == 0
    moved = (trainer.net.map_augment.weight.detach() != before).any(dim=0)
    # p = 1: every label was nonzero somewhere (the zero-initialised output layer passes no
    # gradient to the label projection at the first step, hence two steps, at a constant rate:
    # the cosine schedule would reach 0 on the last one)
    assert moved.all()
    recipe, data = _cpu_meanflow(archive, tmp_path, *colour)    # augment_dim 6 stays
    with pytest.raises(RecipeError, match="gives 12 conditioning labels.*augment_dim: 12") as err:
        Trainer(recipe, data, str(tmp_path / "bad"))
    assert err.value.path == "backbone.params.augment_dim"

# -- FID on CIFAR-10 (mfr eval) ------------------------------------------------------------------
class _TinyFeatures(torch.nn.Module):
    """A stand-in for the Inception file: a custom TorchScript extractor (no ``layers``), fed the
    299 x 299 clean-mode batch in [0, 255]."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 7, stride=5)

    def forward(self, x):
        return torch.tanh(self.conv(x / 128 - 1)).mean(dim=(2, 3))   # [N, 5]


def _frechet(a, b):  # float64, scipy's matrix square root: independent of clean-fid's
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def test_fid_against_the_training_shards(archive, tmp_path, capsys, monkeypatch):
    """`mfr eval RUN --ref-shards train --mode clean --nfe 1 2`: reference statistics from all of
    the run's training images (here the 30 of a fake archive), samples at 1 and 2 NFE; both FIDs
    against features computed here from the archive itself and from `mfr sample`."""
    from cleanfid.resize import build_resizer

    from mfrecipes.cli import main
    from mfrecipes.evaluate import fid as fidmod
    from mfrecipes.train.loop import Trainer

    recipe, data = _cpu_meanflow(archive, tmp_path, "train.checkpoint_every_images=16")
    run = str(tmp_path / "run")
    Trainer(recipe, data, run).run()
    torch.manual_seed(0)
    module = _TinyFeatures().eval()
    weights = str(tmp_path / "tiny.pt")
    torch.jit.script(module).save(weights)

    def cli(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = cli("eval", run, "--ref-shards", "train", "--mode", "clean", "--nfe", "1,2",
                         "--inception", weights, "--num", 24, "--save-ref", tmp_path / "ref.npz",
                         "--json", "--device", "cpu")
    assert code == 0, err
    rec = json.loads(out)
    assert rec["ref_num"] == 5 * PER_BATCH and rec["ref"].endswith("shard-{000000..000002}.tar")

    resize = build_resizer("clean")

    def feats(u8):                                    # [N, H, W, 3] uint8 -> [N, 5] float64
        x = np.stack([np.asarray(resize(img), dtype=np.float32) for img in u8])
        with torch.no_grad():
            return module(torch.from_numpy(x).permute(0, 3, 1, 2)).double().numpy()

    real, _ = read_cifar10_archive(archive[0], "train")      # uint8 [N, 3, 32, 32]
    fr = feats(real.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.load(tmp_path / "ref.npz")["mu"], fr.mean(0), rtol=1e-5,
                               atol=1e-7)
    for nfe in (1, 2):
        code, out, err = cli("sample", run, "--nfe", nfe, "--num", 24, "--out", tmp_path / "s",
                             "--device", "cpu")
        assert code == 0, err
        fg = feats(np.load(json.loads(out)["npz"])["arr_0"])
        assert rec[f"eval/nfe{nfe}/fid_clean"] == pytest.approx(_frechet(fg, fr), rel=1e-4)
    assert rec["eval/nfe1/fid_clean"] != rec["eval/nfe2/fid_clean"]

    # clean-fid's precomputed statistics name their mode: another mode is refused
    np.savez(tmp_path / "cifar10_legacy_tensorflow_train_32.npz", mu=fr.mean(0),
             sigma=np.cov(fr, rowvar=False))
    code, _, err = cli("eval", run, "--ref", tmp_path / "cifar10_legacy_tensorflow_train_32.npz",
                       "--mode", "clean", "--inception", weights, "--device", "cpu")
    assert code == 2 and "computed in mode 'legacy_tensorflow', not 'clean'" in err

    # no weights anywhere and no network: one error naming the file and where to put it
    monkeypatch.setattr(fidmod, "_download", lambda url, dest: (_ for _ in ()).throw(
        OSError("network is unreachable")))
    monkeypatch.setattr(fidmod.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.delenv("MFR_INCEPTION", raising=False)
    code, _, err = cli("eval", run, "--ref-shards", "train", "--mode", "clean", "--device", "cpu")
    assert code == 2 and err.count("Error") <= 1
    assert fidmod.INCEPTION_URL in err and "--inception PATH" in err
