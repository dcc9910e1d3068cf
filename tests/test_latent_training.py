"""Latent training end to end: VAE-encoded shards -> DiT -> decoded sample grids."""
from __future__ import annotations

import pytest

from data_fixtures import save_tiny_vae, write_image_folder
from mfrecipes.recipe import load_recipe
from mfrecipes.train.loop import Trainer

pytest.importorskip("diffusers")


def test_latent_run_decodes_grids_through_the_vae(tmp_path, monkeypatch):
    from mfrecipes.data.make_shards import build_latent_shards

    vae = save_tiny_vae(tmp_path / "vae")
    write_image_folder(tmp_path / "imgs", {"a": 4, "b": 4}, size=(40, 36))
    build_latent_shards(str(tmp_path / "imgs"), str(tmp_path / "shards"), vae=vae, resolution=32,
                        batch_size=4, samples_per_shard=4, progress=False, log=lambda _: None)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "run: {name: latent}\n"
        f"data: {{name: shards, params: {{urls: '{tmp_path}/shards/shard-{{000000..000001}}.tar',"
        f" vae: '{vae}'}}}}\n"
        "backbone: {name: dit_tiny_4, params: {}}\n"
        "objective: {name: meanflow, params: {class_dropout: 0.1}}\n"
        "train: {total_images: 16, global_batch_size: 8, progress_bar: false}\n"
        "eval: {nfe: [1], num_samples: 4, grid_size: 4}\n")
    from mfrecipes import plots

    calls = []
    real = plots.labelled_grid

    def spy(x, **kw):
        calls.append((tuple(x.shape), kw))
        return real(x, **kw)
    monkeypatch.setattr(plots, "labelled_grid", spy)
    r, d = load_recipe(str(recipe))
    trainer = Trainer(r, d, str(tmp_path / "run"))
    assert trainer.info.modality == "latent" and trainer.info.sample_shape == (4, 16, 16)
    assert trainer.info.num_classes == 2
    trainer.run()
    # the decoded grid is titled like the image grids, one column per class
    (shape, kw), = calls
    assert shape == (4, 3, 32, 32)
    assert kw == {"ncol": 2, "labels": [0, 1],
                  "title": "latent | 1-NFE | 16 images | EMA ema_0.9999"}
    grids = list((tmp_path / "run" / "samples").glob("nfe1-*.png"))
    assert len(grids) == 1
    from PIL import Image

    img = Image.open(grids[0])
    assert img.mode == "RGB" and min(img.size) >= 64  # decoded 32x32 RGB images, not latents
