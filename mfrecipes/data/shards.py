"""WebDataset shards at any URL, read as a deterministic, resumable stream: dataset ``shards``.

URLs: local paths, brace patterns (``dir/shard-{000000..000127}.tar``), ``file://``, lists of
those, and any fsspec URL (``s3://bucket/prefix/shard-{000000..000127}.tar``; see ``remote.py``).
A sample is ``__key__``, an array ``x.npy`` (``[2]`` point or ``[C, H, W]`` image; ``latent.npy``
for latents: set ``key``) and ``cls`` (int, optional). A ``manifest.json`` beside the shards
(``manifest.py``) gives per-shard counts and the sample layout; without one, the layout is read
from the first sample and counts by scanning, only when needed.

Latents (``key: latent.npy``) are returned as ``latent_scale * z``. With ``layout: mean_std``
(what ``tools/make_shards.py`` writes) the stored array is ``[2, C, H, W]``, the VAE posterior
mean and std, and ``z = mean + std * n`` with ``n ~ N(0, I)`` drawn afresh for each read from a
generator seeded by (seed, epoch, rank, worker, part position): a resumed run draws the same
``n`` for the same sample as the uninterrupted run would have.

Remote shards go through ``remote.py``: transient errors (a dropped connection, a 5xx answer,
the server restarting) are retried with backoff for up to ``retry_timeout_s`` seconds, and a
read that fails mid-shard resumes at the same byte offset; past the budget it is a
``DataError``.

The stream of a rank is a pure function of (seed, rank, world_size, num_workers): epoch ``e``
reads this rank's parts in the order ``plan.py`` gives, each part through a shuffle buffer
seeded by (seed, e, rank, worker, position); epochs follow each other seamlessly. Hence
``batches(B, start=k)`` continues exactly where an uninterrupted stream was after ``k`` samples:
whole parts are skipped by their counts without reading them, then the rest of one part is
read and dropped. (Exact as long as no sample is corrupt: a corrupt sample inside a skipped part
is skipped by count, not by content.)

A corrupt sample (bad ``.npy``, wrong shape, missing key or label) or shard (truncated, not a tar)
is skipped, counted in ``counters()["data/skipped"]`` and logged; so is a sample holding NaN or
infinite values (it would poison the weights). A rotten data set is a ``DataError`` naming a
shard and the reason, never a hang: ``max_consecutive_corrupt`` undecodable samples in a row, or
three epochs in a row with no readable (or no decodable) sample. A missing shard is a
``DataError`` naming it.
"""
from __future__ import annotations

import logging
import posixpath
from typing import Iterator, Optional

import attrs
import numpy as np
import torch

from mfrecipes.data.base import DataInfo
from mfrecipes.data.manifest import LAYOUTS, Manifest, read_manifest
from mfrecipes.data.npy import NpyDecoder
from mfrecipes.data.plan import EpochPlan, Part, seeded_rng
from mfrecipes.data.remote import (FSSPEC_SCHEMES, Retry, known_schemes, local_path,
                                   missing_message, open_url, redact, register_fsspec_handlers,
                                   scheme)
from mfrecipes.data.tar import TarError, iter_samples
from mfrecipes.errors import DataError
from mfrecipes.registry import DATASETS

log = logging.getLogger(__name__)

_NPY = NpyDecoder()
LATENT_NOISE = 0x5A4D04  # domain tag of the latent sampling noise (see plan.py for the others)
register_fsspec_handlers()  # so that plain wds.WebDataset("s3://...") works too


def expand_urls(urls: str | list[str] | tuple[str, ...]) -> list[str]:
    """Brace-expand a URL pattern or each URL of a list; an empty result is a ``DataError``."""
    import braceexpand

    if isinstance(urls, str):
        urls = [urls]
    if not isinstance(urls, (list, tuple)) or not all(isinstance(u, str) for u in urls):
        raise DataError(f"shard urls must be a string or a list of strings, got {urls!r}",
                        path="data.params.urls")
    out = [u for pattern in urls if pattern.strip() for u in braceexpand.braceexpand(pattern)]
    if not out:
        raise DataError("no shard URLs given; valid: a path, a brace pattern "
                        "'dir/shard-{000000..000003}.tar', a file:// or s3:// URL, or a list",
                        path="data.params.urls")
    return out


def _none_or_dict(v) -> dict:
    return dict(v or {})


def _opt_shape(v):
    return None if v is None else tuple(int(n) for n in v)


def _check_layout(_, __, value):
    if value is not None and value not in LAYOUTS:
        raise DataError(f"layout {value!r} is not valid; valid: {', '.join(LAYOUTS)} (or "
                        f"leave it unset to take it from the manifest)",
                        path="data.params.layout")


class _IndexStream:
    """Uniform integers in [0, high) drawn in chunks (one numpy call per 4096 draws)."""

    def __init__(self, rng: np.random.Generator, high: int):
        self._rng, self._high, self._buf, self._i = rng, high, np.empty(0, np.int64), 0

    def next(self) -> int:
        if self._i == len(self._buf):
            self._buf, self._i = self._rng.integers(0, self._high, size=4096), 0
        self._i += 1
        return int(self._buf[self._i - 1])


@DATASETS.register("shards")
@attrs.frozen(eq=False)
class Shards:
    """WebDataset shards (local, brace pattern, file://, s3:// or any fsspec URL), resumable.

    ``num_classes``: None takes it from ``manifest.json`` (unconditional without one);
    ``conditional=False`` ignores labels. ``sample_shape``: None reads it from the manifest or the
    first sample. ``shuffle_buffer``: in-shard shuffle buffer (1 = file order). ``resampled``:
    ranks draw shards with replacement (multi-node). ``num_workers``: DataLoader processes.
    ``key``, ``layout``, ``latent_scale``, ``vae``: None takes them from the manifest (``key``
    defaults to ``x.npy`` without one). ``storage_options``: fsspec options (endpoint,
    credentials; prefer the AWS_* environment for secrets). ``retry_timeout_s``: how long
    transient remote errors are retried before they are a ``DataError``.
    ``max_consecutive_corrupt``: undecodable samples in a row that end the run with a
    ``DataError`` (a data set that cannot be decoded at all must not spin forever).
    """

    urls: object = attrs.field(repr=lambda u: repr(u) if isinstance(u, str) else
                               f"<{len(u)} urls>")
    storage_options: Optional[dict] = attrs.field(default=None, converter=_none_or_dict,
                                                  repr=lambda o: repr(redact(o)))
    shuffle_buffer: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    resampled: bool = False
    num_classes: Optional[int] = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(1)))
    conditional: bool = True
    sample_shape: Optional[tuple] = attrs.field(default=None, converter=_opt_shape)
    key: Optional[str] = None
    layout: Optional[str] = attrs.field(default=None, validator=_check_layout)
    latent_scale: Optional[float] = None
    vae: Optional[str] = None
    num_workers: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    retry_timeout_s: float = attrs.field(default=120.0, validator=attrs.validators.ge(0))
    # This many undecodable samples in a row (e.g. a wrong sample_shape or key) is a DataError.
    max_consecutive_corrupt: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    seed: int = 0
    rank: int = 0
    world_size: int = attrs.field(default=1, validator=attrs.validators.ge(1))

    _urls: list = attrs.field(init=False, repr=False)
    _counts: list = attrs.field(init=False, repr=False)    # per shard: manifest count or None
    _scanned: dict = attrs.field(init=False, repr=False)   # shard index -> counted samples
    _info: DataInfo = attrs.field(init=False, repr=False)
    _stats: dict = attrs.field(init=False, repr=False)
    _layout: str = attrs.field(init=False, repr=False)
    _key: str = attrs.field(init=False, repr=False)
    _retry: Retry = attrs.field(init=False, repr=False)

    @classmethod
    def static_info(cls, sample_shape=None, num_classes=None, conditional: bool = True,
                    key: Optional[str] = None, layout: Optional[str] = None,
                    latent_scale=None, vae=None, **_) -> Optional[DataInfo]:
        """What the data will be when the recipe says it all (``sample_shape`` and, if
        conditional, ``num_classes``); None when only the shards can tell (used by ``mfr check``).
        """
        if sample_shape is None or (conditional and num_classes is None):
            return None
        shape = _opt_shape(sample_shape)
        modality = "latent" if (key or "").startswith("latent") or layout == "mean_std" else \
            ("points" if len(shape) == 1 else "image")
        return DataInfo(name="shards", modality=modality, sample_shape=shape,
                        num_classes=num_classes if conditional else None,
                        latent_scale=latent_scale, vae=vae)

    def __attrs_post_init__(self):
        if self.key is not None and not self.key.endswith(".npy"):
            raise ValueError(f"key must name a .npy member (e.g. 'x.npy', 'latent.npy'), "
                             f"got {self.key!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, world_size={self.world_size})")
        urls = expand_urls(self.urls)
        _check_urls(urls, self.urls)
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen class)
        set_("_urls", urls)
        set_("_scanned", {})
        set_("_stats", {"skipped": 0})
        set_("_retry", Retry(timeout_s=self.retry_timeout_s))
        manifests = self._manifests()
        set_("_counts", [manifests[posixpath.dirname(u)].counts().get(posixpath.basename(u))
                         if manifests.get(posixpath.dirname(u)) else None for u in urls])
        set_("_info", self._make_info(next((m for m in manifests.values() if m), None)))

    # -- setup --------------------------------------------------------------------------------
    def _manifests(self) -> dict[str, Optional[Manifest]]:
        dirs = dict.fromkeys(posixpath.dirname(u) for u in self._urls)
        return {d: read_manifest(d, storage_options=self.storage_options, retry=self._retry)
                for d in dirs}

    def _make_info(self, manifest: Optional[Manifest]) -> DataInfo:
        if self.key is None or manifest is None or manifest.key == self.key:
            key = self.key or (manifest.key if manifest is not None else "x.npy")
            m = manifest
        else:  # the recipe reads another member than the manifest describes
            key, m = self.key, None
        object.__setattr__(self, "_key", key)
        layout = self.layout or (m.layout if m else "sample")
        object.__setattr__(self, "_layout", layout)
        shape = self.sample_shape or (m.sample_shape if m else None)
        if shape is None:
            shape = self._first_shape()
            if layout == "mean_std":
                if len(shape) < 2 or shape[0] != 2:
                    raise DataError(f"layout 'mean_std' needs {self._key} of shape [2, C, H, W] "
                                    f"(mean, std); the first sample has {list(shape)}",
                                    path="data.params.layout")
                shape = shape[1:]
        num_classes = None
        if self.conditional:
            num_classes = self.num_classes if self.num_classes is not None else \
                (m.num_classes if m else None)
        if self._key.startswith("latent") or (m is not None and m.modality == "latent"):
            modality = "latent"
        elif m is not None and m.modality in ("points", "image"):
            modality = m.modality
        else:
            modality = "points" if len(shape) == 1 else "image"
        scale = self.latent_scale if self.latent_scale is not None else \
            (m.latent_scale if m else None)
        if modality == "latent" and scale is None:
            raise DataError("latent shards need a latent scale (SD-VAE: 0.18215); the manifest "
                            "has none: set data.params.latent_scale", path="data.params")
        return DataInfo(name=m.name if m else "shards", modality=modality, sample_shape=shape,
                        num_classes=num_classes, latent_scale=scale,
                        vae=self.vae or (m.vae if m else None))

    def _first_shape(self) -> tuple:
        url = self._urls[0]
        try:
            with self._open(url) as f:
                for rec in iter_samples(f):
                    if self._key in rec:
                        return tuple(NpyDecoder()(rec[self._key]).shape)
        except (TarError, ValueError, OSError) as err:
            raise DataError(f"cannot read the first sample to learn the sample shape: {err}; "
                            f"set data.params.sample_shape or add a manifest.json",
                            path=url) from err
        raise DataError(f"no member '*.{self._key}' in the first shard; set data.params.key to "
                        f"the array's suffix (e.g. 'x.npy', 'latent.npy')", path=url)

    def _open(self, url: str):
        try:
            return open_url(url, storage_options=self.storage_options, retry=self._retry)
        except FileNotFoundError as err:
            why = missing_message(url, self.storage_options)
            raise DataError(f"shard {why}; valid: existing objects matching data.params.urls; "
                            f"storage options: {redact(self.storage_options)}", path=url) from err
        except PermissionError as err:
            raise DataError(f"access denied ({err}); check the credentials (AWS_* environment "
                            f"or storage options: {redact(self.storage_options)})",
                            path=url) from err
        except ValueError as err:  # WebDataset's gopen: no handler for this scheme
            raise DataError(f"cannot open this URL ({err}); valid schemes: "
                            f"{', '.join(known_schemes())} or a local path", path=url) from err
        except (OSError, DataError):
            raise
        except Exception as err:  # e.g. botocore's missing or partial credentials
            raise DataError(f"cannot open this URL: {type(err).__name__}: {err}; storage "
                            f"options: {redact(self.storage_options)}", path=url) from err

    # -- the Dataset protocol -----------------------------------------------------------------
    @property
    def info(self) -> DataInfo:
        return self._info

    @property
    def num_shards(self) -> int:
        return len(self._urls)

    def counters(self) -> dict:
        return {"data/skipped": self._stats["skipped"]}

    def plan(self, *, seed: Optional[int] = None, rank: Optional[int] = None,
             world_size: Optional[int] = None, num_workers: Optional[int] = None) -> EpochPlan:
        return EpochPlan(num_shards=len(self._urls),
                         seed=self.seed if seed is None else seed,
                         rank=self.rank if rank is None else rank,
                         world_size=self.world_size if world_size is None else world_size,
                         num_workers=max(1, self.num_workers if num_workers is None
                                         else num_workers),
                         resampled=self.resampled)

    def epoch_length(self, epoch: int = 0) -> int:
        """Samples this rank reads in ``epoch`` (all its workers; counted, corrupt included)."""
        return sum(self._part_count(p) for p in self.plan().rank_parts(epoch))

    def batches(self, batch_size: int, *, start: int = 0
                ) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """``(x [B, *sample_shape] float32, y [B] int64 or None)`` forever, from sample
        ``start``."""
        if batch_size < 1 or start < 0:
            raise ValueError(f"need batch_size >= 1 and start >= 0, got {batch_size}, {start}")
        if self.num_workers == 0:
            records = self._records(self.plan(), 0, start, self._stats)
            yield from self._batched(records, batch_size, self._stats)
            return
        from mfrecipes.data.workers import worker_batches

        yield from worker_batches(self, batch_size, start)

    def reference(self, n: int, seed: int) -> torch.Tensor:
        """The first ``min(n, len)`` samples of one epoch read in a ``seed``-ed order."""
        stats = {"skipped": 0}
        plan = self.plan(seed=seed, rank=0, world_size=1, num_workers=1)
        xs = []
        for rec in self._records(plan, 0, 0, stats, epochs=1):
            if len(xs) >= n:
                break
            try:
                xs.append(self.decode(rec)[0])
            except ValueError:
                stats["skipped"] += 1
        if not xs:
            return torch.empty((0, *self.info.sample_shape))
        return torch.from_numpy(np.stack(xs))

    # -- reading ------------------------------------------------------------------------------
    def _records(self, plan: EpochPlan, worker: int, start: int, stats: dict,
                 epochs: Optional[int] = None) -> Iterator[dict]:
        """Raw samples (dicts of bytes) of one logical worker, from raw position ``start``."""
        skip, epoch, bad_epochs = start, 0, 0
        while epochs is None or epoch < epochs:
            seen, yielded, skipped_before = 0, 0, stats["skipped"]
            decoded_before = stats.get("decoded", 0)
            for pos, part in enumerate(plan.worker_parts(epoch, worker)):
                if skip:
                    n = self._part_count(part)
                    if n <= skip:
                        skip, seen = skip - n, seen + n
                        continue
                noise = None
                if self._layout == "mean_std":
                    # torch draws normals ~3x faster than numpy; seeded per part like the shuffle
                    key = seeded_rng(plan.seed, LATENT_NOISE, epoch, plan.rank, worker, pos)
                    noise = torch.Generator().manual_seed(int(key.integers(2**63)))
                for rec in self._part_records(part, plan.sample_rng(epoch, worker, pos), stats,
                                              noise):
                    seen += 1
                    if skip:
                        skip -= 1
                        continue
                    yielded += 1
                    yield rec
            # A reader may legitimately draw only empty slices in an epoch; it is an error when
            # there is nothing to read at all, or when epoch after epoch only fails. The consumer
            # (_batched) counts stats["decoded"]; it has decoded every record yielded so far
            # when the generator resumes here.
            none_read = seen == 0 and stats["skipped"] > skipped_before
            none_decoded = yielded > 0 and stats.get("decoded", 0) == decoded_before \
                and "decoded" in stats
            bad_epochs = bad_epochs + 1 if none_read or none_decoded else 0
            if epochs is None and (bad_epochs >= 3 or (seen == 0 and self._total() == 0)):
                why = stats.get("last_error") or "no sample"
                raise DataError(f"no {'decodable' if none_decoded else 'readable'} sample in "
                                f"{bad_epochs or 1} epoch(s) of this reader (rank {plan.rank}, "
                                f"worker {worker}); {stats['skipped']} skipped as corrupt; last: "
                                f"{why}; shards: {self._urls[0]} ... ({len(self._urls)} in all)",
                                path="data.params.urls")
            epoch += 1

    def _total(self) -> int:
        return sum(self._part_count(Part(i)) for i in range(len(self._urls)))

    def _part_count(self, part: Part) -> int:
        n = self._counts[part.shard]
        if n is None:
            n = self._scanned.get(part.shard)
        if n is None:  # no manifest: count by reading the shard once (headers only)
            n = 0
            url = self._urls[part.shard]
            try:
                with self._open(url) as f:
                    for _ in iter_samples(f):
                        n += 1
            except (TarError, OSError) as err:
                log.warning("counting %s stopped at sample %d: %s", url, n, err)
            self._scanned[part.shard] = n
        return part.count(n)

    def _part_records(self, part: Part, rng: np.random.Generator, stats: dict,
                      noise: Optional[torch.Generator] = None) -> Iterator[dict]:
        """The part's raw samples through a shuffle buffer; a broken shard ends early, counted.

        With ``noise``, each sample gets ``rec["__noise__"]`` (``[*sample_shape]`` float32), drawn
        in file order, so the draw belongs to the sample, not to its place in the shuffle.
        """
        shape = self._info.sample_shape
        url = self._urls[part.shard]
        expected = None if self._counts[part.shard] is None else \
            part.count(self._counts[part.shard])
        size = self.shuffle_buffer
        buf: list[dict] = []
        draw = _IndexStream(rng, size)
        got = 0
        try:
            with self._open(url) as f:
                for i, rec in enumerate(iter_samples(f)):
                    if i % part.num_slices != part.slice:
                        continue
                    got += 1
                    rec["__url__"] = url
                    if noise is not None:
                        rec["__noise__"] = torch.randn(shape, generator=noise).numpy()
                    if len(buf) < size:
                        buf.append(rec)
                        continue
                    j = draw.next()
                    out, buf[j] = buf[j], rec
                    yield out
        except (TarError, OSError) as err:
            lost = max(1, expected - got) if expected is not None else 1
            stats["last_error"] = f"shard {url}: {type(err).__name__}: {err}"
            _skip(stats, lost, f"shard {url} is unreadable after {got} samples "
                               f"({type(err).__name__}: {err}); skipping {lost}")
        else:
            if expected is not None and got < expected:
                _skip(stats, expected - got, f"shard {url} holds {got} samples, its manifest "
                                             f"says {expected} (truncated?)")
        rng.shuffle(buf)
        yield from buf

    # -- decoding -----------------------------------------------------------------------------
    def decode(self, rec: dict) -> tuple[np.ndarray, Optional[int]]:
        """``(x float32 [*sample_shape], y int or None)``; ``ValueError`` if the sample is bad."""
        if "__bad__" in rec:
            raise ValueError(rec["__bad__"])
        data = rec.get(self._key)
        if data is None:
            raise ValueError(f"no {self._key!r} member (has: {sorted(rec)})")
        x = _NPY(data)
        shape = self._info.sample_shape
        stored = (2, *shape) if self._layout == "mean_std" else shape
        if x.shape != stored:
            raise ValueError(f"{self._key} has shape {x.shape}, expected {stored}")
        if x.dtype.kind not in "fiu":
            raise ValueError(f"{self._key} has dtype {x.dtype}, expected a number type")
        if self._layout == "mean_std":
            n = rec.get("__noise__")
            if n is None:  # read outside the stream (no draw attached): the posterior mean
                n = np.zeros(shape, np.float32)
            mean, std = x[0], x[1]
            if x.dtype != np.float32:
                mean, std = mean.astype(np.float32), std.astype(np.float32)
            # z = mean + std * n: a sample of the VAE posterior (mfrecipes/METHOD.md, section 9)
            x = std * n
            x += mean
            if self._info.modality == "latent":
                x *= np.float32(self._info.latent_scale)
        elif self._info.modality == "latent":
            x = x.astype(np.float32) * np.float32(self._info.latent_scale)
        elif x.dtype != np.float32:
            with np.errstate(over="ignore"):  # beyond float32: inf, refused just below
                x = x.astype(np.float32)
        # One NaN or inf sample would make every weight NaN after its step (float64 values
        # beyond float32's range become inf in the cast above).
        if not np.isfinite(x).all():
            raise ValueError(f"{self._key} holds NaN or infinite values")
        nc = self._info.num_classes
        if nc is None:
            return x, None
        raw = rec.get("cls")
        if raw is None:
            raise ValueError("no 'cls' label, but the dataset is class-conditional")
        y = int(raw.decode("ascii").strip())
        if not 0 <= y < nc:
            raise ValueError(f"label {y} is outside [0, {nc})")
        return x, y

    def _batched(self, records: Iterator[dict], batch_size: int, stats: dict
                 ) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        xs: list[np.ndarray] = []
        ys: list = []
        stats.setdefault("decoded", 0)
        in_a_row = 0
        for rec in records:
            try:
                x, y = self.decode(rec)
            except (ValueError, UnicodeDecodeError) as err:
                where = f"sample {rec.get('__key__')!r} of {rec.get('__url__', 'a shard')}"
                stats["last_error"] = f"{where}: {err}"
                _skip(stats, 1, f"{where} is corrupt ({err}); skipped")
                in_a_row += 1
                if in_a_row >= self.max_consecutive_corrupt:
                    raise DataError(
                        f"{in_a_row} samples in a row could not be decoded; the last, {where}: "
                        f"{err}. Check data.params (sample_shape, key, num_classes) against the "
                        f"shards; valid samples hold a {self._key} array of shape "
                        f"{list(self._info.sample_shape)}", path="data.params") from err
                continue
            in_a_row = 0
            stats["decoded"] += 1
            xs.append(x)
            ys.append(y)
            if len(xs) == batch_size:
                yb = None if self._info.num_classes is None else \
                    torch.tensor(ys, dtype=torch.int64)
                yield torch.from_numpy(np.stack(xs)), yb
                xs, ys = [], []


def _skip(stats: dict, n: int, message: str) -> None:
    before = stats["skipped"]
    stats["skipped"] += n
    # Log the first few, then only at each power of ten: a rotten set must not flood the log.
    if before < 10 or len(str(before)) != len(str(stats["skipped"])):
        log.warning("%s (data/skipped = %d)", message, stats["skipped"])


def _check_urls(urls: list[str], given) -> None:
    """Local shards are checked up front (cheap); remote ones when opened."""
    import os

    missing = [u for u in urls if (p := local_path(u)) is not None and not os.path.isfile(p)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(f"shard file not found: {missing[0]}{more} (of {len(urls)} from "
                        f"{given!r}); valid: existing .tar files, a brace pattern such as "
                        f"'dir/shard-{{000000..000003}}.tar', or a URL with scheme "
                        f"{', '.join(FSSPEC_SCHEMES)}", path="data.params.urls")
    for u in urls:
        s = scheme(u)
        if local_path(u) is None and s not in known_schemes():
            raise DataError(f"unknown URL scheme {s!r} in {u!r}; valid: "
                            f"{', '.join(known_schemes())} or a local path",
                            path="data.params.urls")
