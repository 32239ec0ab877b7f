"""The on-disk cache of frozen image features for evaluation images."""
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import requires_dassl

from vlprompt.clip.loading import random_clip
from vlprompt.clip.image_features import ImageFeatureCache
from vlprompt.files import tensors_fingerprint
from vlprompt.clip.encoders import PromptedImageEncoder


def write_images(folder, n, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img_{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def load(paths):
    return torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1).float() / 255 for p in paths])


class Encoder:
    """Frozen features with a count of the images it was asked to encode."""

    def __init__(self, clip_model):
        self.encoder, self.encoded = PromptedImageEncoder(clip_model), 0
        self.key = tensors_fingerprint(self.encoder.state_dict().items())

    def __call__(self, images):
        self.encoded += len(images)
        with torch.no_grad():
            return self.encoder(images)


@pytest.fixture
def setting(tmp_path, tiny_clip):
    paths = write_images(tmp_path, 6)
    return tmp_path, paths, Encoder(tiny_clip)


def test_cached_features_equal_fresh_ones_and_only_missing_rows_are_computed(setting):
    folder, paths, encode = setting
    cache = ImageFeatureCache(str(folder / "cache"), encode.key, "resize32")
    first = cache.features(paths[:4], load(paths[:4]), encode)
    assert encode.encoded == 4
    mixed = cache.features(paths[2:], load(paths[2:]), encode)  # rows 2, 3 cached; 4, 5 new
    assert encode.encoded == 6 and (cache.hits, cache.misses) == (2, 6)
    fresh = encode(load(paths))
    torch.testing.assert_close(torch.cat([first, mixed[2:]]), fresh, atol=1e-5, rtol=1e-5)
    cache.save()
    reloaded = ImageFeatureCache(str(folder / "cache"), encode.key, "resize32")  # a later run
    before = encode.encoded
    torch.testing.assert_close(reloaded.features(paths, load(paths), encode), fresh, atol=1e-5, rtol=1e-5)
    assert encode.encoded == before


def test_changed_image_file_is_recomputed(setting):
    folder, paths, encode = setting
    cache = ImageFeatureCache(str(folder / "cache"), encode.key, "resize32")
    old = cache.features(paths, load(paths), encode)
    cache.save()
    time.sleep(0.01)
    write_images(folder, 1, seed=42)  # img_0.png gets new content
    os.utime(paths[0], ns=(time.time_ns(), time.time_ns()))
    cache = ImageFeatureCache(str(folder / "cache"), encode.key, "resize32")
    encode.encoded = 0
    new = cache.features(paths, load(paths), encode)
    assert encode.encoded == 1
    assert not torch.allclose(new[0], old[0]) and torch.equal(new[1:], old[1:])


def test_other_transform_or_backbone_uses_another_shard(setting):
    folder, paths, encode = setting
    cache = ImageFeatureCache(str(folder / "cache"), encode.key, "resize32")
    cache.features(paths, load(paths), encode)
    cache.save()
    other_transform = ImageFeatureCache(str(folder / "cache"), encode.key, "resize32+flip")
    other_backbone = Encoder(random_clip("tiny", seed=9))
    assert other_backbone.key != encode.key
    other = ImageFeatureCache(str(folder / "cache"), other_backbone.key, "resize32")
    encode.encoded = 0
    other_transform.features(paths, load(paths), encode)
    assert encode.encoded == len(paths)
    torch.testing.assert_close(other.features(paths, load(paths), other_backbone), other_backbone(load(paths)))
    assert len(list((folder / "cache" / "image_features").glob("*.pt"))) == 1  # only the saved shard


def test_without_a_directory_nothing_is_written(setting):
    folder, paths, encode = setting
    cache = ImageFeatureCache(None, encode.key, "t")
    cache.features(paths, load(paths), encode)
    cache.save()
    assert not (folder / "cache").exists()


CONCURRENT_WRITER = """
import os, sys, time
import torch
sys.path.insert(0, {root!r})
from vlprompt.clip.image_features import ImageFeatureCache
from test_feature_cache import load
folder, me, other, paths = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
cache = ImageFeatureCache(folder, "backbone", "transform", report=lambda _: None)
cache.features(paths, load(paths), lambda images: images.mean(dim=(2, 3)))
open(os.path.join(folder, "read_" + me), "w").close()
while not os.path.exists(os.path.join(folder, "read_" + other)):  # both read before either writes
    time.sleep(0.01)
cache.save()
"""


def test_concurrent_writers_lose_no_rows(tmp_path):
    """Two jobs that read the shard before either saved (a sweep's seeds evaluating at once)
    each add their own rows; both sets survive."""
    import subprocess
    import sys
    from conftest import ROOT
    paths = write_images(tmp_path, 6)
    script = CONCURRENT_WRITER.format(root=os.path.join(ROOT, "tests"))
    jobs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), me, other, *mine])
            for me, other, mine in (("a", "b", paths[:3]), ("b", "a", paths[3:]))]
    assert [job.wait(timeout=120) for job in jobs] == [0, 0]
    merged = ImageFeatureCache(str(tmp_path), "backbone", "transform", report=lambda _: None)
    assert sorted(merged.rows) == sorted(os.path.realpath(p) for p in paths)
    never = lambda images: pytest.fail("every row should come from the cache")  # noqa: E731
    torch.testing.assert_close(merged.features(paths, load(paths), never), load(paths).mean(dim=(2, 3)))


def test_unreadable_cache_files_are_cache_misses_with_one_warning(setting, tiny_clip, capsys):
    """A cache file truncated by a crash of something else is recomputed, never a crash: the
    frozen image features, the class text features and a few-shot split pickle."""
    import vlprompt.clip.class_features as cf
    from datasets.coop_split import FewShotCache
    from vlprompt.clip.encoders import PromptedTextEncoder
    folder, paths, encode = setting
    cache = ImageFeatureCache(str(folder / "cache"), encode.key, "resize32")
    expected = cache.features(paths, load(paths), encode)
    cache.save()
    shard = cache.path
    open(shard, "r+b").truncate(100)
    again = ImageFeatureCache(str(folder / "cache"), encode.key, "resize32")
    torch.testing.assert_close(again.features(paths, load(paths), encode), expected, atol=1e-5, rtol=1e-5)
    assert again.misses == len(paths)
    again.save()  # the unreadable shard is replaced by a readable one
    assert len(ImageFeatureCache(str(folder / "cache"), encode.key, "resize32").rows) == len(paths)

    store, text_encoder = cf.ClassFeatureStore(str(folder / "cache"), report=print), PromptedTextEncoder(tiny_clip)
    features = cf.frozen_class_features(text_encoder, ["cat", "dog"], None, store=store)
    (class_file,) = (folder / "cache" / "class_features").glob("*.pt")
    class_file.write_bytes(b"not a torch file")
    torch.testing.assert_close(cf.frozen_class_features(text_encoder, ["cat", "dog"], None, store=store), features)

    few_shot = FewShotCache(str(folder / "data"), str(folder / "cache"))
    saved = few_shot.save({"train": [1, 2]}, 2, 1)
    open(saved, "r+b").truncate(5)
    assert few_shot.load(2, 1) is None
    output = capsys.readouterr().out
    for path in (shard, class_file, saved):
        assert output.count(f"warning: cannot read the cache file {path}") == 1


def test_files_are_looked_up_once_per_run_not_per_evaluation(setting, monkeypatch):
    """realpath and stat are round trips on a network file system: once per file per run."""
    import vlprompt.clip.image_features as image_features
    folder, paths, encode = setting
    cache = ImageFeatureCache(str(folder / "cache"), encode.key, "resize32")
    calls = {"stat": 0, "realpath": 0}
    real_stat, real_realpath = os.stat, os.path.realpath

    def stat(path, *args, **kwargs):
        calls["stat"] += 1
        return real_stat(path, *args, **kwargs)

    def realpath(path, *args, **kwargs):
        calls["realpath"] += 1
        return real_realpath(path, *args, **kwargs)
    monkeypatch.setattr(image_features.os, "stat", stat)
    monkeypatch.setattr(image_features.os.path, "realpath", realpath)
    images = load(paths)
    first = cache.features(paths, images, encode)
    for _ in range(3):  # three more evaluations of the same images
        again = cache.features(paths, images, encode)
    monkeypatch.undo()
    assert calls == {"stat": 6, "realpath": 6} and torch.equal(first, again) and encode.encoded == 6


@requires_dassl
def test_the_cache_key_names_where_and_how_features_are_computed(monkeypatch):
    from trainers.clip_prompt import compute_key
    cpu = compute_key(torch.device("cpu"))
    assert cpu.startswith("cpu|") and torch.__version__ in cpu
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    tf32 = compute_key(torch.device("cuda", 0))
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    full = compute_key(torch.device("cuda", 0))
    assert len({cpu, tf32, full}) == 3 and "tf32=True" in tf32
