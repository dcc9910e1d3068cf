"""The logic of ``mfr sample`` and ``mfr eval``: a checkpoint's network -> samples -> files,
metrics.

Samplers (mfrecipes/METHOD.md, section 8): ``nfe`` steps of the average velocity (1-NFE, 2-NFE,
k-NFE), or with ``instantaneous`` Euler steps on ``u(z, t, h = 0)`` (Kim et al. 2025, Table 5).
Their metric and file tags are ``nfe<k>`` and ``euler<n>``.

Reproducibility: samples are drawn in blocks of :data:`BLOCK` (noise, then labels, from one CPU
generator per block; block 0 is seeded with ``seed`` itself, block k with ``seed + k * 1000003``),
so the samples depend on ``seed`` and ``num`` only, not on the device or the batch size, and
``mfr eval --labels balanced --num N`` on the final checkpoint reproduces the training loop's own
end-of-run evaluation (same EMA, seed ``eval.seed``, balanced labels).

Files of ``mfr sample`` (in ``--out``, default ``RUN_DIR/samples``), stem
``<checkpoint>-<weights>-<tag>-n<num>-s<seed>``:

- ``.png``: an image grid (image and latent data; latents are decoded through the run's VAE) or a
  scatter plot over reference points (2-D data);
- ``.npz``: ``x`` float32 (the model's output: images in [-1, 1], latents, or points) and ``y``
  (labels, -1 when unconditional); for image and latent data also ``arr_0`` uint8
  ``[N, H, W, C]`` via ``clip(127.5 x + 128)`` and ``arr_1`` = labels, ADM's sample layout, which
  FID tools read.

``mfr eval`` appends one JSON record per call to ``RUN_DIR/eval.jsonl`` with keys
``eval/<tag>/<metric>`` (as in metrics.jsonl) beside the checkpoint, weights and settings; on the
``mixture`` test bed also the exact metrics ``eval/exact/<metric>`` (``exact.py``), under the
guidance target of the recipe's (last stage's) objective.
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Any, Iterator, Optional, Sequence, Union

import attrs
import numpy as np
import torch

from mfrecipes.devices import pick_device
from mfrecipes.errors import DataError, RecipeError
from mfrecipes.run import layout

__all__ = ["SamplerSpec", "sampler_specs", "parse_labels", "iter_samples", "to_uint8_images",
           "sample_run", "eval_run", "append_eval", "format_record", "EVAL_FILE", "BLOCK"]

BLOCK = 10_000
EVAL_FILE = layout.EVAL  # RUN_DIR/eval.jsonl: the records of mfr eval
GRID_MAX = 100


@attrs.frozen
class SamplerSpec:
    """``steps`` network evaluations; ``instantaneous``: Euler on ``u(z, t, 0)``."""

    steps: int = attrs.field(validator=attrs.validators.ge(1))
    instantaneous: bool = False

    @property
    def tag(self) -> str:
        return f"euler{self.steps}" if self.instantaneous else f"nfe{self.steps}"


def sampler_specs(nfe: Sequence[int] = (1,), steps: Optional[Sequence[int]] = None,
                  instantaneous: bool = False) -> list[SamplerSpec]:
    """CLI semantics: ``--nfe K...`` average-velocity steps; ``--instantaneous`` with
    ``--steps N...`` (or, without ``--steps``, the ``--nfe`` values) Euler steps on the
    instantaneous velocity."""
    if steps and not instantaneous:
        raise RecipeError("--steps counts Euler steps of the instantaneous velocity and needs "
                          "--instantaneous; for the average-velocity sampler use --nfe K")
    counts = list(steps) if steps else list(nfe)
    bad = [k for k in counts if not isinstance(k, int) or k < 1]
    if not counts or bad:
        raise RecipeError(f"step counts must be integers >= 1, got {counts}")
    return [SamplerSpec(k, instantaneous) for k in dict.fromkeys(counts)]


def parse_labels(text: Optional[str], n: int, num_classes: Optional[int]):
    """``uniform`` | ``balanced`` | ``null`` (the null class: unconditional sampling of a
    conditional model) | ``"0,3,7"`` (these classes, cycled over the ``n`` samples)."""
    if text is None or text in ("uniform", "balanced"):
        return text
    if num_classes is None:
        raise RecipeError(f"--labels {text!r}: the run is unconditional; labels cannot be given",
                          path="--labels")
    if text == "null":
        return torch.full((n,), num_classes, dtype=torch.long)
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError as err:
        raise RecipeError(f"--labels {text!r}: valid: uniform, balanced, null or class indices "
                          f"such as 0,3,7", path="--labels") from err
    if not classes or any(not 0 <= c <= num_classes for c in classes):
        raise RecipeError(f"--labels {text!r}: classes must lie in 0..{num_classes - 1} "
                          f"({num_classes} = the null class)", path="--labels")
    return torch.tensor(classes, dtype=torch.long).repeat(n // len(classes) + 1)[:n]


def _block_seed(seed: int, k: int) -> int:
    return seed if k == 0 else seed + k * 1_000_003


def iter_samples(net, info, n: int, spec: SamplerSpec, *, seed: int = 0, labels=None,
                 device=None, batch_size: int = 256
                 ) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Yield ``(x [b, *sample_shape], y [b] or None)`` blocks (at most :data:`BLOCK`) summing
    to ``n`` samples (see the module docstring for the seeding)."""
    from mfrecipes.generate import generate

    for k, lo in enumerate(range(0, n, BLOCK)):
        b = min(BLOCK, n - lo)
        lab = labels[lo:lo + b] if isinstance(labels, torch.Tensor) else labels
        yield generate(net, info, b, nfe=spec.steps, seed=_block_seed(seed, k), device=device,
                       labels=lab, instantaneous=spec.instantaneous, batch_size=batch_size)


class _Decoder:
    """Model outputs -> uint8 images ``[N, H, W, C]`` (latents decoded through the run's VAE)."""

    def __init__(self, info, device, batch_size: int, vae: Optional[str] = None):
        self.info, self.device, self.batch_size = info, device, batch_size
        self._vae = None
        self._vae_id = vae or info.vae

    def vae(self):
        if self._vae is None:
            try:
                from mfrecipes.data.vae import load_vae
            except ImportError as err:
                raise DataError(f"decoding latents needs mfrecipes.data.vae ({err})") from err
            self._vae = load_vae(self._vae_id, self.device)
        return self._vae

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` in [-1, 1] on the CPU."""
        if self.info.modality == "latent":
            from mfrecipes.data.vae import decode_latents

            return decode_latents(x, self.info, vae=self.vae(), batch_size=self.batch_size)
        if self.info.modality != "image":
            raise DataError(f"dataset {self.info.name!r} is {self.info.modality!r}: it has no "
                            f"images (FID needs image or latent data)")
        return x.detach().float().cpu()

    def uint8(self, x: torch.Tensor) -> np.ndarray:
        return to_uint8_images(self.images(x))


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` in [-1, 1] -> ``[N, H, W, C]`` uint8 via ``clip(127.5 x + 128)``."""
    from mfrecipes.plots import images_to_uint8

    return images_to_uint8(x)


def _stem(run, spec: SamplerSpec, num: int, seed: int) -> str:
    return f"{run.checkpoint_name}-{run.weights}-{spec.tag}-n{num}-s{seed}"


def sample_run(run_dir: str, *, spec: SamplerSpec = SamplerSpec(1), weights: str = "ema",
               checkpoint: Optional[str] = None, num: int = 64, labels: Optional[str] = "uniform",
               seed: int = 0, out: Optional[str] = None, batch_size: int = 256,
               device: Optional[str] = "auto", vae: Optional[str] = None) -> dict[str, Any]:
    """Draw ``num`` samples and write the grid / scatter PNG and the ``.npz``; returns a summary
    with the paths."""
    from mfrecipes import plots
    from mfrecipes.evaluate.load import load_run

    if num < 1:
        raise RecipeError(f"--num must be >= 1, got {num}", path="--num")
    dev = pick_device(device, where="--device")
    run = load_run(run_dir, checkpoint=checkpoint, weights=weights, device=dev)
    info = run.info
    lab = parse_labels(labels, num, info.num_classes)
    xs, ys = [], []
    for x, y in iter_samples(run.net, info, num, spec, seed=seed, labels=lab, device=dev,
                             batch_size=batch_size):
        xs.append(x.float().cpu())
        ys.append(None if y is None else y.cpu())
    x = torch.cat(xs)
    y = None if ys[0] is None else torch.cat(ys)
    out = out or layout.samples_dir(run_dir)
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, _stem(run, spec, num, seed))
    arrays: dict[str, np.ndarray] = {
        "x": x.numpy(), "y": (y.numpy() if y is not None else np.full(num, -1, np.int64))}
    png = stem + ".png"
    title = (f"{os.path.basename(os.path.normpath(run_dir))} | {spec.tag} | {run.images:,} "
             f"images | {run.weights}")
    if info.modality == "points":
        plots.save_samples(x, png, modality="points", title=title, labels=y,
                           reference=run.get_dataset().reference(num, seed))
    else:
        # Latents are decoded once, for the .npz and the picture alike (the grid's pixels are
        # the .npz's uint8 images).
        images = _Decoder(info, dev, min(batch_size, 64), vae).images(x)
        arrays["arr_0"] = to_uint8_images(images)
        arrays["arr_1"] = arrays["y"]
        balanced = labels == "balanced" and info.num_classes
        plots.save_samples(images[:GRID_MAX], png, modality="image", title=title,
                           class_columns=info.num_classes if balanced else None)
    npz = stem + ".npz"
    tmp = f"{stem}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, npz)
    return {"run_dir": run_dir, "checkpoint": run.checkpoint, "images": run.images,
            "weights": run.weights, "sampler": spec.tag, "num": num, "seed": seed,
            "labels": labels, "png": png, "npz": npz,
            "shapes": {k: list(v.shape) for k, v in arrays.items()}}


def _reference_from_shards(url: str, *, n: int, seed: int, extractor, mode: str, device,
                           batch_size: int, vae: Optional[str]
                           ) -> tuple[np.ndarray, np.ndarray, int]:
    """Feature statistics ``(mu, sigma, count)`` of ``n`` real samples of the shard set ``url``
    (all of them when it holds fewer; images in [-1, 1], or latents decoded through the set's
    VAE)."""
    from mfrecipes import registry
    from mfrecipes.evaluate.fid import FeatureStats, image_features

    from mfrecipes.plugins import load_components

    load_components()
    ds = registry.DATASETS.build({"name": "shards", "params": {"urls": url, "conditional": False}},
                                 where="--ref-shards", seed=seed, rank=0, world_size=1)
    real = ds.reference(n, seed)
    if real.shape[0] < 2:
        raise DataError(f"--ref-shards {url!r} gave {real.shape[0]} samples; need at least 2")
    decoder = _Decoder(ds.info, device, min(batch_size, 64), vae)
    acc = FeatureStats()
    for lo in range(0, real.shape[0], BLOCK):
        acc.add(image_features(decoder.uint8(real[lo:lo + BLOCK]), extractor, mode=mode,
                               batch_size=batch_size, device=device))
    return (*acc.stats(), int(real.shape[0]))


# ``--ref-shards train``: the statistics of the run's own training shards (e.g. all 50,000
# CIFAR-10 training images, the CIFAR-10 protocol of datasets/cifar10.md).
TRAIN_SHARDS = "train"


def _training_shards(recipe) -> str:
    data = recipe.data
    urls = data.params.get("urls") if data.name == "shards" else None
    if not urls:
        raise RecipeError(f"--ref-shards {TRAIN_SHARDS} needs a run trained on shards (data.name: "
                          f"shards with data.params.urls); this run's data is {data.name!r}: pass "
                          f"--ref-shards URL or --ref STATS.npz", path="--ref-shards")
    if not isinstance(urls, str):
        urls = " ".join(urls) if len(urls) == 1 else None
        if urls is None:
            raise RecipeError("--ref-shards train: the run's data.params.urls is a list of "
                              "several patterns; pass one of them with --ref-shards URL",
                              path="--ref-shards")
    return urls


def eval_run(run_dir: str, *, specs: Sequence[SamplerSpec] = (SamplerSpec(1),),
             weights: str = "ema", checkpoint: Optional[str] = None, num: Optional[int] = None,
             labels: Optional[str] = None, seed: Optional[int] = None,
             ref: Optional[str] = None, ref_shards: Optional[str] = None,
             ref_num: int = 50_000, save_ref: Optional[str] = None,
             mode: str = "legacy_tensorflow", inception: Optional[str] = None,
             batch_size: int = 256, device: Optional[str] = "auto", vae: Optional[str] = None,
             write: bool = True) -> dict[str, Any]:
    """Metrics of a checkpoint for each sampler in ``specs``; appended to ``RUN_DIR/eval.jsonl``.

    FID (clean-fid pipeline, ``mode``) when ``ref`` (an ``.npz`` of mu / sigma) or ``ref_shards``
    (a shard URL, ``ref_num`` real samples; ``"train"``: the run's own training shards, its
    recipe's ``data.params.urls``) is given; the dataset's own metrics (digits Frechet
    distance, 2-D sliced Wasserstein) whenever it has some. Defaults: ``num`` 50,000 for FID,
    else the recipe's ``eval.num_samples``; ``seed`` the recipe's ``eval.seed``; labels uniform
    for FID (the protocol), else balanced (as the training loop evaluates).
    """
    from mfrecipes import evaluate
    from mfrecipes.evaluate import fid as fidmod
    from mfrecipes.evaluate.load import load_run
    from mfrecipes.data.cache import default_cache_dir

    if ref and ref_shards:
        raise RecipeError("give either --ref STATS.npz or --ref-shards URL, not both")
    dev = pick_device(device, where="--device")
    run = load_run(run_dir, checkpoint=checkpoint, weights=weights, device=dev)
    info, ev = run.info, run.recipe.eval
    if ref_shards == TRAIN_SHARDS:
        ref_shards = _training_shards(run.recipe)
    want_fid = bool(ref or ref_shards)
    has_quality = (info.name in evaluate.QUALITY_BY_NAME
                   or info.modality in evaluate.QUALITY_BY_MODALITY)
    if not want_fid and not has_quality:
        raise RecipeError(f"no metric for dataset {info.name!r} ({info.modality}) without "
                          f"reference statistics: pass --ref STATS.npz (mu, sigma; e.g. ADM's "
                          f"VIRTUAL_imagenet256_labeled.npz) or --ref-shards URL for FID")
    num = num or (50_000 if want_fid else ev.num_samples)
    seed = ev.seed if seed is None else seed
    labels = labels or ("uniform" if want_fid else "balanced")
    lab = parse_labels(labels, num, info.num_classes)
    cache = default_cache_dir(run.recipe)

    record: dict[str, Any] = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "images": run.images, "checkpoint": run.checkpoint_name, "weights": run.weights,
        "num": num, "seed": seed, "labels": labels}
    extractor = mu_ref = sigma_ref = None
    if want_fid:
        decoder = _Decoder(info, dev, min(batch_size, 64), vae)
        if ref:  # the cheap checks first: the statistics file, then the weights
            mu_ref, sigma_ref = fidmod.load_ref_stats(ref, mode=mode)
        extractor = fidmod.load_extractor(mode, inception, device=dev, cache_dir=cache)
        if not ref:
            mu_ref, sigma_ref, got = _reference_from_shards(
                ref_shards, n=ref_num, seed=0, extractor=extractor, mode=mode, device=dev,
                batch_size=batch_size, vae=vae)
            record["ref_num"] = got  # all of a set smaller than ref_num
            if save_ref:
                fidmod.save_ref_stats(save_ref, mu_ref, sigma_ref, source=ref_shards,
                                      mode=mode, num=got)
        record.update(mode=mode, ref=ref or ref_shards,
                      inception=fidmod.find_inception(inception, mode=mode, cache_dir=cache,
                                                      download=False))
    for spec in specs:
        kept, feats = [], []
        for x, _ in iter_samples(run.net, info, num, spec, seed=seed, labels=lab, device=dev,
                                 batch_size=batch_size):
            if has_quality:
                kept.append(x.float().cpu())
            if want_fid:
                feats.append(fidmod.image_features(decoder.uint8(x), extractor, mode=mode,
                                                   batch_size=batch_size, device=dev))
        if want_fid:
            record[f"eval/{spec.tag}/{fidmod.fid_key(mode)}"] = fidmod.fid_from_features(
                feats, mu_ref, sigma_ref)
        if has_quality:
            q = evaluate.quality(run.get_dataset(), torch.cat(kept), cache_dir=cache, seed=seed)
            record.update({f"eval/{spec.tag}/{k}": v for k, v in q.items()})
    from mfrecipes.evaluate import exact

    if info.name == "mixture" and exact.applies(run.get_dataset()):  # the test bed: noise-free metrics vs the exact flow
        from mfrecipes.build import build_light, stage_plan

        last = stage_plan(run.recipe)[-1].recipe
        objective = build_light(last, num_classes=info.num_classes, device=dev).objective
        record.update({f"eval/exact/{k}": v for k, v in exact.run_exact(
            run.net, run.get_dataset(), objective, cache_dir=cache, device=dev).items()})
    if write:
        append_eval(run_dir, record)
    return record


def append_eval(run_dir: str, record: dict) -> str:
    path = os.path.join(run_dir, EVAL_FILE)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    return path


def format_record(record: dict, *, as_json: bool = False) -> Union[str, Any]:
    """JSON text, or a rich Table of the settings (dim) and the metrics."""
    if as_json:
        return json.dumps(record)
    from rich.table import Table

    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in ("checkpoint", "weights", "num", "seed", "labels", "mode"):
        if k in record:
            table.add_row(f"[dim]{k}[/dim]", f"[dim]{record[k]}[/dim]")
    for k, v in record.items():
        if k.startswith("eval/"):
            table.add_row(k, f"{v:.6g}")
    return table
