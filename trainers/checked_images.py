"""Dassl's data pipeline, failing fast and clearly on unreadable images.

Dassl's DatasetWrapper lets PIL's error surface from a loader worker; for a truncated JPEG that
error does not even name the file. Here an unreadable image stops the run at once with its path
and the ways out, or, with DATALOADER.SKIP_BROKEN_IMAGES True, every image is decoded once when
the loaders are built and the unreadable ones are left out with a warning naming each.
"""
from concurrent.futures import ThreadPoolExecutor
from typing import List

import numpy as np
from dassl.data import DataManager
from dassl.data.data_manager import DatasetWrapper
from dassl.data.transforms import randaugment
from PIL import Image, ImageOps

from vlprompt.errors import UserError


def solarize_add(img, addition=0, threshold=128):
    """Dassl's RandAugment op SolarizeAdd, the same arithmetic with `int` where it uses numpy's
    `np.int` alias, removed in numpy 1.24 (the op then raises AttributeError, so INPUT.TRANSFORMS
    ["randaugment", ...], CoPrompt's recipe, fails at the first image that draws it)."""
    pixels = np.clip(np.array(img).astype(int) + addition, 0, 255).astype(np.uint8)
    return ImageOps.solarize(Image.fromarray(pixels), threshold)


randaugment.SolarizeAdd = solarize_add  # randaugment_list() reads the module's op when a transform is built


class BrokenImageError(UserError, RuntimeError):
    """An image file of the dataset cannot be decoded."""


def _unreadable(path: str) -> str:
    """'' when `path` decodes as an image, else the reason."""
    try:
        with Image.open(path) as image:
            image.convert("RGB")
        return ""
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f"{type(err).__name__}: {err}"


def _bad_header(path: str) -> str:
    """'' when `path` opens as an image (PIL parses the header only, no pixels), else the reason."""
    try:
        with Image.open(path) as image:
            image.size
        return ""
    except Exception as err:  # noqa: BLE001  same family of errors as _unreadable
        return f"{type(err).__name__}: {err}"


def check_headers(data_source: List, threads: int = 8) -> None:
    """Every image's header, when the loaders are built: a corrupt test image stops the run before
    its first training step, not at its end. PIL parses the header in Python (threads do not help):
    10.7 s for 50,000 JPEGs on a shared 2-core machine at load 11, files in the page cache."""
    with ThreadPoolExecutor(threads) as pool:
        reasons = list(pool.map(_bad_header, [item.impath for item in data_source]))
    bad = [(item.impath, reason) for item, reason in zip(data_source, reasons) if reason]
    if bad:
        listed = "; ".join(f"{path} ({reason})" for path, reason in bad[:5])
        raise BrokenImageError(
            f"{len(bad)} image file(s) cannot be read: {listed}{' ...' if len(bad) > 5 else ''}. Replace or remove "
            f"them (and their entries in the split file), or set DATALOADER.SKIP_BROKEN_IMAGES True to leave "
            f"unreadable images out with a warning.")


def readable_only(data_source: List, threads: int = 8) -> List:
    with ThreadPoolExecutor(threads) as pool:  # PIL decodes outside the GIL
        reasons = list(pool.map(_unreadable, [item.impath for item in data_source]))
    for item, reason in zip(data_source, reasons):
        if reason:
            print(f"warning: skipping unreadable image {item.impath} ({reason})")
    return [item for item, reason in zip(data_source, reasons) if not reason]


class CheckedImages(DatasetWrapper):
    def __init__(self, cfg, data_source, transform=None, is_train=False):
        if cfg.DATALOADER.SKIP_BROKEN_IMAGES:
            # in place: Dassl built the loader's sampler on this very list
            data_source[:] = readable_only(data_source)
        elif not is_train:  # a broken training image shows in the first epoch; val/test ones only at the end
            check_headers(data_source)
        super().__init__(cfg, data_source, transform=transform, is_train=is_train)

    def __getitem__(self, idx):
        try:
            return super().__getitem__(idx)
        except Exception as err:
            path = self.data_source[idx].impath
            reason = _unreadable(path)
            if not reason:  # the image is fine: a transform or something else failed
                raise
            raise BrokenImageError(
                f"cannot read image {path} ({reason}). Replace or remove the file (and its entry in "
                f"the split file), or set DATALOADER.SKIP_BROKEN_IMAGES True to leave unreadable "
                f"images out with a warning.") from err


def build_data_manager(cfg, **custom_transforms) -> DataManager:
    return DataManager(cfg, dataset_wrapper=CheckedImages, **custom_transforms)
