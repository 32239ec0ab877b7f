"""On-disk cache of frozen image features for evaluation images.

The test transform is deterministic, so the frozen encoder's feature of a val/test image depends
only on the backbone weights (and compute precision), the transform and the image file. One
shard per (backbone, transform); inside it one row per image, stamped with the file's size and
modification time, so an edited image is recomputed. Later evaluations, seeds and configs that
share backbone and transform reuse the rows. A file's real path and stamp are read once per
cache object (once per run), not at every evaluation batch: on a network file system each
`realpath`/`stat` is a round trip, and an image edited while a run is evaluating is not expected.

Concurrent jobs (a sweep's seeds, base and new tests) share shards: a save merges this process's
new rows into what is on disk at that moment, under a lock, so no writer loses another's rows.
"""
import hashlib
import os
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor

from ..files import atomic_torch_save, file_lock, read_tensor_cache


def file_stamp(path: str) -> str:
    stat = os.stat(path)
    return f"{stat.st_size}:{stat.st_mtime_ns}"


class ImageFeatureCache:
    def __init__(self, directory: Optional[str], backbone_key: str, transform_key: str,
                 report: Callable[[str], None] = print):
        self.backbone_key, self.transform_key, self.report = backbone_key, transform_key, report
        shard = hashlib.sha256(f"{backbone_key}\n{transform_key}".encode()).hexdigest()[:32]
        self.path = (os.path.join(os.path.expanduser(directory), "image_features", f"{shard}.pt")
                     if directory else None)
        self.rows: Dict[str, Tuple[str, Tensor]] = self._read_rows()  # real path -> (stamp, feature [E] fp32)
        self.fresh: Set[str] = set()  # rows computed by this process and not saved yet
        self._files: Dict[str, Tuple[str, str]] = {}  # path as given -> (real path, stamp), read once
        self.hits = self.misses = 0
        if self.rows:
            self.report(f"frozen image features: {len(self.rows)} cached in {self.path}")

    @property
    def added(self) -> int:
        return len(self.fresh)

    def _read_rows(self, warn: bool = True) -> Dict[str, Tuple[str, Tensor]]:
        data = read_tensor_cache(self.path, self.report if warn else (lambda text: None))
        if not isinstance(data, dict) or not {"paths", "stamps", "features"} <= set(data):
            return {}
        if (data.get("backbone"), data.get("transform")) != (self.backbone_key, self.transform_key):
            return {}  # a hash collision on the shard name: ignore the file
        return {path: (stamp, feature) for path, stamp, feature in zip(data["paths"], data["stamps"], data["features"])}

    def features(self, impaths: Sequence[str], images: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
        """[B, E] features of `images` (whose files are `impaths`); computes only the missing rows."""
        files = [self._file(p) for p in impaths]
        keys, stamps = [k for k, _ in files], [s for _, s in files]
        missing = [i for i, (k, s) in enumerate(zip(keys, stamps)) if self.rows.get(k, (None,))[0] != s]
        if missing:
            index = torch.tensor(missing, device=images.device)
            fresh = compute(images.index_select(0, index)).float().cpu()
            for row, i in enumerate(missing):
                self.rows[keys[i]] = (stamps[i], fresh[row])
                self.fresh.add(keys[i])
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        return torch.stack([self.rows[k][1] for k in keys]).to(images.device)

    def _file(self, path: str) -> Tuple[str, str]:
        known = self._files.get(path)
        if known is None:
            real = os.path.realpath(path)
            known = self._files[path] = (real, file_stamp(real))
        return known

    def save(self) -> None:
        """Merge this process's new rows into the shard on disk (other jobs may have added
        theirs since it was read) and write it back atomically, under the shard's lock."""
        if not self.path or not self.fresh:
            return
        with file_lock(self.path + ".lock"):
            merged = self._read_rows(warn=False)  # an unreadable shard was reported when first read
            merged.update({path: self.rows[path] for path in self.fresh})
            paths: List[str] = list(merged)
            atomic_torch_save({"backbone": self.backbone_key, "transform": self.transform_key, "paths": paths,
                               "stamps": [merged[p][0] for p in paths],
                               "features": torch.stack([merged[p][1] for p in paths])}, self.path)
        self.report(f"frozen image features: {len(self.fresh)} new, {len(paths)} cached in {self.path}")
        self.rows = merged
        self.fresh = set()
