"""CoCoOp: the release's numbers on known weights, per-image class features, batch independence,
the exact shortcuts, training, checkpoints, and the release's trainer name, config and scripts."""
import copy
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, requires_dassl
from helpers import (FEATURE_TOL, accuracies, check_coop_against_release, coop_model_for_case, forward_and_backward,
                     half_and_fp32_logits, half_tolerance, images_for, load_fixture, method_command, run, script_env,
                     tiny_options, train_losses, write_release_checkpoint)

from vlprompt.methods import base
from vlprompt.methods.cocoop import CoCoOp, CoCoOpSettings
from vlprompt.methods.coop import convert_release_state_dict, is_release_state_dict

CASES = list(load_fixture("cocoop")["cases"])
CLASSES = ["dog", "sports_car", "oak tree", "violin", "golden retriever"]


def build(clip_model, classes=CLASSES, seed=0, **settings):
    torch.manual_seed(seed)
    model = CoCoOp(clip_model, CoCoOpSettings(**{"n_ctx": 4, **settings}), classes)
    with torch.no_grad():  # meta_net's default init shifts little: make the per-image shift matter
        model.prompt_learner.meta_net.linear2.weight.mul_(20)
    return model


# ---- the release's numbers -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_logits_loss_and_gradients_equal_the_release(release_clip, name):
    """vit_b16_c4_ep10_batch1_ctxv1 (the base-to-new recipe) and c16 (random), with the release's
    state loaded through the checkpoint converter; both fixture modes (identical: CoCoOp casts
    nothing to fp16). Gradients reach exactly the tensors the release trains."""
    model, fixture, case = coop_model_for_case("cocoop", name, release_clip)
    assert torch.equal(model.token_ids, case["tokenized_prompts"]) and model.n_ctx == case["n_ctx"]
    grads = check_coop_against_release(model, fixture, case)
    release_grads = case["results"]["no_casts"]["grads"]
    assert set(grads) == set(release_grads["nonzero"]) == {
        "ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight", "meta_net.linear2.bias"}
    assert release_grads["none"] == release_grads["zero"] == []
    assert {f"prompt_learner.{n}" for n in grads} == set(case["trainable_requires_grad_names"])
    assert all(p.grad is None for p in release_clip.parameters())
    with torch.no_grad():
        image = model.frozen_image_features(fixture["inputs"]["images"])
    torch.testing.assert_close(image, case["results"]["no_casts"]["image_features"], rtol=0, atol=FEATURE_TOL)


def test_meta_net_is_the_releases(release_clip):
    """512 -> 32 -> 512 (Linear, ReLU, Linear) under the release's names; the CTX_INIT rule as CoOp's."""
    case = load_fixture("cocoop")["cases"]["ctx_init"]
    model = CoCoOp(release_clip, CoCoOpSettings(n_ctx=16, ctx_init="a photo of a"),
                   load_fixture("cocoop")["inputs"]["classnames"])
    shapes = {k: list(v.shape) for k, v in model.prompt_learner.state_dict().items()}
    assert shapes == {k: v["shape"] for k, v in case["trainable_spec"].items()}
    assert isinstance(model.prompt_learner.meta_net.relu, torch.nn.ReLU)
    assert torch.equal(model.prompt_learner.ctx.detach(), case["initial_state"]["ctx"])


# ---- per-image class features ---------------------------------------------------------------------------
def test_each_image_is_scored_with_its_own_context(tiny_clip):
    """logits[b] = scale * cos(f_b, text features of ctx + meta_net(f_b)), one image at a time,
    through the plain text encoder."""
    model = build(tiny_clip).eval()
    images = images_for(model, batch=3)
    with torch.no_grad():
        logits = model(images)
        for b in range(3):
            feature = model.frozen_image_features(images[b:b + 1])
            context = model.prompt_learner.ctx + model.prompt_learner.meta_net(feature)
            text = model.text_encoder(model.token_ids, [context])
            expected = model.logit_scale.exp() * F.normalize(feature, dim=-1) @ F.normalize(text, dim=-1).t()
            torch.testing.assert_close(logits[b:b + 1], expected, atol=1e-5, rtol=1e-5)
        contexts = model.prompt_learner(model.frozen_image_features(images))
    assert (contexts[0] - contexts[1]).abs().max() > 1e-3  # the shift differs per image


def test_eval_logits_do_not_depend_on_batch_size_order_or_chunking(tiny_clip, monkeypatch):
    model = build(tiny_clip).eval()
    images = images_for(model, batch=7)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), model.evaluation():
        whole = model(images)
        pieces = torch.cat([model(images[i:i + 3]) for i in range(0, 7, 3)])
        shuffled = model(images[perm])
        monkeypatch.setattr(base, "SEQUENCES_PER_PASS", 2 * len(CLASSES))  # 2 images per pass
        chunked = model(images)
    # fp32 rounding of matrix products of other sizes (the release: 1.5e-6, fixtures/releases)
    for other in (pieces, chunked):
        torch.testing.assert_close(other, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shuffled, whole[perm], atol=1e-5, rtol=1e-5)


def test_shared_prefix_shortcut_gives_the_releases_computation(tiny_clip):
    """[SOS, context] computed once per image for all its classes, and the batch cut at the last
    EOT, against whole 77-token sequences per image and class (the release's computation):
    logits and gradients agree to fp32 rounding."""
    fast = build(tiny_clip)
    full = copy.deepcopy(fast)
    full.text_encoder.shared_prefix = full.text_encoder.cut_at_eot = False
    fixture = {"inputs": {"images": images_for(fast, batch=4), "labels": torch.tensor([0, 3, 4, 1])}}
    results = [forward_and_backward(model, fixture) for model in (fast, full)]
    for a, b in zip(results[0][:3], results[1][:3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for name, grad in results[0][3].items():
        torch.testing.assert_close(grad, results[1][3][name], atol=1e-6, rtol=1e-4, msg=name)


def test_a_few_steps_lower_the_loss(tiny_clip):
    model = build(tiny_clip)
    images, labels = images_for(model, batch=3), torch.arange(3)
    losses = train_losses(model, images, labels, steps=15, lr=0.02)
    assert min(losses[-3:]) < 0.8 * losses[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_agree_with_fp32(tiny_clip, dtype):
    got, expected, scale = half_and_fp32_logits(build, tiny_clip, dtype)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < half_tolerance(dtype, scale)


def test_set_classes_retargets_a_trained_model(tiny_clip):
    model = build(tiny_clip)
    model.set_classes(["tulip", "yacht"])
    with torch.no_grad():
        assert model.eval()(images_for(model, batch=3)).shape == (3, 2)
    assert set(model.prompt_learner.state_dict()) == {
        "ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight", "meta_net.linear2.bias"}


def test_release_state_dicts_are_recognised_and_converted(tiny_clip):
    """An fp16 run's checkpoint: everything fp16 (the release halves meta_net), token buffers included."""
    trained = build(tiny_clip, seed=1)
    release = {k: v.half() for k, v in trained.prompt_learner.state_dict().items()}
    release.update(token_prefix=torch.zeros(5, 1, 64, dtype=torch.half), token_suffix=torch.zeros(5, 72, 64))
    assert is_release_state_dict(release) and not is_release_state_dict(trained.prompt_learner.state_dict())
    converted = convert_release_state_dict(release)
    fresh = build(tiny_clip, seed=2)
    fresh.prompt_learner.load_state_dict(converted)
    for key, value in trained.prompt_learner.state_dict().items():
        assert converted[key].dtype == torch.float32 and torch.equal(converted[key], value.half().float())


# ---- with Dassl ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base2new(workspace, tmp_path_factory):
    """`bash scripts/cocoop/base2new_train.sh caltech101 1` then base2new_test.sh (the release's
    script names), 1 epoch of the release's base-to-new recipe on the tiny data and CLIP."""
    tmp = tmp_path_factory.mktemp("cocoop")
    env = script_env(workspace, tmp / "output")
    options = tiny_options(workspace, "COCOOP", "OPTIM.MAX_EPOCH", "1")
    outputs = []
    for script in ("base2new_train.sh", "base2new_test.sh"):
        proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "cocoop", script), "caltech101", "1", *options],
                              cwd=str(tmp), env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        outputs.append(proc.stdout)
    run_dir = tmp / "output/base2new/train_base/caltech101/shots_16/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1/seed1"
    return run_dir, outputs[0], outputs[1], options


@requires_dassl
def test_base_to_new_trains_checkpoints_in_the_release_folder_and_tests(base2new):
    run_dir, trained, tested, _ = base2new
    assert "CoCoOp: CoCoOpSettings(n_ctx=4, ctx_init='a photo of a')" in trained and "Finish training" in trained
    assert sorted(p.name for p in (run_dir / "prompt_learner").iterdir()) == ["checkpoint", "model.pth.tar-1"]
    state = torch.load(run_dir / "prompt_learner" / "model.pth.tar-1", weights_only=True)["state_dict"]
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "ctx": (4, 64), "meta_net.linear1.weight": (2, 32), "meta_net.linear1.bias": (2,),
        "meta_net.linear2.weight": (64, 2), "meta_net.linear2.bias": (64,)}  # tiny CLIP: 32 -> 2 -> 64
    assert "SUBSAMPLE_CLASSES: new" in tested and len(accuracies(tested)) == 1


@requires_dassl
def test_release_checkpoint_evaluates_as_our_own(base2new, workspace, tmp_path):
    run_dir, _, _, options = base2new
    ours = torch.load(run_dir / "prompt_learner" / "model.pth.tar-1", weights_only=True)["state_dict"]
    release = {**ours, "token_prefix": torch.zeros(3, 1, 64), "token_suffix": torch.zeros(3, 72, 64)}
    write_release_checkpoint(tmp_path / "release" / "prompt_learner" / "model.pth.tar-1", release, 1)
    new = ["DATASET.SUBSAMPLE_CLASSES", "new", *options]

    def evaluate(model_dir, out, *extra):
        return run(method_command(workspace, "CoCoOp", "vit_b16_c4_ep10_batch1_ctxv1", tmp_path / out, [*new, *extra],
                                  ["--model-dir", str(model_dir), "--load-epoch", "1", "--eval-only"]))

    converted = evaluate(tmp_path / "release", "converted", "MODEL.TRUST_RELEASE_CHECKPOINT", "True")
    assert "is a checkpoint of the official release" in converted.stdout
    direct = evaluate(run_dir, "direct")
    assert accuracies(converted.stdout) == accuracies(direct.stdout) and len(accuracies(direct.stdout)) == 1
