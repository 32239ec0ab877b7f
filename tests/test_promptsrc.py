"""PromptSRC against the official release's numbers: frozen class features, every loss term,
gradients, Gaussian prompt aggregation (and its resume, which the release loses), checkpoints and
runs through the release's script names."""
import functools
import math
import signal
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import requires_dassl
from helpers import (EPS32, FP16_LOGIT_BOUND, KILL_AFTER_FIRST_EPOCH, LOGIT_TOL, accuracies, assert_batch_independent,
                     assert_ivlp_converted, assert_ivlp_release_checkpoint_evaluates_as_ours,
                     assert_ivlp_release_gradients, fixture_clip, fixture_inputs, fixture_settings, images_for,
                     ivlp_our_name, ivlp_release_layout_state, ivlp_state, ivlp_tiny_options, load_fixture, loss_tol,
                     method_command, run, run_script, script_env, train_losses, weighted_l1_tol)
from vlprompt.clip.class_features import ClassFeatureStore, frozen_class_features
from vlprompt.clip.encoders import PromptedTextEncoder
from vlprompt.clip.loading import backbone_shape
from vlprompt.clip.templates import IMAGENET_TEMPLATES
from vlprompt.files import load_strict
from vlprompt.methods.ivlp import convert_release_state_dict
from vlprompt.methods.promptsrc import PromptSRC, PromptSRCSettings, gpa_weights
from vlprompt.methods.registry import get_method
from vlprompt.methods.settings import ConfigError, checked

CASE = load_fixture("promptsrc")["cases"]["depth3"]
CLASSES = ["dog", "cat", "sports_car", "oak tree", "violin"]
TINY = dict(n_ctx_vision=2, n_ctx_text=2, prompt_depth_vision=3, prompt_depth_text=3)
TERMS = ("loss_ce", "L_SCL_logits", "loss_scl_text", "loss_scl_image")


def frozen_text_features(clip_model, classnames):
    """t_zs as the trainer computes it: the texts and averaging PromptSRC's descriptor asks for."""
    texts = get_method("PromptSRC").class_texts(None, "Caltech101")
    return frozen_class_features(PromptedTextEncoder(clip_model), classnames, templates=texts.templates,
                                 normalize_each=texts.normalize_each)


@functools.lru_cache(maxsize=None)
def fixture_frozen_text_features():
    return frozen_text_features(fixture_clip(), fixture_inputs("promptsrc")[0])


def release_model(rounded=False):
    classnames, _, _ = fixture_inputs("promptsrc")
    model = PromptSRC(fixture_clip(), fixture_settings(PromptSRCSettings, CASE), classnames,
                      fixture_frozen_text_features())
    load_strict(model.prompt_learner, ivlp_state(CASE, rounded), "depth3")
    if rounded:  # the release's zero-shot logits use fp16-rounded class features (trainers/promptsrc.py:205)
        fixed = model.frozen_text_features.half().float()
        model.zero_shot_logits = lambda image: model.logit_scale.exp() * image @ fixed.t()
    return model


@functools.lru_cache(maxsize=None)
def tiny_text_features(clip_model):
    return frozen_text_features(clip_model, CLASSES)


def tiny_model(clip_model, seed=0):
    torch.manual_seed(seed)
    return PromptSRC(clip_model, PromptSRCSettings(**TINY), CLASSES, tiny_text_features(clip_model))


def loss_terms(model):
    _, images, labels = fixture_inputs("promptsrc")
    with torch.no_grad(), model.eval().evaluation():
        logits = model(images)
    loss, train_logits, parts = model.train().loss(images, labels)
    return logits, loss, train_logits.detach(), parts


def assert_terms(parts, loss, logits, released):
    config = CASE["config"]
    weights = {"loss_scl_text": config["TEXT_LOSS_WEIGHT"], "loss_scl_image": config["IMAGE_LOSS_WEIGHT"]}
    for name in TERMS:
        expected = released["loss_terms"][name]
        tol = weighted_l1_tol(expected, weights[name]) if name in weights else loss_tol(expected, logits)
        assert abs(parts[name] - float(expected)) <= tol, name
    tol = 2 * loss_tol(loss.item(), logits) + sum(weighted_l1_tol(released["loss_terms"][n], w)
                                                  for n, w in weights.items())
    assert abs(loss.item() - float(released["loss"])) <= tol


# ---- against the release -----------------------------------------------------------------------
def test_frozen_class_features_are_the_mean_of_raw_template_features():
    classnames, _, _ = fixture_inputs("promptsrc")
    ours = fixture_frozen_text_features()
    released = CASE["results"]["no_casts"]["fixed_embeddings"]  # normalised mean of unnormalised features
    torch.testing.assert_close(ours, released, rtol=0, atol=8 * EPS32)  # |x| <= 1, a few ulps
    assert torch.equal(released, CASE["results"]["as_shipped"]["fixed_embeddings"])
    # the mean of normalised features (CLIP's zero-shot recipe, our store's default) is another
    # vector, 400 times farther (measured 3.9e-4)
    other = frozen_class_features(PromptedTextEncoder(fixture_clip()), classnames,
                                  templates=get_method("PromptSRC").class_texts(None, "").templates)
    assert float((other - released).abs().max()) > 100 * 8 * EPS32


def test_raw_mean_features_are_computed_and_cached_apart(tiny_clip, tmp_path):
    import clip
    encoder, templates = PromptedTextEncoder(tiny_clip), IMAGENET_TEMPLATES[:4]
    store = ClassFeatureStore(str(tmp_path))
    normalised = frozen_class_features(encoder, CLASSES, templates=templates, store=store)
    raw = frozen_class_features(encoder, CLASSES, templates=templates, store=store, normalize_each=False)
    with torch.no_grad():
        names = [name.replace("_", " ") for name in CLASSES]
        features = tiny_clip.encode_text(clip.tokenize([t.format(n) for n in names for t in templates]))
        expected = F.normalize(features.view(len(CLASSES), len(templates), -1).mean(dim=1), dim=-1)
    torch.testing.assert_close(raw, expected, rtol=0, atol=8 * EPS32)
    assert float((raw - normalised).abs().max()) > 100 * 8 * EPS32
    # a second store over the same folder reads each kind back, never one for the other
    again = ClassFeatureStore(str(tmp_path))
    assert torch.equal(frozen_class_features(encoder, CLASSES, templates=templates, store=again,
                                             normalize_each=False), raw)
    assert torch.equal(frozen_class_features(encoder, CLASSES, templates=templates, store=again), normalised)
    assert len(list((tmp_path / "class_features").iterdir())) == 2


def test_logits_and_every_loss_term_are_the_release_without_its_casts():
    model = release_model()
    logits, loss, train_logits, parts = loss_terms(model)
    released = CASE["results"]["no_casts"]
    torch.testing.assert_close(logits, released["eval_logits"], rtol=0, atol=LOGIT_TOL)
    torch.testing.assert_close(train_logits, released["train_logits"], rtol=0, atol=LOGIT_TOL)
    _, images, _ = fixture_inputs("promptsrc")
    frozen_image = model.frozen_image_features(images)
    torch.testing.assert_close(frozen_image, released["zero_shot_features"], rtol=0, atol=8 * EPS32)
    torch.testing.assert_close(model.zero_shot_logits(frozen_image), released["zero_shot_logits"], rtol=0,
                               atol=LOGIT_TOL)
    assert_terms(parts, loss, logits, released)


def test_as_shipped_differs_by_the_releases_fp16_rounding_only():
    shipped = CASE["results"]["as_shipped"]
    logits, _, _, _ = loss_terms(release_model())
    assert LOGIT_TOL < float((logits - shipped["eval_logits"]).abs().max()) <= FP16_LOGIT_BOUND
    logits, loss, _, parts = loss_terms(release_model(rounded=True))  # fed what the release rounds
    torch.testing.assert_close(logits, shipped["eval_logits"], rtol=0, atol=LOGIT_TOL)
    assert_terms(parts, loss, logits, shipped)


def test_gradients_reach_exactly_the_release_trainables():
    model = release_model()
    loss_terms(model)[1].backward()
    assert_ivlp_release_gradients(model, CASE)
    assert all(not p.requires_grad for p in fixture_clip().parameters())


# ---- Gaussian prompt aggregation ---------------------------------------------------------------
def set_epoch_state(model, state):
    load_strict(model.prompt_learner, {ivlp_our_name(k): v for k, v in state.items()}, "epoch state")


def test_gpa_weights_and_aggregate_are_the_releases():
    gpa = CASE["gpa"]
    model = release_model()
    assert gpa_weights(2, 1, 3) == gpa["weights"].tolist()  # the release's float64 arithmetic
    for epoch, state in enumerate(gpa["epoch_states"]):
        set_epoch_state(model, state)
        model.end_epoch(epoch, 3)
    aggregated = model.prompt_learner.state_dict()
    for key, expected in gpa["aggregated"].items():
        assert torch.equal(aggregated[ivlp_our_name(key)], expected), key  # trainable state only: exact


def test_gpa_survives_a_resume_which_the_release_loses(tmp_path):
    epochs = CASE["gpa"]["epoch_states"]
    straight, resumed = release_model(), release_model()
    for epoch, state in enumerate(epochs):
        set_epoch_state(straight, state)
        straight.end_epoch(epoch, 3)
    set_epoch_state(resumed, epochs[0])
    resumed.end_epoch(0, 3)
    torch.save(resumed.run_state(), tmp_path / "run_state.pt")  # as in resume.pth.tar
    restarted = release_model()  # a new process
    restarted.load_run_state(torch.load(tmp_path / "run_state.pt", weights_only=True))
    for epoch, state in enumerate(epochs[1:], start=1):
        set_epoch_state(restarted, state)
        restarted.end_epoch(epoch, 3)
    lost = release_model()  # as the release after a resume: no running sum of epoch 1
    for epoch in (1, 2):
        set_epoch_state(lost, epochs[epoch])
        if epoch == 2:
            with pytest.warns(UserWarning, match=r"GPA: epochs \[1\] are missing from the aggregate"):
                lost.end_epoch(epoch, 3)
        else:
            lost.end_epoch(epoch, 3)
    for name, value in straight.prompt_learner.state_dict().items():
        assert torch.equal(restarted.prompt_learner.state_dict()[name], value), name
    assert not torch.equal(lost.prompt_learner.text_prompts[0], straight.prompt_learner.text_prompts[0])


def test_gpa_weights_far_from_the_epochs_fall_on_the_nearest():
    # the release's density underflows to 0 for every epoch here and it divides by zero
    weights = gpa_weights(1000, 1, 20)
    assert weights == [0.0] * 19 + [1.0]
    assert math.isclose(sum(gpa_weights(30, 30, 50)), 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("value", [0, -1])
def test_gpa_std_must_be_positive(tiny_clip, value):
    with pytest.raises(ConfigError, match=f"^GPA_STD={value} is invalid"):
        checked(PromptSRCSettings(**TINY, gpa_std=value), backbone_shape(tiny_clip))


# ---- our model -------------------------------------------------------------------------------------
def test_needs_its_frozen_class_features(tiny_clip):
    with pytest.raises(ValueError, match="PromptSRC needs frozen CLIP's class text features"):
        PromptSRC(tiny_clip, PromptSRCSettings(**TINY), CLASSES)


def test_evaluation_does_not_depend_on_batch_size_or_order(tiny_clip):
    model = tiny_model(tiny_clip)
    assert_batch_independent(model, images_for(model, batch=7))


def test_a_short_training_run_lowers_the_loss(tiny_clip):
    model = tiny_model(tiny_clip)
    images = images_for(model, batch=10)
    losses = train_losses(model, images, torch.arange(10) % len(CLASSES), steps=15, eps=1e-3)
    assert losses[-1] < 0.75 * losses[0]  # measured 3.99 -> 2.26


@pytest.mark.parametrize("layout", ["checkpoint_fp32", "checkpoint_fp16"])
def test_release_checkpoint_layouts_convert_to_our_prompts(layout):
    """The release's keys: its whole CustomCLIP and a second frozen image tower (ZS_image_encoder)."""
    state = ivlp_release_layout_state(CASE, layout)
    assert any(key.startswith("prompt_learner.ZS_image_encoder.") for key in state)
    converted = convert_release_state_dict(state)
    assert_ivlp_converted(state, converted)
    load_strict(release_model().prompt_learner, converted, layout)


# ---- Dassl: the release's recipes and commands ---------------------------------------------------
@requires_dassl
def test_the_release_recipes_merge_into_our_config_node():
    from dassl.config import get_cfg_default
    from trainers.config import extend_cfg
    from vlprompt.clip.loading import architecture_shape
    from vlprompt.methods.settings import checked, from_values
    from conftest import ROOT
    expected = {"vit_b16_c2_ep20_batch4_4+4ctx": (9, 15, 1), "vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets": (3, 6, 10),
                "vit_b16_c2_ep50_batch4_4+4ctx_few_shot": (9, 30, 30)}
    for recipe, (depth, mean, std) in expected.items():
        cfg = extend_cfg(get_cfg_default())
        cfg.merge_from_file(f"{ROOT}/configs/trainers/PromptSRC/{recipe}.yaml")
        settings = checked(from_values(PromptSRCSettings, dict(cfg.TRAINER.PROMPTSRC)), architecture_shape("ViT-B/16"))
        assert settings == PromptSRCSettings(4, 4, "a photo of a", depth, depth, 25, 10, mean, std), recipe


@pytest.fixture(scope="module")
def promptsrc_run(workspace, tmp_path_factory):
    """The release's base-to-new commands (scripts/promptsrc/base2new_*.sh), tiny settings."""
    output = tmp_path_factory.mktemp("promptsrc_output")
    env = script_env(workspace, output)
    options = ivlp_tiny_options("PROMPTSRC") + ["TRAINER.PROMPTSRC.GPA_MEAN", "2"]
    trained = run_script(workspace, env, "promptsrc/base2new_train.sh", "caltech101", "1", options=options)
    tested = run_script(workspace, env, "promptsrc/base2new_test.sh", "caltech101", "1", options=options)
    run_dir = output / "base2new/train_base/caltech101/shots_16/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx/seed1"
    return options, trained, tested, run_dir


@requires_dassl
def test_release_scripts_train_aggregate_and_test(promptsrc_run):
    _, trained, tested, run_dir = promptsrc_run
    assert "GPA: the prompts are now the Gaussian-weighted sum over 2 epochs" in trained.stdout
    assert "loss_scl_text" in trained.stdout and "SUBSAMPLE_CLASSES: new" in tested.stdout
    assert 0 <= accuracies(tested.stdout)[-1] <= 100
    checkpoint = torch.load(run_dir / "VLPromptLearner" / "model.pth.tar-2", weights_only=True)
    assert len(checkpoint["state_dict"]) == 6  # the prompts only: no frozen tower, no second image tower


@requires_dassl
def test_release_checkpoint_evaluates_as_our_own(promptsrc_run, workspace, tmp_path):
    options, _, _, run_dir = promptsrc_run
    # its frozen image tower, saved under prompt_learner, is dropped
    assert_ivlp_release_checkpoint_evaluates_as_ours(workspace, "PromptSRC", "vit_b16_c2_ep20_batch4_4+4ctx", run_dir,
                                                tmp_path, options,
                                                {"prompt_learner.ZS_image_encoder.conv1.weight": torch.zeros(1)})


@requires_dassl
def test_a_killed_and_resumed_run_ends_with_the_same_aggregated_prompts(workspace, tmp_path):
    options = ivlp_tiny_options("PROMPTSRC", epochs=3) + ["TRAINER.PROMPTSRC.GPA_MEAN", "2"]
    straight = method_command(workspace, "PromptSRC", "vit_b16_c2_ep20_batch4_4+4ctx", tmp_path / "straight", options)
    resumed = method_command(workspace, "PromptSRC", "vit_b16_c2_ep20_batch4_4+4ctx", tmp_path / "resumed", options)
    run(straight)
    killed = run([sys.executable, "-c", KILL_AFTER_FIRST_EPOCH] + resumed[1:], expect_ok=False)
    assert killed.returncode == -signal.SIGKILL
    resume_file = tmp_path / "resumed" / "VLPromptLearner" / "resume.pth.tar"
    assert sorted(torch.load(resume_file, weights_only=True)["run_state"]["model"]) == ["gpa_epochs", "gpa_sum"]
    again = run(resumed)
    assert "after epoch 1" in again.stdout and "GPA: the prompts are now" in again.stdout
    last = "VLPromptLearner/model.pth.tar-3"
    a = torch.load(tmp_path / "straight" / last, weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "resumed" / last, weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
