"""HiCroPL's model: flows, gradients, release mode, eval purity, precision, config errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import HICROPL_CLASSES, build_hicropl, half_tolerance, images_for, train_losses

from vlprompt.clip.class_features import frozen_class_features
from vlprompt.clip.encoders import PromptedTextEncoder
from vlprompt.clip.loading import cast_clip
from vlprompt.methods.common import normalize
from vlprompt.methods.hicropl import HiCroPLSettings
from vlprompt.methods.settings import ConfigError


def labels_for(batch, n_classes=len(HICROPL_CLASSES)):
    return torch.arange(batch) % n_classes


def test_learned_mode_every_trainable_module_gets_a_gradient(tiny_clip):
    model = build_hicropl(tiny_clip)
    images = images_for(model)
    loss, _, _ = model.loss(images, labels_for(len(images)))
    loss.backward()
    trainable = dict(model.prompt_learner.named_parameters())
    assert {n.split(".")[0] for n in trainable} == {
        "text_prompts", "visual_prompts", "text_proxies", "visual_proxies", "text_to_image", "image_to_text"}
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert all(not p.requires_grad for p in tiny_clip.parameters())


def test_layer_prompts_are_independent_tensors(tiny_clip):
    learner = build_hicropl(tiny_clip).prompt_learner
    pointers = {p.data_ptr() for p in learner.parameters()}
    assert len(pointers) == len(list(learner.parameters()))
    assert not torch.equal(learner.visual_prompts[0], learner.visual_prompts[1])


def test_flows_replace_the_right_layers(tiny_clip):
    model = build_hicropl(tiny_clip, prompt_depth=3, cross_layer=2)
    learner = model.prompt_learner
    text, visual = learner()
    k = 2
    mapped_v = learner.text_to_image_flow()
    mapped_t = learner.image_to_text_flow()
    for i in range(k):  # early layers: text kept, visual mapped from text proxies
        assert text[i] is learner.text_prompts[i]
        torch.testing.assert_close(visual[i], mapped_v[i])
    for i in range(k, 3):  # late layers: visual kept, text mapped from visual proxies
        assert visual[i] is learner.visual_prompts[i]
        torch.testing.assert_close(text[i], mapped_t[i - k])


def test_mapper_fuses_every_layer_of_its_group(tiny_clip):
    """Hierarchical mapping: changing the text prompt of layer 0 changes the mapped visual
    prompts of all early layers, not only layer 0."""
    model = build_hicropl(tiny_clip, prompt_depth=3, cross_layer=2)
    learner = model.prompt_learner
    before = learner.text_to_image_flow().detach().clone()
    with torch.no_grad():
        learner.text_prompts[0].add_(torch.randn_like(learner.text_prompts[0]))
    after = learner.text_to_image_flow().detach()
    assert all((after[i] - before[i]).abs().max() > 1e-4 for i in range(2))


def test_release_mode_writes_mapper_output_in_place_without_gradient(tiny_clip):
    model = build_hicropl(tiny_clip, prompt_depth=3, cross_layer=1, mapper_mode="release")
    learner = model.prompt_learner
    with torch.no_grad():
        expected_v = learner.text_to_image_flow().clone()
        expected_t = learner.image_to_text_flow().clone()
    images = images_for(model)
    loss, _, _ = model.loss(images, labels_for(len(images)))
    torch.testing.assert_close(learner.visual_prompts[0].detach(), expected_v[0])
    for j in range(2):
        torch.testing.assert_close(learner.text_prompts[1 + j].detach(), expected_t[j])
    loss.backward()
    for name, p in learner.named_parameters():
        if name.startswith(("text_proxies", "visual_proxies", "text_to_image", "image_to_text")):
            assert p.grad is None, name
        else:  # the prompts themselves are used by the encoders
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_release_mode_prompts_drift_at_every_forward(tiny_clip):
    """The release rewrites prompts at each forward, eval included; learned mode never does."""
    release = build_hicropl(tiny_clip, mapper_mode="release").eval()
    learned = build_hicropl(tiny_clip).eval()
    images = images_for(release, batch=2)
    with torch.no_grad():
        assert not torch.equal(release(images), release(images))
        assert torch.equal(learned(images), learned(images))


def test_eval_logits_do_not_depend_on_batch_size_or_order(tiny_clip):
    model = build_hicropl(tiny_clip).eval()
    images = images_for(model, batch=7)
    with torch.no_grad(), model.evaluation():
        whole = model(images)
        in_pieces = torch.cat([model(images[i:i + 2]) for i in range(0, 7, 2)])
        perm = torch.randperm(7, generator=torch.Generator().manual_seed(3))
        shuffled = model(images[perm])
    torch.testing.assert_close(in_pieces, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shuffled, whole[perm], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(images), whole, atol=1e-5, rtol=1e-5)  # cache == no cache


def test_loss_is_ce_plus_lambda_times_distillation(tiny_clip):
    model = build_hicropl(tiny_clip, lambd=3.5)
    images = images_for(model)
    labels = labels_for(len(images))
    torch.manual_seed(0)
    loss, logits, parts = model.loss(images, labels)
    with torch.no_grad():
        text_prompts, visual_prompts = model.prompt_learner()
        t_fix = model.frozen_text_features
        i_zs = normalize(tiny_clip.encode_image(images).float())
        t = normalize(normalize(model.text_encoder(model.token_ids, text_prompts)) + t_fix)
        i = normalize(normalize(model.image_encoder(images, visual_prompts)) + i_zs)
        ref_logits = tiny_clip.logit_scale.exp() * i @ t.t()
        ref = F.cross_entropy(ref_logits, labels) + 3.5 * ((1 - (t * t_fix).sum(-1).mean()) + (1 - (i * i_zs).sum(-1).mean()))
    torch.testing.assert_close(logits.detach(), ref_logits, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(loss.detach(), ref, atol=1e-5, rtol=1e-5)
    assert float(parts["loss_ce"]) == pytest.approx(F.cross_entropy(ref_logits, labels).item(), abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_agree_with_fp32(tiny_clip, dtype):
    reference = build_hicropl(tiny_clip).eval()
    half_clip = cast_clip(copy.deepcopy(tiny_clip), dtype)
    half = build_hicropl(half_clip)
    half.prompt_learner.load_state_dict(reference.prompt_learner.state_dict())
    half.frozen_text_features.copy_(reference.frozen_text_features)
    images = images_for(reference)
    with torch.no_grad():
        expected, got = reference(images), half.eval()(images)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < half_tolerance(dtype, reference.logit_scale.exp().item())
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.8


def test_a_few_steps_lower_the_loss(tiny_clip):
    model = build_hicropl(tiny_clip)
    images = images_for(model, batch=10)
    losses = train_losses(model, images, labels_for(10), steps=15, eps=1e-3)
    assert losses[-1] < 0.7 * losses[0]


def test_vit_l_shaped_model_trains(tiny_l_clip):
    """Other widths (128 text / 192 vision), more vision than text layers, patch 14."""
    model = build_hicropl(tiny_l_clip, n_ctx=3, prompt_depth=3, cross_layer=2)
    assert model.text_encoder.width == 128 and model.image_encoder.width == 192
    images = images_for(model, batch=10)
    losses = train_losses(model, images, labels_for(10), steps=12, eps=1e-3)
    assert losses[-1] < 0.8 * losses[0]


def test_ctx_init_seeds_the_first_text_prompt(tiny_clip):
    import clip
    model = build_hicropl(tiny_clip, n_ctx=2, ctx_init="a photo of a")
    words = tiny_clip.token_embedding(clip.tokenize("a photo of a"))[0, 1:3]
    torch.testing.assert_close(model.prompt_learner.text_prompts[0].detach(), words.detach())
    assert model.prompt_prefix == "a photo of a"  # "of a" stays as fixed tokens, as in the release
    too_short = build_hicropl(tiny_clip, n_ctx=8, ctx_init="a photo of a")
    assert too_short.prompt_prefix == " ".join(["X"] * 8)


def test_set_classes_retargets_a_trained_model(tiny_clip):
    model = build_hicropl(tiny_clip)
    new = ["tulip", "yacht", "walrus"]
    model.set_classes(new, frozen_class_features(PromptedTextEncoder(tiny_clip), new))
    with torch.no_grad():
        assert model.eval()(images_for(model, batch=2)).shape == (2, 3)
    assert "token_ids" not in model.prompt_learner.state_dict()


@pytest.mark.parametrize("overrides,key", [
    (dict(cross_layer=0), "CROSS_LAYER"),
    (dict(cross_layer=3, prompt_depth=3), "CROSS_LAYER"),
    (dict(prompt_depth=4), "PROMPT_DEPTH"),  # tiny CLIP has 3 layers
    (dict(prompt_depth=1, cross_layer=1), "PROMPT_DEPTH"),
    (dict(n_ctx=0), "N_CTX"),
    (dict(n_ctx=80), "N_CTX"),
    (dict(n_heads=7), "N_HEADS"),
    (dict(mapper_mode="inplace"), "MAPPER_MODE"),
    (dict(lambd=-1.0), "LAMBD"),
    (dict(lambd=float("nan")), "LAMBD"),
    (dict(n_ctx="16"), "N_CTX"),
    (dict(prompt_depth=2.5), "PROMPT_DEPTH"),
    (dict(ctx_init=" ".join(["word"] * 90)), "CTX_INIT"),
])
def test_bad_config_values_give_a_clear_error(tiny_clip, overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}=") as err:
        build_hicropl(tiny_clip, **overrides)
    assert err.value.setting == key.lower()


def test_class_prompt_too_long_for_context_is_a_clear_error(tiny_clip):
    with pytest.raises(ConfigError, match="N_CTX"):
        build_hicropl(tiny_clip, classes=["word " * 70], n_ctx=6)


def test_fast_and_release_style_paths_give_the_same_logits_and_loss(tiny_clip):
    """Shortcuts, fused attention, one frozen encoder and the eval cache change cost, not results."""
    from vlprompt.methods.hicropl_reference import ReleaseStyleHiCroPL
    fast = build_hicropl(tiny_clip)
    fixed = fast.frozen_text_features
    reference = ReleaseStyleHiCroPL(tiny_clip, HiCroPLSettings(n_ctx=4, ctx_init="", prompt_depth=3, cross_layer=1), HICROPL_CLASSES, fixed)
    reference.prompt_learner.load_state_dict(fast.prompt_learner.state_dict())
    images, labels = images_for(fast), labels_for(6)
    loss_fast, logits_fast, _ = fast.loss(images, labels)
    loss_ref, logits_ref, _ = reference.loss(images, labels)
    torch.testing.assert_close(logits_fast, logits_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_fast, loss_ref, atol=1e-6, rtol=1e-6)
    with torch.no_grad(), fast.eval().evaluation(), reference.eval().evaluation():
        torch.testing.assert_close(fast(images), reference(images), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in reference.teacher.parameters()) > 0  # the release's second tower
