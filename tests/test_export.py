"""`mfr export`, `mfrecipes.load_pretrained` and `mfrecipes.generate`: a trained model leaves its
run directory and samples the same in a fresh process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mfrecipes.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from mfrecipes.recipe import load_recipe
    from mfrecipes.train.loop import train

    out = str(tmp_path_factory.mktemp("runs") / "digits")
    recipe, data = load_recipe(os.path.join(REPO, "recipes", "quickstart.yaml"), [
        "train.global_batch_size=32", "train.progress_bar=false", "run.device=cpu",
        "train.total_images=64", "eval.every_images=null", "eval.num_samples=32",
        "eval.grid_size=16", "eval.nfe=[1]", "train.checkpoint_every_images=64",
        "train.log_every_images=32", "train.ema_decays=[0.999,0.9]"])
    train(recipe, data, out)
    return out


def _exported(digits_run, tmp_path, *extra):
    out = tmp_path / "exported"
    assert main(["export", digits_run, "--out", str(out), *extra]) == 0
    return out


def test_export_writes_self_describing_folder(digits_run, tmp_path, capsys):
    from safetensors.torch import load_file

    out = _exported(digits_run, tmp_path, "--ema", "ema_0.9")
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["backbone"]["name"] == "dit_tiny_2" and "depth 4" in cfg["backbone"]["description"]
    assert cfg["data"] == {"name": "digits", "modality": "image", "sample_shape": [1, 8, 8],
                           "num_classes": 10, "latent_scale": None, "vae": None}
    assert cfg["weights"] == "ema_0.9" and cfg["images"] == 64
    # the chosen weights, unprefixed, equal the checkpoint's group read independently
    flat = load_file(os.path.join(digits_run, "checkpoints", "img-000000000064",
                                  "weights.safetensors"))
    mine = load_file(str(out / "model.safetensors"))
    group = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith("ema_0.9/")}
    assert set(mine) == set(group) and all(torch.equal(mine[k], group[k]) for k in group)
    card = (out / "README.md").read_text()
    assert "quickstart" in card and "64 images" in card and "eval/nfe1/fd_digits" in card


def test_round_trip_identical_samples_in_fresh_process(digits_run, tmp_path):
    from mfrecipes.evaluate.load import load_run
    from mfrecipes.generate import generate

    out = _exported(digits_run, tmp_path)
    dump = tmp_path / "fresh.pt"
    code = ("import sys, torch, mfrecipes\n"
            "assert 'torch' in sys.modules\n"
            f"m = mfrecipes.load_pretrained({str(out)!r})\n"
            "x, y = mfrecipes.generate(m, 12, nfe=2, seed=5, labels='balanced')\n"
            f"torch.save({{'x': x, 'y': y}}, {str(dump)!r})\n")
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    fresh = torch.load(dump)
    run = load_run(digits_run, weights="ema")          # the run directory's own path
    x, y = generate(run.net, run.info, 12, nfe=2, seed=5, labels="balanced")
    assert torch.equal(fresh["x"], x) and torch.equal(fresh["y"], y)
    assert x.shape == (12, 1, 8, 8) and not torch.equal(x, torch.zeros_like(x))


def test_load_pretrained_from_run_directory_matches_export(digits_run, tmp_path):
    import mfrecipes

    out = _exported(digits_run, tmp_path)
    a = mfrecipes.load_pretrained(out)
    net, info = mfrecipes.load_pretrained(digits_run)
    assert info == a.info
    xa, _ = mfrecipes.generate(a, 4, seed=1, labels=[0, 1, 2, 3])
    xb, _ = mfrecipes.generate(digits_run, 4, seed=1, labels=[0, 1, 2, 3])
    assert torch.equal(xa, xb)
    assert callable(mfrecipes.generate) and hasattr(mfrecipes.generate, "sample_meanflow")


def test_import_mfrecipes_stays_cheap():
    code = "import sys, mfrecipes; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": REPO}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.stdout.strip() == "False", r.stderr


def test_export_and_load_errors(digits_run, tmp_path, capsys):
    from mfrecipes.errors import CheckpointError
    import mfrecipes

    assert main(["export", digits_run, "--out", str(tmp_path / "x"), "--ema", "ema_0.5"]) == 2
    assert "ema_0.9" in capsys.readouterr().err            # lists the valid groups
    with pytest.raises(CheckpointError, match="neither an exported model"):
        mfrecipes.load_pretrained(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not an exported mfrecipes model"):
        mfrecipes.load_pretrained(bad)
