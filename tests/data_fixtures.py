"""Helpers for the data tests: small shard sets whose samples say who they are.

Sample ``i`` holds ``x = [i, -i]`` (float32) and ``cls = i % 10``, so a stream of batches can be
turned back into the list of sample indices it delivered. Shards are written with WebDataset's own
``TarWriter`` (an implementation independent of the reader under test) unless stated otherwise.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch


def _write_tars(folder, n: int, per_shard: int, sample, header: dict | None) -> list[str]:
    """``n`` samples ``sample(i) -> dict`` into ``shard-%06d.tar`` files of ``per_shard``, and a
    ``manifest.json`` of ``header`` plus the per-shard counts (none when ``header`` is None)."""
    import webdataset as wds

    os.makedirs(folder, exist_ok=True)
    paths, entries = [], []
    for s, lo in enumerate(range(0, n, per_shard)):
        path = os.path.join(folder, f"shard-{s:06d}.tar")
        with wds.TarWriter(path) as w:
            for i in range(lo, min(n, lo + per_shard)):
                w.write({"__key__": f"{i:08d}", **sample(i), "cls": i % 10})
        paths.append(path)
        entries.append({"name": os.path.basename(path), "count": min(n, lo + per_shard) - lo,
                        "bytes": os.path.getsize(path)})
    if header is not None:
        with open(os.path.join(folder, "manifest.json"), "w") as f:
            json.dump({"format": "mfrecipes-shards", "version": 1, **header,
                       "shards": entries}, f)
    return paths


def write_wds_shards(folder, n: int, per_shard: int, *, manifest: bool = True,
                     bad: set[int] = frozenset()) -> list[str]:
    """Write ``n`` samples into ``shard-%06d.tar`` files of ``per_shard``; returns the paths.

    ``bad``: indices whose ``x.npy`` is replaced by garbage bytes. ``manifest``: also write a
    ``manifest.json`` (by hand, in the documented format) with the per-shard counts.
    """
    def sample(i):
        return {"x.npy": b"definitely not an npy file" if i in bad else
                np.array([i, -i], dtype=np.float32)}

    header = {"created_by": "test", "name": "ids", "key": "x.npy", "modality": "points",
              "sample_shape": [2], "num_classes": 10}
    return _write_tars(folder, n, per_shard, sample, header if manifest else None)


def write_class_blobs(folder, n: int, per_shard: int) -> list[str]:
    """Conditional 2-D points: sample ``i`` of class ``i % 10`` lies near the ``i % 10``-th of
    ten points on a circle of radius 3 (noise 0.3); shards with a manifest of 10 classes."""
    def sample(i):
        rng = np.random.default_rng(i)
        angle = 2 * np.pi * (i % 10) / 10
        centre = 3 * np.array([np.cos(angle), np.sin(angle)])
        return {"x.npy": (centre + 0.3 * rng.standard_normal(2)).astype(np.float32)}

    header = {"created_by": "test", "name": "blobs", "key": "x.npy", "modality": "points",
              "sample_shape": [2], "num_classes": 10}
    return _write_tars(folder, n, per_shard, sample, header)


def ids(x: torch.Tensor) -> list[int]:
    """Sample indices of a batch ``x [B, 2]`` written by ``write_wds_shards``."""
    assert torch.equal(x[:, 1], -x[:, 0])
    return [int(v) for v in x[:, 0]]


def take(ds, n: int, *, batch_size: int = 1, start: int = 0) -> list[int]:
    """The indices of the first ``n`` samples of ``ds.batches(batch_size, start=start)``."""
    out: list[int] = []
    for x, y in ds.batches(batch_size, start=start):
        got = ids(x)
        if y is not None:
            assert [i % 10 for i in got] == y.tolist()
        out += got
        if len(out) >= n:
            return out[:n]
    raise AssertionError("stream ended")


# -- a real S3 server ----------------------------------------------------------------------------
# The child process: a moto server preloaded *before* it listens on its port. moto keeps state in
# memory, so a restarted server must be refilled; filling a staging server in the same process
# (the backends are process-wide) and only then opening the real port means a client never sees
# the new server empty.
_SERVE = r"""
import json, socket, sys, time
import boto3
from moto.server import ThreadedMotoServer

port, bucket, uploads = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    staging_port = s.getsockname()[1]
staging = ThreadedMotoServer("127.0.0.1", staging_port, verbose=False)
staging.start()
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{staging_port}")
s3.create_bucket(Bucket=bucket)
for key, path in uploads.items():
    s3.upload_file(path, bucket, key)
credentials = []
if len(sys.argv) > 4 and sys.argv[4] == "auth":
    # A bucket that requires credentials: one IAM user may read and write S3; once the real
    # port opens, moto checks every request's signature against that user's key.
    from moto import settings

    iam = boto3.client("iam", endpoint_url=f"http://127.0.0.1:{staging_port}")
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*",
                                                 "Resource": "*"}]}))
    made = iam.create_access_key(UserName="reader")["AccessKey"]
    credentials = [made["AccessKeyId"], made["SecretAccessKey"]]
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
server = ThreadedMotoServer("127.0.0.1", port, verbose=False)
server.start()
staging.stop()
print("ready", *credentials, flush=True)
while True:
    time.sleep(3600)
"""

AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3:
    """moto's S3 server in a child process on ``127.0.0.1:port``, holding ``bucket`` with
    ``uploads`` (key -> local file) from the moment it answers; ``kill()`` and ``start()`` again
    simulate a server restart on the same port."""

    def __init__(self, bucket: str, uploads: dict[str, str], log_path: str,
                 port: int | None = None, *, require_auth: bool = False):
        self.bucket, self.uploads, self.log_path = bucket, dict(uploads), log_path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        # require_auth: only signed requests with ``credentials`` (key id, secret) are served.
        self.require_auth = require_auth
        self.credentials: tuple[str, str] | None = None

    def start(self, timeout: float = 30.0) -> None:
        import select
        import subprocess
        import sys

        env = {**os.environ, **AWS_TEST_ENV}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVE, str(self.port), self.bucket, json.dumps(self.uploads),
             *(["auth"] if self.require_auth else [])],
            stdout=subprocess.PIPE, stderr=log, env=env)
        log.close()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""  # "ready", or b"" if it died
        words = line.decode().split()
        if words[:1] != ["ready"]:
            self.kill()
            raise RuntimeError(f"moto server did not start; see {self.log_path}")
        if self.require_auth:
            self.credentials = (words[1], words[2])

    def kill(self) -> None:
        """Stop the server abruptly (SIGKILL), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None


# -- images and a tiny VAE -----------------------------------------------------------------------
def write_image_folder(root, classes: dict[str, int], *, size=(40, 30), seed: int = 0) -> list:
    """``root/<class>/img<i>.png``, ``classes[name]`` images each, random colours; returns paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for name, n in classes.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            path = os.path.join(root, name, f"img{i:03d}.png")
            Image.fromarray(arr).save(path)
            paths.append(path)
    return paths


def tiny_vae_config() -> dict:
    """An AutoencoderKL with SD-VAE's interface (4 latent channels) at a few thousand weights;
    two blocks: the latent is the image downsampled by 2."""
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32)


def save_tiny_vae(folder) -> str:
    """A randomly initialised tiny AutoencoderKL saved with ``save_pretrained``; its path."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**tiny_vae_config()).save_pretrained(str(folder))
    return str(folder)


def write_latent_shards(folder, n: int, per_shard: int, *, shape=(2, 3, 3), scale=0.5,
                        manifest: bool = True) -> list[str]:
    """Latent shards in the ``mean_std`` layout whose samples say who they are.

    Sample ``i``: ``mean = i`` everywhere, ``std = 0`` at ``[0, 0, 0]`` (so ``x[0, 0, 0] / scale``
    is ``i`` exactly) and ``0.5 + i / 100`` elsewhere; ``cls = i % 10``.
    """
    def sample(i):
        mean = np.full(shape, i, np.float32)
        std = np.full(shape, 0.5 + i / 100, np.float32)
        std[0, 0, 0] = 0
        return {"latent.npy": np.stack([mean, std])}

    header = {"name": "lat", "key": "latent.npy", "modality": "latent",
              "sample_shape": list(shape), "num_classes": 10, "layout": "mean_std",
              "latent_scale": scale, "vae": "some/vae"}
    return _write_tars(folder, n, per_shard, sample, header if manifest else None)


def latent_ids_and_noise(x: torch.Tensor, scale: float = 0.5) -> tuple[list[int], torch.Tensor]:
    """For latents from ``write_latent_shards``: sample indices and the noise ``n`` each used
    (``[B, *shape]``, the ``[0, 0, 0]`` entry zero), recomputed as ``(x / scale - mean) / std``."""
    z = x.double() / scale
    i = z[:, 0, 0, 0].round()
    assert torch.allclose(z[:, 0, 0, 0], i, atol=1e-4)
    std = (0.5 + i / 100).view(-1, *[1] * (x.dim() - 1))
    n = (z - i.view_as(std)) / std
    n[:, 0, 0, 0] = 0
    return [int(v) for v in i], n
