"""Image folders in the ImageNet layout (``root/<class>/<image>``) or without labels, and ADM's
centre crop.

Labelled folders: classes are the sub-folder names in sorted order (index 0, 1, ...), images every
file inside them, in sorted order; hidden files are ignored. Whether a file is an image is decided
by decoding it: ``load_image`` returns None for anything PIL cannot read, and the caller skips and
counts it. Unlabelled folders (FFHQ: ``root/00000/00000.png`` ...): every file with an image
extension anywhere below the root, in sorted path order, label None; the sub-folders are only
storage, not classes.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from mfrecipes.errors import DataError


def center_crop_arr(image, size: int) -> np.ndarray:
    """ADM's preprocessing: ``[size, size, 3]`` uint8 from a PIL image.

    Halve with a box filter while the short side is at least twice ``size`` (cheap and
    alias-free), resize with bicubic so the short side is ``size``, then take the centre square.
    """
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def load_image(path: str, size: int) -> Optional[np.ndarray]:
    """``[size, size, 3]`` uint8 RGB, centre-cropped; None if ``path`` is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return center_crop_arr(im.convert("RGB"), size)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):  # PIL's decode errors
        return None


def scan_image_folder(root: str) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """``([(path, class_index), ...], {class_name: index})`` of an ImageNet-layout folder."""
    if not os.path.isdir(root):
        raise DataError(f"not a folder: {root}; valid: a folder with one sub-folder per class "
                        f"(ImageNet layout: root/n01440764/*.JPEG) or an embedded dataset name",
                        path="SOURCE")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise DataError(f"{root} has no class sub-folders; valid: one sub-folder per class "
                        f"holding its images (root/<class>/<image>)", path="SOURCE")
    classes = {n: i for i, n in enumerate(names)}
    files = []
    for name in names:
        folder = os.path.join(root, name)
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_file() and not entry.name.startswith("."):
                files.append((entry.path, classes[name]))
    if not files:
        raise DataError(f"{root} has {len(names)} class folders but no files in them",
                        path="SOURCE")
    return files, classes


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def scan_unlabelled_folder(root: str) -> list[tuple[str, None]]:
    """``[(path, None), ...]``: every image file below ``root`` (any depth), sorted by path.

    Files are chosen by extension (``IMAGE_EXTENSIONS``, any case) so the licence and metadata
    files that come with a data set are not counted as unreadable images; hidden files and
    folders are ignored.
    """
    if not os.path.isdir(root):
        raise DataError(f"not a folder: {root}; valid: a folder of images (any depth, e.g. FFHQ's "
                        f"images1024x1024/00000/00000.png)", path="SOURCE")
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(os.path.join(folder, name))
    if not files:
        raise DataError(f"{root} holds no image files (extensions: "
                        f"{', '.join(IMAGE_EXTENSIONS)})", path="SOURCE")
    return [(path, None) for path in sorted(files)]
