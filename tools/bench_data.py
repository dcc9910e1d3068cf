#!/usr/bin/env python
"""Throughput of the shard reader on latent-sized samples, against the standard library.

Writes ``--samples`` latent samples shaped like ImageNet-256 SD-VAE latents (``latent.npy`` =
mean and std, ``[2, 4, 32, 32]`` float32, plus ``cls``) into ``--shards`` tar files, then times one
epoch (best of ``--repeats``) of:

* ours: ``Shards(...).batches(B)``: the whole training path (tar parse, shuffle buffer, decode,
  ``0.18215 * (mean + std * n)`` with fresh seeded noise, batching into tensors);
* webdataset: ``wds.WebDataset`` over the same shards with a shuffle buffer, ``.decode()`` of
  the ``.npy``, the same noise draw and ``.batched(B)``;
* stdlib: the same tar files read with ``tarfile`` (stream mode) and ``numpy.load`` of each
  member, and nothing else;

from local disk, and from a moto S3 server it starts on 127.0.0.1 (ours through s3fs; the
standard library through ``urllib`` GETs, which moto serves without signatures). It prints
samples/s and the ratio ours / stdlib, and compares with the rate a training step consumes
(``--step-img-per-s``, e.g. a measured DiT-B/4 step; unknown by default).

    python tools/bench_data.py                      # table
    python tools/bench_data.py --json               # one JSON object
    python tools/bench_data.py --step-img-per-s 1800 --no-s3
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request

import numpy as np

LATENT = (4, 32, 32)


def write_set(folder: str, samples: int, shards: int) -> list[str]:
    from mfrecipes.data.make_shards import DEFAULT_SCALE
    from mfrecipes.data.manifest import Manifest, write_manifest
    from mfrecipes.data.writer import ShardWriter, array_sample

    rng = np.random.default_rng(0)
    writer = ShardWriter(folder, samples_per_shard=-(-samples // shards))
    for i in range(samples):
        mean = rng.standard_normal(LATENT, dtype=np.float32)
        std = rng.uniform(0.01, 0.2, LATENT).astype(np.float32)
        writer.write(array_sample(i, np.stack([mean, std]), i % 1000, "latent.npy"))
    entries = writer.close()
    write_manifest(os.path.join(folder, "manifest.json"), Manifest(
        name="bench", key="latent.npy", modality="latent", sample_shape=LATENT,
        num_classes=1000, shards=entries, latent_scale=DEFAULT_SCALE, vae="bench",
        layout="mean_std"))
    return [os.path.join(folder, e.name) for e in entries]


def best_rate(fn, n: int, repeats: int) -> float:
    """Samples/s of ``fn()`` (which must read ``n`` samples), best of ``repeats``."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        got = fn()
        dt = time.perf_counter() - t0
        if got != n:
            raise RuntimeError(f"read {got} samples, expected {n}")
        best = min(best, dt)
    return n / best


def ours(urls, n: int, batch: int, workers: int, storage_options=None):
    from mfrecipes.data.shards import Shards

    def run() -> int:
        ds = Shards(urls=urls, seed=0, num_workers=workers, storage_options=storage_options)
        got = 0
        for x, _ in ds.batches(batch):  # one epoch: n is a multiple of the batch size
            got += len(x)
            if got >= n:
                return got
        return got
    return run


def webdataset_pipeline(urls: str, n: int, batch: int):
    import webdataset as wds

    from mfrecipes.data.make_shards import DEFAULT_SCALE

    def run() -> int:
        rng = np.random.default_rng(0)

        def latent(sample):
            ms = sample["latent.npy"]                       # [2, 4, 32, 32]: mean, std
            z = ms[0] + ms[1] * rng.standard_normal(ms.shape[1:], dtype=np.float32)
            return DEFAULT_SCALE * z, sample["cls"]

        ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(1000)
              .decode().map(latent).batched(batch))
        got = 0
        for x, _ in ds:
            got += len(x)
        return got
    return run


def stdlib_tar(opener, names: list[str]):
    def run() -> int:
        got = 0
        for name in names:
            with opener(name) as f, tarfile.open(fileobj=f, mode="r|") as tf:
                for m in tf:
                    data = tf.extractfile(m).read()
                    if m.name.endswith(".npy"):
                        np.load(io.BytesIO(data))
                        got += 1
                    elif m.name.endswith(".cls"):
                        int(data)
        return got
    return run


def start_moto(folder: str, bucket: str, keys: list[str]):
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    s3 = boto3.client("s3", endpoint_url=url)
    s3.create_bucket(Bucket=bucket)
    for k in keys:
        s3.upload_file(os.path.join(folder, k), bucket, f"bench/{k}")
    return proc, url


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for ours")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-s3", action="store_true", help="local disk only")
    p.add_argument("--step-img-per-s", type=float, default=None,
                   help="images/s a DiT-B/4 training step consumes (measured elsewhere)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.samples % args.batch_size:
        p.error("--samples must be a multiple of --batch-size (one epoch of whole batches)")

    folder = tempfile.mkdtemp(prefix="mfr-bench-data-")
    proc = None
    try:
        paths = write_set(folder, args.samples, args.shards)
        names = [os.path.basename(x) for x in paths]
        n = args.samples
        pattern = os.path.join(folder, f"shard-{{000000..{len(paths) - 1:06d}}}.tar")
        res = {"samples": n, "shards": len(paths), "sample_bytes": 2 * 4 * np.prod(LATENT),
               "batch_size": args.batch_size, "workers": args.workers}
        res["local_ours"] = best_rate(ours(pattern, n, args.batch_size, args.workers), n,
                                      args.repeats)
        res["local_webdataset"] = best_rate(webdataset_pipeline(pattern, n, args.batch_size), n,
                                            args.repeats)
        res["local_stdlib"] = best_rate(stdlib_tar(lambda nm: open(os.path.join(folder, nm),
                                                                   "rb"), names),
                                        n, args.repeats)
        if not args.no_s3:
            proc, url = start_moto(folder, "mfr-bench", [*names, "manifest.json"])
            s3_pattern = f"s3://mfr-bench/bench/shard-{{000000..{len(paths) - 1:06d}}}.tar"
            opts = {"client_kwargs": {"endpoint_url": url}}
            res["s3_ours"] = best_rate(ours(s3_pattern, n, args.batch_size, args.workers, opts),
                                       n, args.repeats)
            res["s3_stdlib"] = best_rate(stdlib_tar(
                lambda nm: urllib.request.urlopen(f"{url}/mfr-bench/bench/{nm}"), names),
                n, args.repeats)
        for where in ("local", "s3"):
            if f"{where}_ours" in res:
                res[f"{where}_ratio"] = res[f"{where}_ours"] / res[f"{where}_stdlib"]
        res["local_ours_over_webdataset"] = res["local_ours"] / res["local_webdataset"]
        res["step_img_per_s"] = args.step_img_per_s
        if args.step_img_per_s:
            for where in ("local", "s3"):
                if f"{where}_ours" in res:
                    res[f"{where}_headroom"] = res[f"{where}_ours"] / args.step_img_per_s
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)

    if args.json:
        print(json.dumps({k: (float(v) if isinstance(v, (np.floating, np.integer)) else v)
                          for k, v in res.items()}))
        return 0
    print(f"{n} latent samples ([2, 4, 32, 32] float32 + cls, {res['sample_bytes']} bytes), "
          f"{len(paths)} shards, batch {args.batch_size}, workers {args.workers}, "
          f"best of {args.repeats}")
    print(f"{'source':8} {'ours/s':>10} {'stdlib/s':>10} {'ours/stdlib':>12}")
    for where in ("local", "s3"):
        if f"{where}_ours" in res:
            print(f"{where:8} {res[where + '_ours']:10.0f} {res[where + '_stdlib']:10.0f} "
                  f"{res[where + '_ratio']:12.2f}")
    print(f"local webdataset pipeline: {res['local_webdataset']:.0f}/s; ours / webdataset = "
          f"{res['local_ours_over_webdataset']:.2f}")
    if args.step_img_per_s:
        for where in ("local", "s3"):
            if f"{where}_headroom" in res:
                print(f"{where}: the reader delivers {res[where + '_headroom']:.1f}x what a "
                      f"training step consumes ({args.step_img_per_s:.0f} img/s)")
    else:
        print("training step consumption (DiT-B/4): unknown (pass --step-img-per-s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
