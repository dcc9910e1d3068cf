"""Data: WebDataset shards at any URL (local, s3://, fsspec) and the embedded datasets.

Importing the package registers the datasets ``shards``, ``toy2d``, ``digits`` and ``mixture``
and the transform ``edm_augment``.
"""
from mfrecipes.data import augment, embedded, mixture, shards  # noqa: F401  (registration)
from mfrecipes.data.base import DataInfo, Dataset  # noqa: F401
from mfrecipes.data.cache import default_cache_dir  # noqa: F401
