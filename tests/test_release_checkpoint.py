"""Loading checkpoints saved by the official HiCroPL release into our model."""
import pytest
import torch

from vlprompt.files import CheckpointError, read_checkpoint
from vlprompt.methods.hicropl import convert_release_state_dict, is_release_state_dict
from vlprompt.files import load_strict
from helpers import build_hicropl, images_for, release_state_dict


def test_release_names_map_onto_every_learned_tensor(tiny_clip):
    trained = build_hicropl(tiny_clip, seed=1)
    converted = convert_release_state_dict(release_state_dict(trained, tiny_clip))
    assert set(converted) == set(trained.prompt_learner.state_dict())
    fresh = build_hicropl(tiny_clip, seed=2)
    load_strict(fresh.prompt_learner, converted, "release checkpoint")
    for k, v in trained.prompt_learner.state_dict().items():
        torch.testing.assert_close(fresh.prompt_learner.state_dict()[k], v.half().float())


def test_pickled_release_checkpoint_needs_explicit_trust(tiny_clip, tmp_path):
    trained = build_hicropl(tiny_clip, seed=1)
    optimizer = torch.optim.Adam(trained.prompt_learner.parameters())
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 50.0)
    path = tmp_path / "VLPromptLearner" / "model-best.pth.tar"
    path.parent.mkdir()
    # the release's Dassl stores its warm-up scheduler, whose state holds a scheduler object
    torch.save({"state_dict": release_state_dict(trained, tiny_clip), "epoch": 50,
                "scheduler": {"successor": scheduler}, "val_result": 80.0}, path)
    with pytest.raises(CheckpointError, match="if you trust it, set MODEL.TRUST_RELEASE_CHECKPOINT True"):
        read_checkpoint(str(path), trust_key="MODEL.TRUST_RELEASE_CHECKPOINT")
    weights = read_checkpoint(str(path), trust_pickle=True)["state_dict"]
    assert is_release_state_dict(weights)
    state = convert_release_state_dict(weights)
    fresh = build_hicropl(tiny_clip, seed=3)
    load_strict(fresh.prompt_learner, state, str(path))
    trained.prompt_learner.load_state_dict({k: v.half().float() for k, v in trained.prompt_learner.state_dict().items()})
    images = images_for(trained, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(images), trained.eval()(images))


def test_mismatched_configuration_names_the_keys(tiny_clip):
    deeper = build_hicropl(tiny_clip, prompt_depth=3, cross_layer=2)
    converted = convert_release_state_dict(release_state_dict(deeper, tiny_clip))
    with pytest.raises(CheckpointError, match="missing keys.*visual_proxies.1"):
        load_strict(build_hicropl(tiny_clip, prompt_depth=3, cross_layer=1).prompt_learner, converted, "ckpt")


def test_unknown_release_key_is_refused():
    with pytest.raises(KeyError, match="prompt_learner.some_new_module"):
        convert_release_state_dict({"prompt_learner.some_new_module.weight": torch.zeros(1)})
