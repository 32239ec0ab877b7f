"""Frozen class text features: descriptions or templates, and their on-disk cache."""
import json

import clip
import pytest
import torch

from vlprompt.clip import class_features as cf
from vlprompt.clip.loading import random_clip
from vlprompt.clip.encoders import PromptedTextEncoder
from vlprompt.clip.templates import GENERIC_TEMPLATES

CLASSES = ["golden_retriever", "tabby cat"]
DESCRIPTIONS = {
    "golden retriever": ["a friendly dog with golden fur.", "a large retriever breed."],
    "tabby cat": ["a cat with striped fur.", "a domestic cat with an M on its forehead.", "a tabby."],
}


def write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def manual_features(model, texts_per_class):
    out = []
    with torch.no_grad():
        for texts in texts_per_class:
            f = model.encode_text(clip.tokenize(texts)).float()
            f = f / f.norm(dim=-1, keepdim=True)
            out.append(f.mean(0) / f.mean(0).norm())
    return torch.stack(out)


def test_descriptions_file_gives_mean_of_normalised_description_features(tiny_clip, tmp_path):
    path = write_json(tmp_path / "pets_prompt.json", DESCRIPTIONS)
    got = cf.frozen_class_features(PromptedTextEncoder(tiny_clip), CLASSES, path)
    expected = manual_features(tiny_clip, [DESCRIPTIONS["golden retriever"], DESCRIPTIONS["tabby cat"]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2))


def test_templates_are_used_without_a_descriptions_file(tiny_clip, tmp_path, caplog):
    caplog.set_level("INFO", logger="vlprompt")
    got = cf.frozen_class_features(PromptedTextEncoder(tiny_clip), CLASSES, str(tmp_path / "missing.json"))
    texts = [[t.format(name) for t in GENERIC_TEMPLATES] for name in ("golden retriever", "tabby cat")]
    torch.testing.assert_close(got, manual_features(tiny_clip, texts), atol=1e-5, rtol=1e-5)
    assert "WARNING: NO CLASS DESCRIPTIONS" in caplog.text and "missing.json not found" in caplog.text
    assert "prompt templates" in caplog.text and "DATASET.REQUIRE_DESCRIPTIONS True" in caplog.text


def test_a_method_that_uses_templates_gets_no_missing_descriptions_warning(tiny_clip, caplog):
    """PromptSRC, KgCoOp, zero-shot CLIP: templates are their recipe, so nothing is missing."""
    caplog.set_level("INFO", logger="vlprompt")
    cf.frozen_class_features(PromptedTextEncoder(tiny_clip), CLASSES, None, templates=("a photo of a {}.",))
    assert "NO CLASS DESCRIPTIONS" not in caplog.text and "from 1 prompt templates" in caplog.text


def test_missing_class_in_descriptions_names_file_and_class(tiny_clip, tmp_path):
    path = write_json(tmp_path / "d.json", {"golden retriever": ["a dog."]})
    with pytest.raises(cf.DescriptionsError, match=r"d\.json.*'tabby cat'"):
        cf.frozen_class_features(PromptedTextEncoder(tiny_clip), CLASSES, path)


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected an object"),
    ('{"golden retriever": "a dog"}', "non-empty list of strings"),
])
def test_malformed_descriptions_file_is_a_clear_error(tiny_clip, tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(cf.DescriptionsError, match=match):
        cf.frozen_class_features(PromptedTextEncoder(tiny_clip), CLASSES, str(path))


def test_long_descriptions_are_truncated_not_fatal(tiny_clip, tmp_path):
    path = write_json(tmp_path / "d.json", {"golden retriever": ["word " * 100], "tabby cat": ["a cat."]})
    assert cf.frozen_class_features(PromptedTextEncoder(tiny_clip), CLASSES, path).shape == (2, 32)


class CountingEncodes:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = cf.encode_texts_per_class

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(cf, "encode_texts_per_class", counted)


def test_cache_is_reused_and_invalidated_by_any_input_change(tiny_clip, tmp_path, monkeypatch):
    counter = CountingEncodes(monkeypatch)
    store = cf.ClassFeatureStore(str(tmp_path / "cache"))
    encoder = PromptedTextEncoder(tiny_clip)
    path = write_json(tmp_path / "d.json", DESCRIPTIONS)

    first = cf.frozen_class_features(encoder, CLASSES, path, store=store)
    again = cf.frozen_class_features(encoder, CLASSES, path, store=cf.ClassFeatureStore(str(tmp_path / "cache")))
    assert counter.calls == 1 and torch.equal(first, again)

    cf.frozen_class_features(encoder, CLASSES[::-1], path, store=store)  # class names / order
    assert counter.calls == 2
    changed = dict(DESCRIPTIONS, **{"tabby cat": ["a different description."]})
    cf.frozen_class_features(encoder, CLASSES, write_json(tmp_path / "d.json", changed), store=store)
    assert counter.calls == 3
    other = PromptedTextEncoder(random_clip("tiny", seed=5))  # other backbone weights
    cf.frozen_class_features(other, CLASSES, path, store=store)
    assert counter.calls == 4
    cf.frozen_class_features(encoder, CLASSES, str(tmp_path / "none.json"), store=store)  # templates
    assert counter.calls == 5
    assert len(list((tmp_path / "cache" / "class_features").glob("*.pt"))) == 5


def test_large_class_sets_report_progress_and_chunking_changes_nothing(tiny_clip):
    """ImageNet-sized description sets take minutes on a CPU: every tenth of the chunks is
    reported; the chunk size does not change the features."""
    texts = [[f"a photo of a {c} {i}." for i in range(3)] for c in ("dog", "cat", "owl", "fox")]  # 12 texts
    encoder = PromptedTextEncoder(tiny_clip)
    lines = []
    chunked = cf.encode_texts_per_class(encoder, texts, chunk=1, progress=lines.append)
    assert lines[0] == "class text features: 2/12 texts of 4 classes encoded"
    assert len(lines) == 10 and lines[-1] == "class text features: 12/12 texts of 4 classes encoded"
    quiet = []
    whole = cf.encode_texts_per_class(encoder, texts, chunk=256, progress=quiet.append)
    assert quiet == []  # one chunk: nothing to report
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
