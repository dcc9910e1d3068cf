"""Evaluation metrics against independent references (scipy, closed forms) and sanity orderings."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mfrecipes.data.base import DataInfo
from mfrecipes.evaluate import QUALITY_BY_NAME, quality, register_quality
from mfrecipes.evaluate.fd import feature_stats, frechet_distance
from mfrecipes.evaluate.swd import random_directions, sliced_wasserstein


# ---------------------------------------------------------------------------- sliced Wasserstein

def _scipy_swd(a, b, w):
    from scipy.stats import wasserstein_distance

    a, b, w = (np.asarray(v, np.float64) for v in (a, b, w))
    return float(np.mean([wasserstein_distance(a @ d, b @ d) for d in w]))


def test_directions_are_unit_and_seeded():
    w = random_directions(100, 3, seed=4)
    assert w.shape == (100, 3) and w.dtype == torch.float64
    torch.testing.assert_close(w.norm(dim=1), torch.ones(100, dtype=torch.float64))
    assert torch.equal(w, random_directions(100, 3, seed=4))
    assert not torch.equal(w, random_directions(100, 3, seed=5))


@pytest.mark.parametrize("n, m", [(300, 300), (300, 170), (7, 13)])
def test_swd_matches_scipy(n, m):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, 2, generator=g)
    b = torch.randn(m, 2, generator=g) * 1.5 + torch.tensor([0.5, -0.2])
    w = random_directions(50, 2, seed=1)
    got = sliced_wasserstein(a, b, num_projections=50, seed=1)
    assert got == pytest.approx(_scipy_swd(a, b, w), rel=1e-10, abs=1e-12)
    assert sliced_wasserstein(a, b, directions=w) == pytest.approx(got, rel=1e-12)


def test_swd_identity_and_translation():
    a = torch.randn(500, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert sliced_wasserstein(a, a.clone()) == 0.0
    assert sliced_wasserstein(a, a[torch.randperm(500)]) == pytest.approx(0.0, abs=1e-14)
    # Translating by s shifts every 1-D projection by <s, w>: W1 = |<s, w>| per direction.
    s = torch.tensor([0.7, -1.2, 0.4], dtype=torch.float64)
    w = random_directions(500, 3, seed=0)
    expect = float(sum(abs(float(s @ d)) for d in w) / len(w))
    assert sliced_wasserstein(a, a + s, num_projections=500, seed=0) == pytest.approx(expect, rel=1e-10)
    # Under uniform directions on S^2, E|<s, w>| = |s| / 2.
    b = a[:50]
    assert sliced_wasserstein(b, b + s, num_projections=20000) == pytest.approx(
        float(s.norm()) / 2, rel=0.02)


# ---------------------------------------------------------------------------- Frechet distance

def test_fd_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expect = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-9)


def test_fd_rotated_and_singular():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = rng.uniform(0.2, 2, 5), rng.uniform(0.2, 2, 5)
    # Same rotation on both covariances: they commute, FD equals the diagonal form.
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expect = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(np.zeros(5), s1, np.zeros(5), s2) == pytest.approx(expect, rel=1e-7)
    assert frechet_distance(np.ones(5), s1, np.ones(5), s1) == pytest.approx(0.0, abs=1e-6)
    # Singular covariances (rank 1): finite, and close to the closed form.
    e = np.zeros(5)
    e[0] = 1.0
    got = frechet_distance(e, np.diag(e * 4.0), np.zeros(5), np.diag(e * 1.0))
    assert np.isfinite(got) and got == pytest.approx(1.0 + (2.0 - 1.0) ** 2, abs=1e-4)


def test_feature_stats():
    f = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    mu, sigma = feature_stats(f)
    x = f.double().numpy()
    c = x - x.mean(0)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, c.T @ c / 49)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(torch.zeros(1, 4))


# ---------------------------------------------------------------------------- digits classifier

FAST_EPOCHS = 40         # = DEFAULT_EPOCHS; about 3 s of CPU training, cached for the module


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mfr_cache")


@pytest.fixture(scope="module")
def clf(digits_cache):
    from mfrecipes.evaluate.digits_classifier import load_digits_classifier

    return load_digits_classifier(digits_cache, epochs=FAST_EPOCHS)


@pytest.fixture(scope="module")
def digits():
    from mfrecipes.data.digits import load_digits_tensors

    return load_digits_tensors(8)


def test_classifier_accuracy_and_cache(clf, digits_cache):
    assert clf.accuracy >= 0.97
    files = sorted(p.name for p in digits_cache.iterdir())
    assert files == [f"digits_cnn_v1_s0_e{FAST_EPOCHS}.json", f"digits_cnn_v1_s0_e{FAST_EPOCHS}.safetensors"]
    meta = json.loads((digits_cache / files[0]).read_text())
    assert meta["accuracy"] == clf.accuracy and meta["version"] == 1
    assert "accuracy=" in repr(clf)


def test_classifier_features_shape_and_resize(clf, digits):
    from mfrecipes.evaluate.digits_classifier import digits_features

    x, _ = digits
    f8 = digits_features(x[:20], classifier=clf)
    assert f8.shape == (20, 64)
    # A 16x16 nearest-upsampled copy is area-downsampled back to the same 8x8 image.
    x16 = F.interpolate(x[:20], scale_factor=2, mode="nearest")
    torch.testing.assert_close(digits_features(x16, classifier=clf), f8, rtol=1e-5, atol=1e-5)


def test_classifier_reload_and_corrupt_cache(tmp_path, monkeypatch):
    from mfrecipes.evaluate import digits_classifier as dc

    monkeypatch.setattr(dc, "_MEMO", {})
    first = dc.load_digits_classifier(tmp_path, epochs=2)
    weights = tmp_path / "digits_cnn_v1_s0_e2.safetensors"
    monkeypatch.setattr(dc, "_MEMO", {})
    trained = []
    monkeypatch.setattr(dc, "_train", lambda *a, _t=dc._train: trained.append(1) or _t(*a))
    again = dc.load_digits_classifier(tmp_path, epochs=2)          # loaded from disk, not retrained
    assert trained == [] and again.accuracy == first.accuracy
    np.testing.assert_array_equal(again.ref_sigma, first.ref_sigma)
    weights.write_bytes(b"not a safetensors file")
    monkeypatch.setattr(dc, "_MEMO", {})
    fixed = dc.load_digits_classifier(tmp_path, epochs=2)          # corrupt -> retrained
    assert trained == [1] and fixed.accuracy == first.accuracy     # same seed, same model
    assert weights.stat().st_size > 1000


def test_digits_fd_ordering(clf, digits):
    from mfrecipes.evaluate.digits_classifier import digits_fd

    x, _ = digits
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    half = x[perm[: len(x) // 2]]
    g = torch.Generator().manual_seed(1)
    k = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16                # 3x3 Gaussian blur
    blurred = F.conv2d(F.pad(half, (1, 1, 1, 1), mode="replicate"), k.view(1, 1, 3, 3))
    mild_blur = 0.75 * half + 0.25 * blurred
    shifted = torch.roll(F.pad(half, (1, 1, 1, 1), value=-1.0), (1, 1), (2, 3))[..., 1:-1, 1:-1]

    def noisy(sigma):
        return (half + sigma * torch.randn(half.shape, generator=g)).clamp(-1, 1)

    fd = {name: digits_fd(s, classifier=clf) for name, s in [
        ("real", half), ("mild_blur", mild_blur), ("blurred", blurred), ("shifted", shifted),
        ("noisy_0.1", noisy(0.1)), ("noisy_0.4", noisy(0.4)),
        ("noise", torch.randn(half.shape, generator=g).clamp(-1, 1))]}
    assert 0 <= fd["real"] < 0.5 * fd["noisy_0.1"]
    assert fd["noisy_0.1"] < fd["noisy_0.4"] < fd["noise"]
    assert fd["real"] < fd["mild_blur"] < fd["blurred"]
    assert 5 * fd["real"] < fd["shifted"] < fd["noise"]
    assert fd["noise"] > 100 * fd["real"]
    # Two disjoint real halves (no shared samples, so a larger finite-sample bias than above).
    mu_a, s_a = feature_stats(clf.features(half))
    mu_b, s_b = feature_stats(clf.features(x[perm[len(x) // 2:]]))
    fd_halves = frechet_distance(mu_a, s_a, mu_b, s_b)
    assert fd_halves < 0.2 * fd["shifted"] and fd_halves < 0.02 * fd["noise"]


# ---------------------------------------------------------------------------- quality dispatch

class FakeDataset:
    def __init__(self, info, ref_fn):
        self.info = info
        self._ref = ref_fn
        self.calls = []

    def reference(self, n, seed):
        self.calls.append((n, seed))
        return self._ref(n, seed)


def test_quality_points():
    shift = torch.tensor([1.0, 0.0])
    ds = FakeDataset(DataInfo("two_moons", "points", (2,)),
                     lambda n, seed: torch.randn(n, 2, generator=torch.Generator().manual_seed(seed)))
    samples = ds.reference(1000, 3) + shift
    out = quality(ds, samples, seed=3)
    assert ds.calls[-1] == (1000, 3) and set(out) == {"swd"}
    expect = float(np.mean(np.abs(random_directions(500, 2, seed=3).numpy() @ shift.numpy())))
    assert out["swd"] == pytest.approx(expect, rel=1e-9)      # same points, translated


def test_quality_digits_and_others(clf, digits, digits_cache):
    from mfrecipes.evaluate import digits_classifier as dc

    x, _ = digits
    ds = FakeDataset(DataInfo("digits", "image", (1, 8, 8), num_classes=10), None)
    assert dc.DEFAULT_EPOCHS == FAST_EPOCHS            # quality() uses the cached default model
    out = quality(ds, x[:500], cache_dir=digits_cache)
    assert set(out) == {"fd_digits"}
    assert out["fd_digits"] == pytest.approx(dc.digits_fd(x[:500], classifier=clf), rel=1e-9)
    other = FakeDataset(DataInfo("imagenet256", "latent", (4, 32, 32), num_classes=1000), None)
    assert quality(other, torch.zeros(2, 4, 32, 32)) == {}


def test_quality_registry_extension(monkeypatch):
    monkeypatch.setattr("mfrecipes.evaluate.QUALITY_BY_NAME", dict(QUALITY_BY_NAME))
    import mfrecipes.evaluate as ev

    @register_quality(name="cifar10")
    def _fake(dataset, samples, *, cache_dir, seed):
        return {"fid": 1.5 + seed}

    ds = FakeDataset(DataInfo("cifar10", "image", (3, 32, 32), num_classes=10), None)
    assert ev.quality(ds, torch.zeros(2, 3, 32, 32), seed=1) == {"fid": 2.5}
    with pytest.raises(ValueError):
        register_quality(name="x", modality="image")


# ------------------------------------------------------------------------ FID pipeline pieces

def test_feature_stats_running_matches_numpy():
    from mfrecipes.evaluate.fid import FeatureStats

    rng = np.random.default_rng(0)
    f = rng.normal(size=(301, 5)) * [1, 2, 3, 4, 5] + 7
    acc = FeatureStats()
    for lo in range(0, 301, 64):
        acc.add(f[lo:lo + 64])
    mu, sigma = acc.stats()
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-9, atol=1e-9)


def test_load_ref_stats_formats(tmp_path):
    from mfrecipes.errors import DataError
    from mfrecipes.evaluate.fid import fid_key, load_ref_stats, save_ref_stats

    mu, sigma = np.arange(3.0), np.eye(3) * 2
    np.savez(tmp_path / "adm.npz", mu=mu, sigma=sigma, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    np.savez(tmp_path / "ref.npz", ref_mu=mu, ref_sigma=sigma)
    for name in ("adm.npz", "ref.npz"):
        m, s = load_ref_stats(tmp_path / name, mode="legacy_tensorflow")
        np.testing.assert_array_equal(m, mu) and np.testing.assert_array_equal(s, sigma)
    save_ref_stats(tmp_path / "own.npz", mu, sigma, mode="clean")
    load_ref_stats(tmp_path / "own.npz", mode="clean")
    with pytest.raises(DataError, match="mode 'clean'"):
        load_ref_stats(tmp_path / "own.npz", mode="legacy_tensorflow")
    np.savez(tmp_path / "bad.npz", mu=mu, sigma=np.eye(2))
    with pytest.raises(DataError, match="do not fit"):
        load_ref_stats(tmp_path / "bad.npz")
    assert fid_key("legacy_tensorflow") == "fid" and fid_key("clean") == "fid_clean"


def test_image_features_legacy_tensorflow_feeds_raw_pixels():
    """legacy_tensorflow: no resize outside the network, grey repeated to RGB, [0, 255] floats."""
    from mfrecipes.evaluate.fid import image_features

    seen = []

    def extractor(x):
        seen.append(x.clone())
        return x.mean(dim=(2, 3))                                     # [N, 3]

    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, size=(5, 6, 7, 1), dtype=np.uint8)
    f = image_features(u8, extractor, mode="legacy_tensorflow", batch_size=2)
    x = torch.cat(seen)
    assert x.shape == (5, 3, 6, 7) and x.dtype == torch.float32
    expect = torch.from_numpy(u8).float().permute(0, 3, 1, 2).repeat(1, 3, 1, 1)
    assert torch.equal(x, expect)
    np.testing.assert_allclose(f, expect.double().mean(dim=(2, 3)).numpy(), rtol=1e-6)
    image_features(u8[..., 0:1].repeat(3, -1), extractor, mode="clean", batch_size=5)
    assert seen[-1].shape == (5, 3, 299, 299) and 0 <= float(seen[-1].min())
    with pytest.raises(ValueError, match="uint8"):
        image_features(u8.astype(np.float32), extractor, mode="clean")
