"""``manifest.json``: what a folder of shards holds, written beside the shards.

It records the sample count (and byte size) of every shard, so a reader can split an epoch and
seek to a resumed position without opening the shards, and the sample layout (key, shape,
classes), so a recipe need not repeat it. Example::

    {"format": "mfrecipes-shards", "version": 1, "created_by": "mfrecipes 0.1.0",
     "name": "digits-r8", "key": "x.npy", "modality": "image", "sample_shape": [1, 8, 8],
     "num_classes": 10, "shards": [{"name": "shard-000000.tar", "count": 450, "bytes": 483840}]}

Latent shards (``tools/make_shards.py``) add ``"layout": "mean_std"`` (each ``latent.npy`` is
``[2, *sample_shape]``: the VAE posterior mean, then its std, unscaled), ``latent_scale``
(0.18215 for SD-VAE), ``vae`` (the encoder's hub id or path) and ``classes`` (class folder name ->
index). ``layout`` is ``"sample"`` otherwise: the array is the sample itself.
"""
from __future__ import annotations

import json
import logging
import posixpath
from typing import Any, Mapping, Optional

import attrs

from mfrecipes.errors import DataError

log = logging.getLogger(__name__)

FORMAT = "mfrecipes-shards"
VERSION = 1
FILENAME = "manifest.json"
LAYOUTS = ("sample", "mean_std")


def created_by() -> str:
    from mfrecipes import __version__

    return f"mfrecipes {__version__}"


@attrs.frozen
class ShardEntry:
    name: str                  # file name relative to the manifest's folder
    count: int                 # samples in the shard
    bytes: Optional[int] = None


@attrs.frozen
class Manifest:
    name: str
    key: str
    modality: str
    sample_shape: tuple = attrs.field(converter=tuple)
    num_classes: Optional[int]
    shards: tuple = attrs.field(converter=tuple, repr=lambda s: f"<{len(s)} shards>")
    created_by: str = attrs.field(factory=created_by)
    latent_scale: Optional[float] = None
    vae: Optional[str] = None
    params: dict = attrs.field(factory=dict)
    layout: str = attrs.field(default="sample", validator=attrs.validators.in_(LAYOUTS))
    classes: Optional[dict] = attrs.field(default=None, repr=lambda c: "None" if c is None else
                                          f"<{len(c)} classes>")

    @property
    def total(self) -> int:
        return sum(s.count for s in self.shards)

    def counts(self) -> dict[str, int]:
        return {s.name: s.count for s in self.shards}

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "created_by": self.created_by,
                "name": self.name, "key": self.key, "modality": self.modality,
                "sample_shape": list(self.sample_shape), "num_classes": self.num_classes,
                "layout": self.layout, "latent_scale": self.latent_scale, "vae": self.vae,
                "classes": self.classes, "params": self.params, "total": self.total,
                "shards": [attrs.asdict(s) for s in self.shards]}

    @classmethod
    def from_json(cls, d: Any, *, where: str) -> "Manifest":
        """Parse and check; a malformed manifest is a ``DataError`` naming ``where``."""
        try:
            if not isinstance(d, Mapping) or d.get("format") != FORMAT:
                raise ValueError(f"'format' must be {FORMAT!r}")
            if d.get("version") != VERSION:
                raise ValueError(f"'version' {d.get('version')!r} is not {VERSION}")
            shards = tuple(ShardEntry(str(s["name"]), int(s["count"]),
                                      None if s.get("bytes") is None else int(s["bytes"]))
                           for s in d["shards"])
            if any(s.count < 0 for s in shards):
                raise ValueError("negative shard count")
            nc = d.get("num_classes")
            layout = str(d.get("layout") or "sample")
            if layout not in LAYOUTS:
                raise ValueError(f"'layout' {layout!r} is not one of {LAYOUTS}")
            classes = d.get("classes")
            return cls(name=str(d["name"]), key=str(d["key"]), modality=str(d["modality"]),
                       sample_shape=tuple(int(n) for n in d["sample_shape"]),
                       num_classes=None if nc is None else int(nc), shards=shards,
                       created_by=str(d.get("created_by", "?")),
                       latent_scale=d.get("latent_scale"), vae=d.get("vae"),
                       params=dict(d.get("params") or {}), layout=layout,
                       classes=None if classes is None else
                       {str(k): int(v) for k, v in dict(classes).items()})
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"unreadable shard manifest: {err}; expected a JSON object with "
                            f"format={FORMAT!r}, version={VERSION}, key, modality, sample_shape, "
                            f"num_classes and shards [{{name, count}}]", path=where) from err


def manifest_url(shard_dir: str) -> str:
    return posixpath.join(shard_dir, FILENAME) if shard_dir else FILENAME


def read_manifest(shard_dir: str, *, storage_options: Mapping | None = None, retry=None
                  ) -> Optional[Manifest]:
    """The manifest in ``shard_dir`` (a local folder or a URL prefix), or None if there is none.

    ``retry``: a ``remote.Retry`` for transient errors (default: its defaults).
    """
    from mfrecipes.data.remote import Retry, open_url

    url = manifest_url(shard_dir)
    try:
        with open_url(url, storage_options=storage_options, retry=retry or Retry()) as f:
            raw = f.read()
    except DataError:
        raise
    except (FileNotFoundError, IsADirectoryError):
        return None
    except PermissionError as err:
        # S3 answers 403, not 404, for a missing key when listing is not allowed.
        log.warning("no access to %s (%s); reading the shards without a manifest", url, err)
        return None
    except Exception as err:  # OSError, denied access, botocore's credential errors...
        raise DataError(f"cannot read shard manifest: {type(err).__name__}: {err}; check the "
                        f"URL and the credentials (AWS_* environment or storage options)",
                        path=url) from err
    try:
        d = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"shard manifest is not valid JSON ({err}); delete it or rewrite it "
                        f"with the shards", path=url) from err
    return Manifest.from_json(d, where=url)


def write_manifest(path: str, manifest: Manifest) -> None:
    """Write ``manifest`` as JSON to the local file ``path``."""
    with open(path, "w") as f:
        json.dump(manifest.to_json(), f, indent=1)
        f.write("\n")
