"""Build shard sets: image folders to SD-VAE latent shards, embedded datasets to ``x.npy`` shards.

``tools/make_shards.py`` is the command line; this module does the work, so it can be tested.

Latent shards (``build_latent_shards``): each image of an ImageNet-layout folder is centre-cropped
as ADM does (``images.center_crop_arr``), encoded by an SD-VAE in batches, and stored as
``latent.npy = [2, C, h, w]``, the posterior mean then its std (unscaled), with ``cls``, the class
index of its folder (sorted names). The file order is shuffled once with ``seed`` so every shard
mixes all classes. Samples are keyed ``%08d`` in written order; ``sources.tsv`` beside the
shards maps each key to its class and source file. The manifest (``manifest.py``) records
counts, classes (name -> index), the latent shape, ``layout: mean_std``, the VAE and the scale.
An unlabelled folder (``labels=False``, FFHQ) gives the same shards without ``cls``: every image
below the root, ``num_classes`` and ``classes`` None, an empty class column in ``sources.tsv``.

Destinations are any fsspec URL: a local folder is written in place; for ``s3://`` and the like
each shard is written to a local staging folder, uploaded when complete and deleted, so local
disk holds one shard at a time. The manifest is written last: a destination without one is
incomplete. An existing set (manifest or shards) is refused unless ``overwrite``.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Mapping, Optional

import numpy as np

from mfrecipes.data.manifest import FILENAME, Manifest, ShardEntry, write_manifest
from mfrecipes.data.remote import (FSSPEC_SCHEMES, Retry, local_path, merged_storage_options,
                                   scheme)
from mfrecipes.data.writer import ShardWriter, array_sample, shard_pattern
from mfrecipes.errors import DataError

SOURCES = "sources.tsv"
DEFAULT_SCALE = 0.18215  # SD-VAE (Rombach et al. 2022)


class Destination:
    """Where a shard set goes: a local folder, or a URL prefix reached through fsspec."""

    def __init__(self, url: str, *, storage_options: Optional[Mapping] = None,
                 overwrite: bool = False, retry: Retry = Retry()):
        self.url, self.retry = url.rstrip("/") or url, retry
        path = local_path(url)
        self.fs = None
        if path is not None:
            if os.path.exists(path) and not os.path.isdir(path):
                raise DataError(f"{url} is a file; valid: a folder (created if missing) "
                                f"or a URL such as s3://bucket/prefix", path="--out")
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as err:
                raise DataError(f"cannot create the folder {path}: {err}",
                                path="--out") from err
            if not os.access(path, os.W_OK):
                raise DataError(f"folder {path} is not writable", path="--out")
            self.local_dir, self._staging = path, None
            existing = [n for n in os.listdir(path) if n == FILENAME or n.endswith(".tar")]
        else:
            self.local_dir, self._staging = self._remote_setup(url, storage_options), True
            existing = self._remote_existing()
        if existing and not overwrite:
            self.cleanup()
            raise DataError(f"{url} already holds a shard set ({', '.join(existing[:3])}"
                            f"{' ...' if len(existing) > 3 else ''}); pass --overwrite to "
                            f"replace it, or choose another destination", path="--out")
        for name in existing:
            self._remove(name)

    def _remote_setup(self, url: str, storage_options) -> str:
        proto = scheme(url)
        if proto not in FSSPEC_SCHEMES:
            raise DataError(f"{url}: unknown scheme {proto!r}; valid: a local folder, "
                            f"file://, or {', '.join(FSSPEC_SCHEMES)}", path="--out")
        import fsspec

        try:
            self.fs = fsspec.filesystem(proto, **merged_storage_options(proto, storage_options))
        except (ImportError, ValueError) as err:
            raise DataError(f"{url}: cannot use {proto}:// ({err})", path="--out") from err
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        try:
            there = self.retry.call(lambda: self.fs.exists(bucket), f"checking {proto}://{bucket}")
        except Exception as err:
            raise DataError(f"{url}: cannot reach {proto}://{bucket}: "
                            f"{type(err).__name__}: {err}; check the endpoint and credentials "
                            f"(AWS_* environment)", path="--out") from err
        if not there:
            raise DataError(f"{url}: bucket {bucket!r} does not exist (or is not visible "
                            f"with these credentials); create it first", path="--out")
        return tempfile.mkdtemp(prefix="mfr-shards-")

    def _remote_existing(self) -> list[str]:
        try:
            names = [posixpath.basename(p) for p in self.fs.ls(self.url, detail=False)]
        except FileNotFoundError:
            return []
        return [n for n in names if n == FILENAME or n.endswith(".tar")]

    def _remove(self, name: str) -> None:
        if self.fs is None:
            os.remove(os.path.join(self.local_dir, name))
        else:
            self.fs.rm(f"{self.url}/{name}")

    def shard_url(self, name: str) -> str:
        return os.path.join(self.local_dir, name) if self.fs is None else f"{self.url}/{name}"

    def publish(self, local_file: str) -> None:
        """A finished file in ``local_dir``: upload it and delete the local copy (remote only)."""
        if self.fs is None:
            return
        target = f"{self.url}/{os.path.basename(local_file)}"
        self.retry.call(lambda: self.fs.put_file(local_file, target), f"uploading {target}")
        os.remove(local_file)

    def on_shard_closed(self, path: str, entry: ShardEntry) -> None:
        self.publish(path)

    def finish(self, manifest: Manifest) -> None:
        """Write (and publish) the manifest: from now on the set is complete."""
        path = os.path.join(self.local_dir, FILENAME)
        write_manifest(path, manifest)
        self.publish(path)
        self.cleanup()

    def cleanup(self) -> None:
        if self._staging:
            shutil.rmtree(self.local_dir, ignore_errors=True)
            self._staging = None


def _pattern(dest: Destination, count: int, prefix: str = "shard") -> str:
    return dest.shard_url(f"{prefix}-{{000000..{count - 1:06d}}}.tar")


# -- latents from an image folder ---------------------------------------------------------------
def _batches(files: list[tuple[str, int]], resolution: int, batch_size: int, workers: int,
             skipped: list) -> Iterator[tuple[np.ndarray, list[int], list[str]]]:
    """``(images [b, R, R, 3] uint8, labels, paths)``, decoded by a thread pool; unreadable
    files are left out and appended to ``skipped``."""
    from mfrecipes.data.images import load_image

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        chunks = (files[i:i + batch_size] for i in range(0, len(files), batch_size))
        pending = None
        for chunk in chunks:
            # Decode the next chunk while the caller encodes this one.
            nxt = (chunk, pool.map(lambda f: load_image(f[0], resolution), chunk))
            if pending is not None:
                yield _collect(*pending, skipped)
            pending = nxt
        if pending is not None:
            yield _collect(*pending, skipped)


def _collect(chunk, arrays, skipped):
    imgs, labels, paths = [], [], []
    for (path, label), arr in zip(chunk, arrays):
        if arr is None:
            skipped.append(path)
            continue
        imgs.append(arr)
        labels.append(label)
        paths.append(path)
    empty = np.empty((0, 0, 0, 3), np.uint8)
    return (np.stack(imgs) if imgs else empty), labels, paths


def build_latent_shards(source: str, out: str, *, vae: str, resolution: int = 256,
                        batch_size: int = 32, samples_per_shard: Optional[int] = None,
                        shard_size_mb: Optional[float] = 128.0, device: str = "cpu",
                        seed: int = 0, scale: float = DEFAULT_SCALE, dtype: str = "float32",
                        workers: int = 4, name: Optional[str] = None, prefix: str = "shard",
                        storage_options: Optional[Mapping] = None, overwrite: bool = False,
                        labels: bool = True, progress: bool = True,
                        log: Callable[[str], None] = print) -> Manifest:
    """Encode the image folder ``source`` into latent shards at ``out``; returns the manifest.

    ``labels=False``: an unlabelled folder (every image at any depth, no ``cls`` member,
    ``num_classes`` None in the manifest), for unconditional data sets such as FFHQ.
    """
    import torch

    from mfrecipes.data.images import scan_image_folder, scan_unlabelled_folder
    from mfrecipes.data.vae import encode_images, load_vae

    if resolution < 8 or resolution % 8:
        raise DataError(f"--resolution {resolution} is not valid; valid: a multiple of 8 "
                        f"(256 for the ImageNet recipes)", path="--resolution")
    if dtype not in ("float32", "float16"):
        raise DataError(f"--dtype {dtype!r} is not valid; valid: float32, float16",
                        path="--dtype")
    try:
        shard_pattern(prefix)
    except ValueError as err:
        raise DataError(str(err), path="--prefix") from err
    labelled = labels  # the name ``labels`` is reused for each batch's labels below
    if labelled:
        files, classes = scan_image_folder(source)
    else:
        files, classes = scan_unlabelled_folder(source), None
    order = np.random.default_rng(seed).permutation(len(files))
    files = [files[i] for i in order]
    if os.path.isdir(vae):  # record where the weights are, not where the command ran
        vae = os.path.abspath(vae)
    dest = Destination(out, storage_options=storage_options, overwrite=overwrite)
    try:
        model = load_vae(vae, device)
        writer = ShardWriter(dest.local_dir, samples_per_shard=samples_per_shard,
                             max_bytes=None if samples_per_shard else
                             int((shard_size_mb or 128.0) * 2**20),
                             on_close=dest.on_shard_closed, prefix=prefix)
        skipped: list[str] = []
        sources = open(os.path.join(dest.local_dir, SOURCES), "w")
        sources.write("key\tcls\tsource\n")
        written, shape, skipped_so_far = 0, None, 0
        with _progress(progress, len(files), f"encoding {os.path.basename(source)}") as advance:
            for imgs, labels, paths in _batches(files, resolution, batch_size, workers, skipped):
                done = len(labels) + len(skipped) - skipped_so_far
                skipped_so_far = len(skipped)
                if len(imgs):
                    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1  # [b,3,R,R]
                    mean, std = encode_images(model, x.to(device))
                    both = torch.stack([mean, std], 1).cpu().numpy().astype(dtype)  # [b,2,C,h,w]
                    shape = both.shape[2:]
                    for arr, label, path in zip(both, labels, paths):
                        writer.write(array_sample(written, arr, label, "latent.npy"))
                        sources.write(f"{written:08d}\t{'' if label is None else label}\t"
                                      f"{os.path.relpath(path, source)}\n")
                        written += 1
                advance(done)
                advance.skipped(skipped_so_far)
        sources.close()
        for path in skipped[:10]:
            log(f"skipped (not a readable image): {path}")
        if len(skipped) > 10:
            log(f"... and {len(skipped) - 10} more")
        if written == 0:
            raise DataError(f"no readable image in {source} ({len(skipped)} files skipped)",
                            path="SOURCE")
        entries = writer.close()
        dest.publish(os.path.join(dest.local_dir, SOURCES))
        manifest = Manifest(
            name=name or f"{os.path.basename(os.path.abspath(source))}-{resolution}-latents",
            key="latent.npy", modality="latent", sample_shape=tuple(int(n) for n in shape),
            num_classes=len(classes) if labelled else None, shards=entries,
            latent_scale=float(scale), vae=vae, layout="mean_std", classes=classes,
            params={"source": os.path.basename(os.path.abspath(source)),
                    "resolution": resolution, "crop": "adm_center", "dtype": dtype,
                    "seed": seed, "skipped_files": len(skipped)})
        dest.finish(manifest)
        log(f"wrote {manifest.total} latents {list(manifest.sample_shape)} in "
            f"{len(entries)} shards, {f'{len(classes)} classes' if labelled else 'no labels'} "
            f"({len(skipped)} files skipped); "
            f"urls: {_pattern(dest, len(entries), prefix)}")
        return manifest
    finally:
        dest.cleanup()


# -- embedded datasets --------------------------------------------------------------------------
def embedded_source(source: str) -> Optional[tuple[str, Optional[str]]]:
    """``("digits", None)``, ``("toy2d", kind)`` for an embedded dataset name, else None."""
    from mfrecipes.data.toy2d import TOYS

    if source == "digits":
        return "digits", None
    kind = source.split("/", 1)[1] if source.startswith("toy2d/") else source
    if kind in TOYS:
        return "toy2d", kind
    if source.startswith("toy2d"):
        raise DataError(f"unknown 2-D toy {kind!r}; valid: "
                        f"{', '.join('toy2d/' + k for k in sorted(TOYS))}", path="SOURCE")
    return None


def build_embedded_shards(source: str, out: str, *, resolution: Optional[int] = None,
                          num_points: int = 50_000, data_seed: int = 0,
                          num_shards: Optional[int] = None,
                          storage_options: Optional[Mapping] = None, overwrite: bool = False,
                          log: Callable[[str], None] = print) -> Manifest:
    """Write an embedded dataset (``digits``, ``toy2d/<kind>``) as plain ``x.npy`` shards: the
    same bytes the dataset caches for itself."""
    from mfrecipes.data.embedded import build_digits, build_toy2d

    which = embedded_source(source)
    if which is None:
        raise DataError(f"{source!r} is neither a folder nor an embedded dataset; valid: an "
                        f"image folder, digits, toy2d/<kind>", path="SOURCE")
    dest = Destination(out, storage_options=storage_options, overwrite=overwrite)
    try:
        kind, toy = which
        if kind == "digits":
            manifest = build_digits(dest.local_dir, resolution or 8, num_shards or 4)
        else:
            manifest = build_toy2d(dest.local_dir, toy, num_points, data_seed, num_shards or 8)
        for entry in manifest.shards:
            dest.publish(os.path.join(dest.local_dir, entry.name))
        os.remove(os.path.join(dest.local_dir, FILENAME))  # written again, last, by finish
        dest.finish(manifest)
        log(f"wrote {manifest.total} samples {list(manifest.sample_shape)} in "
            f"{len(manifest.shards)} shards; urls: {_pattern(dest, len(manifest.shards))}")
        return manifest
    finally:
        dest.cleanup()


class _progress:
    """A rich progress bar (or nothing): ``with _progress(on, total, what) as advance``."""

    def __init__(self, enabled: bool, total: int, what: str):
        self.enabled, self.total, self.what = enabled, total, what
        self._bar = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn)

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[skipped]} skipped"),
                                 TimeRemainingColumn())
            self._bar.start()
            self._task = self._bar.add_task(self.what, total=self.total, skipped=0)
        return self

    def __call__(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def skipped(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, skipped=n)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


# -- CIFAR-10 (the official python archive) -----------------------------------------------------
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
_CIFAR10_SPLITS = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                   "test": ("test_batch",)}
# The only globals a CIFAR-10 batch refers to: numpy's array reconstruction (numpy 1 and 2
# names), and _codecs.encode, through which a protocol-2 pickle written by Python 3 stores bytes
# (it only turns a string into bytes).
_CIFAR10_GLOBALS = {("numpy.core.multiarray", "_reconstruct"),
                    ("numpy._core.multiarray", "_reconstruct"),
                    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


def _load_cifar_batch(data: bytes, member: str) -> dict:
    """Unpickle one CIFAR-10 batch with a restricted unpickler.

    The official archive ships its batches only as pickles, and a pickle can call any importable
    function while it loads. This one load is acceptable because the unpickler resolves no global
    except numpy's array reconstruction (``_reconstruct``, ``ndarray``, ``dtype``) and
    ``_codecs.encode`` (string to bytes), functions without side effects; the batches' dicts, lists, bytes, strings and ints are built by pickle opcodes that call nothing. Anything
    else in the file is refused before it is called."""
    import io
    import pickle

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in _CIFAR10_GLOBALS:
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"refused global {module}.{name}")

    try:
        batch = Restricted(io.BytesIO(data), encoding="bytes").load()
    except Exception as err:  # noqa: BLE001  (any failure of an untrusted file is a data error)
        raise DataError(f"{member} is not a CIFAR-10 batch: {err}", path="SOURCE") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{member} is not a CIFAR-10 batch (no data and labels)", path="SOURCE")
    return batch


def read_cifar10_archive(path: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 3, 32, 32]`` uint8 and labels ``[N]`` int64 of a ``cifar-10-python.tar.gz``
    split (train: data_batch_1..5 in order, 50,000 images; test: test_batch, 10,000)."""
    import tarfile

    if split not in _CIFAR10_SPLITS:
        raise DataError(f"unknown CIFAR-10 split {split!r}; valid: train, test", path="--split")
    try:
        tar = tarfile.open(path, "r:*")
    except (OSError, tarfile.TarError) as err:
        raise DataError(f"cannot open {path} as a tar archive: {err}", path="SOURCE") from err
    with tar:
        members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
        xs, ys = [], []
        for name in _CIFAR10_SPLITS[split]:
            if name not in members:
                raise DataError(f"{path} has no {name}; valid: the official "
                                f"cifar-10-python.tar.gz (cifar-10-batches-py/...)", path="SOURCE")
            batch = _load_cifar_batch(tar.extractfile(members[name]).read(), name)
            x, y = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
            if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
                raise DataError(f"{name}: expected uint8 data [N, 3072] and N labels, got "
                                f"{x.dtype} {list(x.shape)} and {len(y)} labels", path="SOURCE")
            if len(y) and (y.min() < 0 or y.max() > 9):
                raise DataError(f"{name}: labels outside 0..9", path="SOURCE")
            xs.append(x.reshape(-1, 3, 32, 32))  # rows are R (1024), G, B planes, row-major
            ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def build_cifar10_shards(source: str, out: str, *, split: str = "train", num_shards: int = 10,
                         storage_options: Optional[Mapping] = None, overwrite: bool = False,
                         log: Callable[[str], None] = print) -> Manifest:
    """CIFAR-10 from the official python archive as ``x.npy`` shards: ``[3, 32, 32]`` float32 in
    [-1, 1] (``x / 127.5 - 1``) with ``cls``, in the archive's order, and a manifest."""
    import math

    import attrs

    from mfrecipes.data.writer import write_shards

    x, y = read_cifar10_archive(source, split)
    dest = Destination(out, storage_options=storage_options, overwrite=overwrite)
    try:
        images = (img.astype(np.float32) / 127.5 - 1.0 for img in x)
        manifest = write_shards(
            dest.local_dir, zip(images, y.tolist()), name=f"cifar10-{split}",
            samples_per_shard=math.ceil(len(y) / num_shards), modality="image",
            sample_shape=(3, 32, 32), num_classes=10,
            params={"source": os.path.basename(source), "split": split})
        for entry in manifest.shards:
            dest.publish(os.path.join(dest.local_dir, entry.name))
        os.remove(os.path.join(dest.local_dir, FILENAME))  # written again, last, by finish
        manifest = attrs.evolve(manifest, classes={c: i for i, c in enumerate(CIFAR10_CLASSES)})
        dest.finish(manifest)
        log(f"wrote {manifest.total} CIFAR-10 {split} images in {len(manifest.shards)} shards; "
            f"urls: {_pattern(dest, len(manifest.shards))}")
        return manifest
    finally:
        dest.cleanup()
