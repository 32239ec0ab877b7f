"""Loading checkpoints saved by the official HiCroPL release into our model."""
import pytest
import torch

from vlprompt.methods.hicropl import convert_release_state_dict, load_release_checkpoint
from vlprompt.files import load_strict
from test_hicropl import build, images_for

# Our name -> the release's name (its CrossModalPromptLearner attributes), written out by hand.
MODULE_NAMES = {"text_to_image": "text2visual_net", "image_to_text": "visual2text_net",
                "text_proxies": "attn_pooling_text_nets", "visual_proxies": "attn_pooling_visual_nets"}
LAYER_NAMES = {"q_proj": "linear_q", "k_proj": "linear_k", "v_proj": "linear_v", "mlp": "ffn"}


def release_name(ours: str) -> str:
    parts = ours.split(".")
    if parts[0] == "text_prompts":
        return f"cross_prompts_text.{parts[1]}"
    if parts[0] == "visual_prompts":
        return f"cross_prompts_visual.{parts[1]}"
    if parts[0] in ("text_proxies", "visual_proxies") and parts[2] == "query":
        side = "text" if parts[0] == "text_proxies" else "visual"
        return f"{side}_proxy_token.{parts[1]}"
    return ".".join([MODULE_NAMES[parts[0]]] + [LAYER_NAMES.get(p, p) for p in parts[1:]])


def release_state_dict(model, clip_model):
    """What the release's `VLPromptLearner` state dict holds: learned state in fp16 under its
    names, the duplicated ctx, class-bound buffers and every frozen CLIP weight."""
    state = {f"prompt_learner.{release_name(k)}": v.half() for k, v in model.prompt_learner.state_dict().items()}
    state["prompt_learner.ctx"] = state["prompt_learner.cross_prompts_text.0"]
    state["prompt_learner.token_prefix"] = torch.zeros(5, 1, 64)
    state["prompt_learner.token_suffix"] = torch.zeros(5, 72, 64)
    for k, v in clip_model.visual.state_dict().items():
        state[f"image_encoder.{k}"] = v
        state[f"prompt_learner.ZS_image_encoder.{k}"] = v
    state["logit_scale"] = clip_model.logit_scale.detach()
    return state


def test_release_names_map_onto_every_learned_tensor(tiny_clip):
    trained = build(tiny_clip, seed=1)
    converted = convert_release_state_dict(release_state_dict(trained, tiny_clip))
    assert set(converted) == set(trained.prompt_learner.state_dict())
    fresh = build(tiny_clip, seed=2)
    load_strict(fresh.prompt_learner, converted, "release checkpoint")
    for k, v in trained.prompt_learner.state_dict().items():
        torch.testing.assert_close(fresh.prompt_learner.state_dict()[k], v.half().float())


def test_pickled_release_checkpoint_needs_explicit_trust(tiny_clip, tmp_path):
    trained = build(tiny_clip, seed=1)
    optimizer = torch.optim.Adam(trained.prompt_learner.parameters())
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 50.0)
    path = tmp_path / "VLPromptLearner" / "model-best.pth.tar"
    path.parent.mkdir()
    # the release's Dassl stores its warm-up scheduler, whose state holds a scheduler object
    torch.save({"state_dict": release_state_dict(trained, tiny_clip), "epoch": 50,
                "scheduler": {"successor": scheduler}, "val_result": 80.0}, path)
    with pytest.raises(RuntimeError, match="trust_pickle=True"):
        load_release_checkpoint(str(path))
    state = load_release_checkpoint(str(path), trust_pickle=True)
    fresh = build(tiny_clip, seed=3)
    load_strict(fresh.prompt_learner, state, str(path))
    trained.prompt_learner.load_state_dict({k: v.half().float() for k, v in trained.prompt_learner.state_dict().items()})
    images = images_for(trained, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(images), trained.eval()(images))


def test_mismatched_configuration_names_the_keys(tiny_clip):
    deeper = build(tiny_clip, prompt_depth=3, cross_layer=2)
    converted = convert_release_state_dict(release_state_dict(deeper, tiny_clip))
    with pytest.raises(ValueError, match="missing keys.*visual_proxies.1"):
        load_strict(build(tiny_clip, prompt_depth=3, cross_layer=1).prompt_learner, converted, "ckpt")


def test_unknown_release_key_is_refused():
    with pytest.raises(KeyError, match="prompt_learner.some_new_module"):
        convert_release_state_dict({"prompt_learner.some_new_module.weight": torch.zeros(1)})
