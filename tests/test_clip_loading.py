"""Backbones by name, from a local file, and the error when weights cannot be had."""
import urllib.error

import pytest
import torch
from clip import clip as clip_api

from vlprompt.clip import loading as cl


def test_offline_download_error_names_backbone_cache_path_and_config_key(tmp_path, monkeypatch):
    def offline(url, root):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(clip_api, "_download", offline)
    with pytest.raises(cl.BackboneUnavailable) as info:
        cl.load_clip("ViT-B/16", download_root=str(tmp_path))
    message = str(info.value)
    assert "'ViT-B/16'" in message
    assert str(tmp_path / "ViT-B-16.pt") in message
    assert "MODEL.BACKBONE.PATH" in message and "name resolution" in message


def test_unknown_backbone_name_lists_known_ones():
    with pytest.raises(cl.BackboneUnavailable, match="ViT-L/14"):
        cl.resolve_checkpoint("ViT-H/99")


def test_missing_local_file_is_named(tmp_path):
    with pytest.raises(cl.BackboneUnavailable, match="MODEL.BACKBONE.PATH=.*nope.pt"):
        cl.load_clip("ViT-B/16", path=str(tmp_path / "nope.pt"))


def test_state_dict_file_loads_the_same_weights(tmp_path):
    path = cl.save_random_clip(str(tmp_path / "tiny.pt"), "tiny", seed=3)
    model = cl.load_clip("ignored-when-path-is-set", path=path)
    reference = cl.random_clip("tiny", seed=3)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(not p.requires_grad for p in model.parameters())
    assert model.visual.conv1.weight.dtype == torch.float32


def test_wrapped_and_dataparallel_state_dicts_are_accepted(tmp_path):
    state = {"module." + k: v for k, v in cl.random_clip_state_dict("tiny").items()}
    torch.save({"state_dict": state}, tmp_path / "wrapped.pt")
    model = cl.load_clip("x", path=str(tmp_path / "wrapped.pt"))
    assert model.visual.input_resolution == 32


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_jit_archive_loads(tmp_path):
    model = cl.random_clip("tiny", seed=4)
    images, tokens = torch.randn(1, 3, 32, 32), clip_api.tokenize(["a dog"])
    traced = torch.jit.trace(model, (images, tokens), check_trace=False)
    traced.save(str(tmp_path / "tiny_jit.pt"))
    loaded = cl.load_clip("x", path=str(tmp_path / "tiny_jit.pt"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images))


def test_resnet_backbone_is_refused_with_a_reason():
    with pytest.raises(cl.BackboneUnavailable, match="ViT backbone"):
        cl.clip_from_state_dict({"visual.layer1.0.conv1.weight": torch.zeros(1)}, "RN50.pt")


def test_cast_clip_keeps_layernorm_and_embeddings_in_fp32():
    model = cl.cast_clip(cl.random_clip("tiny"), torch.bfloat16)
    assert model.visual.conv1.weight.dtype == torch.bfloat16
    assert model.transformer.resblocks[0].attn.in_proj_weight.dtype == torch.bfloat16
    assert model.text_projection.dtype == torch.bfloat16 and model.visual.proj.dtype == torch.bfloat16
    assert model.ln_final.weight.dtype == torch.float32
    assert model.token_embedding.weight.dtype == torch.float32


def test_real_backbone_shapes_build():
    """ViT-B/16 and ViT-L/14 shapes (random weights): widths, depths and resolution as released."""
    shapes = {}
    for arch in ("ViT-B/16", "ViT-L/14"):
        sd = cl.random_clip_state_dict(arch, device="meta")
        shapes[arch] = (sd["visual.conv1.weight"].shape[0], sd["ln_final.weight"].shape[0],
                        sum(k.endswith("attn.in_proj_weight") and k.startswith("visual") for k in sd))
    assert shapes == {"ViT-B/16": (768, 512, 12), "ViT-L/14": (1024, 768, 24)}
