"""DCP (CMPA) on the shared prompted-CLIP loop."""
import re

import pytest
import torch

from conftest import requires_dassl
from helpers import (DCP_CLASSES, accuracies, build_dcp, dcp_command, half_and_fp32_logits, half_tolerance, images_for,
                     run, train_losses)

from vlprompt.methods.settings import ConfigError


def grads_after_one_step(model, images):
    loss, _, _ = model.loss(images, torch.arange(len(images)) % len(DCP_CLASSES))
    loss.backward()
    return {n: p.grad for n, p in model.prompt_learner.named_parameters()}


@pytest.mark.parametrize("fusing", ["per_image", "image_free", "mean"])
def test_text_update_on_every_cmpa_side_gets_a_gradient(tiny_clip, fusing):
    model = build_dcp(tiny_clip, fusing=fusing)
    grads = grads_after_one_step(model, images_for(tiny_clip))
    assert {n.split(".")[2] for n in grads if n.startswith("cmpa.")} == {"visual", "text"}
    assert [n for n, g in grads.items() if g is None or not g.abs().sum() > 0] == []


@pytest.mark.parametrize("fusing", ["per_image", "image_free", "mean"])
def test_text_update_off_leaves_the_text_side_without_gradient(tiny_clip, fusing):
    model = build_dcp(tiny_clip, fusing=fusing, text_update=False)
    grads = grads_after_one_step(model, images_for(tiny_clip))
    for name, grad in grads.items():
        if ".text." in name:
            assert grad is None, name
        else:
            assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("fusing", ["per_image", "image_free"])
def test_predictions_do_not_depend_on_the_batch(tiny_clip, fusing, monkeypatch):
    from vlprompt.methods import base
    model = build_dcp(tiny_clip, fusing=fusing).eval()
    images = images_for(tiny_clip, batch=7)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(images)
        pieces = torch.cat([model(images[i:i + 3]) for i in range(0, 7, 3)])
        shuffled = model(images[perm])
        with model.evaluation():  # image_free: the classes encoded once, then images alone
            cached = model(images)
        monkeypatch.setattr(base, "SEQUENCES_PER_PASS", 2 * len(DCP_CLASSES))  # per_image: 2 images a pass
        chunked = model(images)
    for other in (pieces, cached, chunked):
        torch.testing.assert_close(other, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shuffled, whole[perm], atol=1e-5, rtol=1e-5)


def test_per_image_exchange_gives_each_image_its_own_text(tiny_clip):
    """FUSING per_image (the paper's mutual exchange): image b's class features come from a text
    updated by image b alone: the same as running image b alone, and different between images."""
    model = build_dcp(tiny_clip, fusing="per_image").eval()
    images = images_for(tiny_clip, batch=3)
    with torch.no_grad():
        per_image, image = model.encode_per_image(images)
        alone = [model.encode_per_image(images[b:b + 1]) for b in range(3)]
    assert per_image.shape == (3, len(DCP_CLASSES), tiny_clip.text_projection.shape[1])
    for b, (text_b, image_b) in enumerate(alone):
        torch.testing.assert_close(per_image[b:b + 1], text_b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(image[b:b + 1], image_b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(per_image[0], per_image[1], atol=1e-4)  # the text saw its image
    assert not model.classes_cacheable


def test_release_fusing_shares_one_visual_update_across_the_batch(tiny_clip):
    """With FUSING mean (the release), a prediction depends on the other images of its batch."""
    model = build_dcp(tiny_clip, fusing="mean").eval()
    cmpa = model.prompt_learner.module_for(1)
    entering = []
    cmpa.visual.register_forward_hook(lambda module, inputs, output: entering.append(output))
    with torch.no_grad():
        images = images_for(tiny_clip, batch=6)
        batch_of_six = model(images)
        assert entering and all(v.shape[0] == 1 for v in entering)  # one update, given to every image
        assert not torch.allclose(batch_of_six[:2], model(images[:2]), atol=1e-4)


def test_prompt_sharing_changes_the_parameter_count(tiny_clip):
    shared = build_dcp(tiny_clip, ps=True, prompt_depth=2).prompt_learner
    per_layer = build_dcp(tiny_clip, ps=False, prompt_depth=2).prompt_learner
    contexts = shared.text_context.numel() + shared.visual_context.numel()
    module = sum(p.numel() for p in shared.cmpa.parameters())
    assert len(shared.cmpa) == 1 and len(per_layer.cmpa) == 2
    assert sum(p.numel() for p in shared.parameters()) == contexts + module
    assert sum(p.numel() for p in per_layer.parameters()) == contexts + 2 * module
    heads = per_layer.cmpa[0]
    assert (heads.visual.attn.num_heads, heads.text.attn.num_heads) == (2, 1)  # CLIP's: width // 64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precisions_agree_with_fp32(tiny_clip, dtype):
    got, expected, scale = half_and_fp32_logits(build_dcp, tiny_clip, dtype)
    assert (got - expected).abs().max() < half_tolerance(dtype, scale)
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.8


def test_a_few_steps_lower_the_loss(tiny_clip):
    model = build_dcp(tiny_clip)
    images, labels = images_for(tiny_clip, batch=8), torch.arange(8) % len(DCP_CLASSES)
    losses = train_losses(model, images, labels, steps=20, lr=3e-3)
    assert min(losses[-3:]) < 0.8 * losses[0]


def test_vit_l_shaped_backbone_with_more_vision_than_text_layers(tiny_l_clip):
    model = build_dcp(tiny_l_clip, prompt_depth=2, n_ctx=3)
    grads = grads_after_one_step(model, images_for(tiny_l_clip, batch=3))
    assert all(g is not None for g in grads.values())
    assert model.prompt_learner.cmpa[0].visual.attn.num_heads == 3  # 192 // 64


@pytest.mark.parametrize("overrides,key", [
    (dict(prompt_depth=0), "PROMPT_DEPTH"),
    (dict(prompt_depth=3), "PROMPT_DEPTH"),  # tiny CLIP: 3 layers, updates enter 1..2
    (dict(fusing="sum"), "FUSING"),
    (dict(ps="yes"), "PS"),
    (dict(text_update=1), "TEXT_UPDATE"),
    (dict(n_ctx=0), "N_CTX"),
])
def test_bad_settings_name_the_setting(tiny_clip, overrides, key):
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}=") as err:
        build_dcp(tiny_clip, **overrides)
    assert err.value.setting == key.lower()


# ---- with Dassl -----------------------------------------------------------------------------


@requires_dassl
def test_dcp_trains_checkpoints_and_evaluates_new_classes(workspace):
    out = workspace / "dcp_base"
    trained = run(dcp_command(workspace, out))
    assert "DCP: DCPSettings(" in trained.stdout and "fusing='per_image', text_update=True" in trained.stdout
    state = torch.load(out / "MultiModalPromptLearner" / "model.pth.tar-2", weights_only=True)
    assert {k.split(".")[0] for k in state["state_dict"]} == {"text_context", "visual_context", "cmpa"}
    results = [accuracies(run(dcp_command(workspace, workspace / f"dcp_new{i}", subsample="new",
                                          model_dir=out)).stdout) for i in range(2)]
    assert len(results[0]) == 1 and results[0] == results[1]


@requires_dassl
def test_release_trainer_name_and_config_keys_work(workspace):
    proc = run(dcp_command(workspace, workspace / "cmpa", trainer="CMPA",
                           config="configs/trainers/CMPA/vit_b16_c2_ep20_batch4_16ctx.yaml"))
    assert "CMPA: DCPSettings(" in proc.stdout and "fusing='mean', text_update=False" in proc.stdout
    assert "Finish training" in proc.stdout
