#!/usr/bin/env python
"""Make WebDataset shards for mfrecipes, locally or on any fsspec URL (s3://bucket/prefix).

    # ImageNet (one folder per class) -> SD-VAE latents, 256x256 ADM centre crop
    python tools/make_shards.py /data/imagenet/train --out s3://my-bucket/imagenet256-latents \\
        --vae stabilityai/sd-vae-ft-mse --device cuda --batch-size 128

    # CIFAR-10 from the official python archive -> x.npy shards in [-1, 1]
    python tools/make_shards.py cifar10 --source cifar-10-python.tar.gz --out shards/cifar10
    # an unlabelled image folder (FFHQ) -> latents without class labels
    python tools/make_shards.py /data/ffhq/images1024x1024 --unlabelled \\
        --out s3://my-bucket/ffhq256-latents --device cuda --batch-size 128

    # an embedded dataset -> plain x.npy shards
    python tools/make_shards.py digits --out shards/digits-r8
    python tools/make_shards.py toy2d/checkerboard --out shards/checkerboard --num-points 50000

S3 credentials, region and endpoint come from the standard AWS environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL); --endpoint-url overrides the last.
The dataset cards in datasets/ give the exact commands for each set.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE",
                   help="an image folder (one sub-folder per class, or any layout with "
                        "--unlabelled), cifar10 (with --source) or an embedded dataset: digits, "
                        "toy2d/<kind>")
    p.add_argument("--out", required=True, metavar="URL",
                   help="destination folder or URL prefix (local, file://, s3://bucket/prefix)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard set")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, help="samples in each shard")
    size.add_argument("--shard-size-mb", type=float, default=128.0,
                      help="target shard size in MiB for latents (default 128)")
    g = p.add_argument_group("image folders -> latents")
    g.add_argument("--vae", default="stabilityai/sd-vae-ft-mse", metavar="PATH_OR_ID",
                   help="AutoencoderKL: a save_pretrained folder or a hub id")
    g.add_argument("--unlabelled", action="store_true",
                   help="no class labels: every image below SOURCE, sub-folders are not classes "
                        "(unconditional data such as FFHQ)")
    g.add_argument("--resolution", type=int,
                   help="centre-crop size (default 256; digits: 8, 16 or 32, default 8)")
    g.add_argument("--batch-size", type=int, default=32, help="images per VAE call")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--scale", type=float, default=0.18215, help="latent scale (SD-VAE)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="storage type of mean and std")
    g.add_argument("--seed", type=int, default=0, help="seed of the file order shuffle")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="image decoding threads")
    g.add_argument("--name", help="dataset name in the manifest")
    g.add_argument("--prefix", default="shard", help="shard file names: PREFIX-000000.tar ...")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    c = p.add_argument_group("cifar10")
    c.add_argument("--source", dest="cifar_source", metavar="PATH",
                   help="cifar10: the official cifar-10-python.tar.gz")
    c.add_argument("--split", default="train", choices=["train", "test"], help="cifar10: split")
    e = p.add_argument_group("embedded datasets")
    e.add_argument("--num-points", type=int, default=50_000, help="toy2d: pool size")
    e.add_argument("--data-seed", type=int, default=0, help="toy2d: seed of the pool")
    e.add_argument("--num-shards", type=int, help="number of shards (digits 4, toy2d 8)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mfrecipes.data.make_shards import (build_embedded_shards, build_latent_shards,
                                            embedded_source)
    from mfrecipes.errors import MfrError

    opts = {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else None
    try:
        if args.source == "cifar10" and not os.path.isdir(args.source):
            from mfrecipes.data.make_shards import build_cifar10_shards
            from mfrecipes.errors import DataError

            if not args.cifar_source:
                raise DataError("cifar10 needs the archive: --source cifar-10-python.tar.gz",
                                path="--source")
            build_cifar10_shards(args.cifar_source, args.out, split=args.split,
                                 num_shards=args.num_shards or 10, storage_options=opts,
                                 overwrite=args.overwrite)
            return 0
        if not os.path.isdir(args.source) and embedded_source(args.source) is not None:
            build_embedded_shards(args.source, args.out, resolution=args.resolution,
                                  num_points=args.num_points, data_seed=args.data_seed,
                                  num_shards=args.num_shards, storage_options=opts,
                                  overwrite=args.overwrite)
            return 0
        device = args.device
        if device == "auto":
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        build_latent_shards(args.source, args.out, vae=args.vae,
                            resolution=args.resolution or 256, batch_size=args.batch_size,
                            samples_per_shard=args.samples_per_shard,
                            shard_size_mb=args.shard_size_mb, device=device, seed=args.seed,
                            scale=args.scale, dtype=args.dtype, workers=args.workers,
                            name=args.name, prefix=args.prefix, storage_options=opts,
                            overwrite=args.overwrite, labels=not args.unlabelled,
                            progress=not args.no_progress and sys.stderr.isatty())
    except MfrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
