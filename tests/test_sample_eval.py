"""`mfr sample` / `mfr eval` on tiny trained runs, and the loop's periodic evaluation.

References are independent of the code under test: the sampler is re-written by hand from the
checkpoint's safetensors file, FID is recomputed from the stand-in network's features with scipy,
and the loop's own metrics.jsonl is the reference for `mfr eval`'s embedded metrics.
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from mfrecipes.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["train.global_batch_size=64", "train.progress_bar=false", "run.device=cpu"]


def _train(recipe: str, out: str, overrides: list[str]) -> str:
    from mfrecipes.recipe import load_recipe
    from mfrecipes.train.loop import train

    recipe, data = load_recipe(os.path.join(REPO, "recipes", recipe), SMALL + overrides)
    train(recipe, data, out)
    return out


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "digits")
    return _train("quickstart.yaml", out, [
        "train.total_images=256", "eval.every_images=128", "eval.num_samples=64",
        "eval.grid_size=16", "train.checkpoint_every_images=128", "train.log_every_images=64",
        "train.ema_decays=[0.999,0.9]"])


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "toy")
    return _train("toy2d_meanflow.yaml", out, [
        "train.total_images=512", "eval.every_images=null", "eval.num_samples=256",
        "eval.grid_size=256", "train.log_every_images=256"])


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------- periodic evaluation (loop)

def test_periodic_eval_records_and_tensorboard(digits_run):
    evals = [r for r in _metrics(digits_run) if any(k.startswith("eval/") for k in r)]
    # every 128 images during training, and once at the end (256 = the end)
    assert [r["images"] for r in evals] == [128, 256]
    for r in evals:
        assert set(k for k in r if k.startswith("eval/")) == {"eval/nfe1/fd_digits",
                                                              "eval/nfe2/fd_digits"}
        assert all(np.isfinite(r[k]) for k in r if k.startswith("eval/"))
    assert sorted(os.listdir(os.path.join(digits_run, "samples"))) == [
        "nfe1-img000000000128.png", "nfe1-img000000000256.png",
        "nfe2-img000000000128.png", "nfe2-img000000000256.png"]
    events = glob.glob(os.path.join(digits_run, "tensorboard", "events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    scalars = acc.Scalars("eval/nfe1/fd_digits")
    assert [s.step for s in scalars] == [128, 256]
    np.testing.assert_allclose([s.value for s in scalars],
                               [r["eval/nfe1/fd_digits"] for r in evals], rtol=1e-6)


# ------------------------------------------------------------------------------------ mfr eval

def test_eval_reproduces_the_loops_final_metrics(digits_run, capsys):
    code, out, _ = _cli(capsys, "eval", digits_run, "--nfe", "1,2", "--labels", "balanced",
                        "--num", 64, "--json", "--device", "cpu")
    assert code == 0
    rec = json.loads(out)
    final = [r for r in _metrics(digits_run) if "eval/nfe1/fd_digits" in r][-1]
    assert rec["images"] == 256 and rec["weights"] == "ema_0.999"
    for k in ("eval/nfe1/fd_digits", "eval/nfe2/fd_digits"):
        assert rec[k] == pytest.approx(final[k], rel=1e-9)
    with open(os.path.join(digits_run, "eval.jsonl")) as f:
        assert json.loads(f.readlines()[-1]) == rec


def test_eval_checkpoint_weights_and_errors(digits_run, capsys):
    code, out, _ = _cli(capsys, "eval", digits_run, "--checkpoint", "img-000000000128",
                        "--weights", "raw", "--num", 32, "--json", "--device", "cpu")
    rec = json.loads(out)
    assert code == 0 and rec["images"] == 128 and rec["weights"] == "net"
    code, _, err = _cli(capsys, "eval", digits_run, "--weights", "ema_0.5", "--device", "cpu")
    assert code == 2 and "ema_0.9" in err and "ema_0.999" in err
    code, _, err = _cli(capsys, "eval", digits_run, "--steps", 4, "--device", "cpu")
    assert code == 2 and "--instantaneous" in err
    code, _, err = _cli(capsys, "eval", digits_run, "--checkpoint", "img-9", "--device", "cpu")
    assert code == 2 and "img-000000000256" in err
    code, _, err = _cli(capsys, "sample", os.path.dirname(digits_run), "--device", "cpu")
    assert code == 2 and "not a run directory" in err


# ---------------------------------------------------------------------------------- mfr sample

def _ema_net(run, key="ema_0.999"):
    from safetensors.torch import load_file

    from mfrecipes.plugins import load_components
    from mfrecipes.registry import BACKBONES

    load_components()
    flat = load_file(os.path.join(run, "checkpoints", "img-000000000256", "weights.safetensors"))
    sd = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith(key + "/")}
    net = BACKBONES.build({"name": "dit_tiny_2", "params": {}}, input_shape=(1, 8, 8),
                          num_classes=10)
    net.load_state_dict(sd)
    return net.eval()


def test_sample_two_nfe_matches_hand_written_sampler(digits_run, tmp_path, capsys):
    code, out, _ = _cli(capsys, "sample", digits_run, "--nfe", 2, "--num", 12, "--labels",
                        "0,3,7", "--seed", 3, "--out", tmp_path, "--device", "cpu")
    assert code == 0
    summary = json.loads(out)
    data = np.load(summary["npz"])
    assert os.path.isfile(summary["png"]) and summary["png"].endswith("-ema_0.999-nfe2-n12-s3.png")
    y = torch.tensor([0, 3, 7] * 4)
    assert data["y"].tolist() == y.tolist() and data["arr_1"].tolist() == y.tolist()
    # the noise comes first from a CPU generator seeded with the seed; two steps of 1/2
    z = torch.randn((12, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    net = _ema_net(digits_run)
    with torch.no_grad():
        half = torch.full((12,), 0.5)
        z = z - 0.5 * net(z, torch.ones(12), half, y)        # t = 1 -> 0.5, h = 0.5
        x = z - 0.5 * net(z, half, half, y)                  # t = 0.5 -> 0
    np.testing.assert_allclose(data["x"], x.numpy(), atol=1e-5)
    expect_u8 = np.clip(np.floor(127.5 * data["x"] + 128), 0, 255).astype(np.uint8)
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (12, 8, 8, 1)
    assert np.abs(data["arr_0"].astype(int) - expect_u8.transpose(0, 2, 3, 1)).max() <= 1


def test_sample_instantaneous_euler(digits_run, tmp_path, capsys):
    code, out, _ = _cli(capsys, "sample", digits_run, "--instantaneous", "--steps", 2, "--num", 5,
                        "--labels", "balanced", "--out", tmp_path, "--device", "cpu")
    assert code == 0
    data = np.load(json.loads(out)["npz"])
    z = torch.randn((5, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    y = torch.arange(5)
    net = _ema_net(digits_run)
    with torch.no_grad():
        zero = torch.zeros(5)
        z = z - 0.5 * net(z, torch.ones(5), zero, y)           # h = 0: u(z, t, t)
        x = z - 0.5 * net(z, torch.full((5,), 0.5), zero, y)
    np.testing.assert_allclose(data["x"], x.numpy(), atol=1e-5)


def test_sample_points_scatter_and_swd(toy_run, tmp_path, capsys):
    code, out, _ = _cli(capsys, "sample", toy_run, "--num", 100, "--out", tmp_path,
                        "--device", "cpu")
    assert code == 0
    summary = json.loads(out)
    data = np.load(summary["npz"])
    assert data["x"].shape == (100, 2) and "arr_0" not in data.files
    assert (data["y"] == -1).all() and os.path.getsize(summary["png"]) > 1000
    code, out, _ = _cli(capsys, "eval", toy_run, "--nfe", "1,2", "--num", 256, "--json",
                        "--device", "cpu")
    rec = json.loads(out)
    final = [r for r in _metrics(toy_run) if "eval/nfe1/swd" in r][-1]
    assert rec["eval/nfe1/swd"] == pytest.approx(final["eval/nfe1/swd"], rel=1e-9)
    code, _, err = _cli(capsys, "sample", toy_run, "--labels", "0,1", "--device", "cpu")
    assert code == 2 and "unconditional" in err


# --------------------------------------------------------------------------- FID with clean-fid

class _Layers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 5, stride=4)

    def forward(self, x):
        return torch.tanh(self.conv(x)).mean(dim=(2, 3), keepdim=True)   # [N, 6, 1, 1]


class StandInInception(nn.Module):
    """The interface of clean-fid's inception-2015-12-05.pt: ``layers`` on 299 x 299 inputs
    normalised to [-1, 1], and ``forward(x, return_features=True)`` resizing inside."""

    def __init__(self):
        super().__init__()
        self.layers = _Layers()

    def forward(self, x, return_features: bool = False):
        x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128).flatten(1)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    torch.manual_seed(0)
    module = StandInInception().eval()
    path = str(tmp_path_factory.mktemp("inception") / "inception-2015-12-05.pt")
    torch.jit.script(module).save(path)
    return path, module


def test_fid_against_shard_reference_matches_scipy(digits_run, standin, tmp_path, capsys):
    from mfrecipes.data.digits import load_digits_tensors
    from mfrecipes.evaluate.fd import frechet_distance

    path, module = standin
    cache = os.environ["MFR_CACHE_DIR"]
    urls = os.path.join(cache, "digits-r8", "shard-{000000..000003}.tar")
    ref_file = tmp_path / "ref.npz"
    code, out, err = _cli(capsys, "eval", digits_run, "--ref-shards", urls, "--ref-num", 5000,
                          "--save-ref", ref_file, "--inception", path, "--num", 50, "--json",
                          "--device", "cpu")
    assert code == 0, err
    rec = json.loads(out)
    assert rec["mode"] == "legacy_tensorflow" and rec["labels"] == "uniform"

    def feats(u8):                                    # [N, H, W, 1] uint8 -> features, float64
        x = torch.from_numpy(np.repeat(u8, 3, -1)).permute(0, 3, 1, 2).float()
        with torch.no_grad():
            return module(x, return_features=True).double().numpy()

    real, _ = load_digits_tensors(8)                  # all 1,797 digits: order does not matter
    real_u8 = (127.5 * real + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    fr = feats(real_u8)
    code, out, _ = _cli(capsys, "sample", digits_run, "--num", 50, "--out", tmp_path,
                        "--device", "cpu")
    fg = feats(np.load(json.loads(out)["npz"])["arr_0"])
    expect = frechet_distance(fg.mean(0), np.cov(fg, rowvar=False),
                              fr.mean(0), np.cov(fr, rowvar=False))
    assert rec["eval/nfe1/fid"] == pytest.approx(expect, rel=1e-5, abs=1e-7)
    saved = np.load(ref_file)
    np.testing.assert_allclose(saved["mu"], fr.mean(0), rtol=1e-6, atol=1e-9)

    # the saved statistics give the same number; in another mode they are refused
    code, out, _ = _cli(capsys, "eval", digits_run, "--ref", ref_file, "--inception", path,
                        "--num", 50, "--json", "--device", "cpu")
    assert json.loads(out)["eval/nfe1/fid"] == pytest.approx(rec["eval/nfe1/fid"], rel=1e-9)
    code, _, err = _cli(capsys, "eval", digits_run, "--ref", ref_file, "--inception", path,
                        "--mode", "clean", "--device", "cpu")
    assert code == 2 and "legacy_tensorflow" in err


def test_fid_clean_mode_identical_sets_near_zero(digits_run, standin, tmp_path, capsys):
    """Reference statistics from the same generated samples: FID ~ 0 through the clean path."""
    from mfrecipes.evaluate import fid as fidmod

    path, _ = standin
    code, out, _ = _cli(capsys, "sample", digits_run, "--num", 40, "--out", tmp_path,
                        "--device", "cpu")
    u8 = np.load(json.loads(out)["npz"])["arr_0"]
    ext = fidmod.load_extractor("clean", path)
    f = fidmod.image_features(u8, ext, mode="clean")
    assert f.shape == (40, 6)
    fidmod.save_ref_stats(tmp_path / "self.npz", f.mean(0), np.cov(f, rowvar=False), mode="clean")
    code, out, _ = _cli(capsys, "eval", digits_run, "--ref", tmp_path / "self.npz", "--mode",
                        "clean", "--inception", path, "--num", 40, "--labels", "uniform",
                        "--json", "--device", "cpu")
    assert json.loads(out)["eval/nfe1/fid_clean"] == pytest.approx(0.0, abs=1e-6)


def test_missing_inception_weights_message(digits_run, tmp_path, monkeypatch, capsys):
    from mfrecipes.evaluate import fid as fidmod

    def offline(url, dest):
        raise OSError("network is unreachable")

    monkeypatch.setattr(fidmod, "_download", offline)
    monkeypatch.setattr(fidmod.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.delenv("MFR_INCEPTION", raising=False)
    np.savez(tmp_path / "ref.npz", mu=np.zeros(6), sigma=np.eye(6))
    code, _, err = _cli(capsys, "eval", digits_run, "--ref", tmp_path / "ref.npz", "--device",
                        "cpu")
    assert code == 2
    assert fidmod.INCEPTION_URL in err and "--inception PATH" in err and "MFR_INCEPTION" in err
    assert "network is unreachable" in err
    code, _, err = _cli(capsys, "eval", digits_run, "--ref", tmp_path / "ref.npz", "--inception",
                        tmp_path / "nope.pt", "--device", "cpu")
    assert code == 2 and "nope.pt" in err and fidmod.INCEPTION_URL in err
    np.savez(tmp_path / "bad.npz", m=np.zeros(3))
    code, _, err = _cli(capsys, "eval", digits_run, "--ref", tmp_path / "bad.npz", "--device",
                        "cpu")
    assert code == 2 and "mu and sigma" in err
