"""IVLP (and its language-only variant) against the official release's numbers, its CTX_INIT rule,
depth limits, checkpoints, and runs through the release's script names."""
import math

import pytest
import torch

from conftest import requires_dassl
from helpers import (FP16_LOGIT_BOUND, LOGIT_TOL, accuracies, assert_batch_independent, assert_ivlp_converted,
                     assert_ivlp_release_checkpoint_evaluates_as_ours, assert_ivlp_release_gradients, fixture_clip,
                     fixture_inputs, fixture_settings, images_for, ivlp_release_layout_state, ivlp_state,
                     ivlp_tiny_options, load_fixture, loss_tol, run_script, script_env, train_losses)
from vlprompt.files import load_strict
from vlprompt.methods.ivlp import IVLP, IVLPSettings, convert_release_state_dict, is_release_state_dict
from vlprompt.methods.settings import ConfigError

CASES = list(load_fixture("ivlp")["cases"])  # vl_depth3, vl_depth3_random, language_only
TINY = dict(n_ctx_vision=2, n_ctx_text=2, prompt_depth_vision=3, prompt_depth_text=3)
CLASSES = ["dog", "cat", "sports_car", "oak tree", "violin"]


def release_model(name, rounded=False):
    """Our IVLP on the fixtures' CLIP with the release's trainable state of case `name`."""
    case = load_fixture("ivlp")["cases"][name]
    classnames, _, _ = fixture_inputs("ivlp")
    model = IVLP(fixture_clip(), fixture_settings(IVLPSettings, case, max_depth=3), classnames)
    load_strict(model.prompt_learner, ivlp_state(case, rounded), name)
    return model, case


def logits_and_loss(model):
    _, images, labels = fixture_inputs("ivlp")
    with torch.no_grad(), model.eval().evaluation():
        logits = model(images)
    loss, train_logits, _ = model.train().loss(images, labels)
    return logits, loss, train_logits.detach()


@pytest.mark.parametrize("name", CASES)
def test_logits_and_loss_are_the_release_without_its_casts(name):
    model, case = release_model(name)
    assert model.token_ids.equal(case["tokenized_prompts"]) and model.prompt_prefix == case["prompt_prefix"]
    logits, loss, train_logits = logits_and_loss(model)
    released = case["results"]["no_casts"]
    torch.testing.assert_close(logits, released["eval_logits"], rtol=0, atol=LOGIT_TOL)
    torch.testing.assert_close(train_logits, released["train_logits"], rtol=0, atol=LOGIT_TOL)
    assert abs(loss.item() - float(released["loss"])) <= loss_tol(released["loss"], logits)


@pytest.mark.parametrize("name", CASES)
def test_as_shipped_differs_by_the_releases_fp16_rounding_only(name):
    model, case = release_model(name)
    shipped = case["results"]["as_shipped"]
    logits, _, _ = logits_and_loss(model)
    difference = float((logits - shipped["eval_logits"]).abs().max())
    assert LOGIT_TOL < difference <= FP16_LOGIT_BOUND  # visible, and within what the rounding can do
    rounded, _ = release_model(name, rounded=True)  # our model fed the prompts the release rounds
    logits, loss, _ = logits_and_loss(rounded)
    torch.testing.assert_close(logits, shipped["eval_logits"], rtol=0, atol=LOGIT_TOL)
    assert abs(loss.item() - float(shipped["loss"])) <= loss_tol(shipped["loss"], logits)


@pytest.mark.parametrize("name", CASES)
def test_gradients_reach_exactly_the_release_trainables(name):
    model, case = release_model(name)
    _, loss, _ = logits_and_loss(model)
    loss.backward()
    assert_ivlp_release_gradients(model, case)


def test_ctx_init_seeds_the_first_text_prompt_only_up_to_four_tokens():
    case = load_fixture("ivlp")["cases"]["vl_depth3"]
    classnames, _, _ = fixture_inputs("ivlp")
    model = IVLP(fixture_clip(), fixture_settings(IVLPSettings, case, max_depth=3), classnames)
    assert torch.equal(model.prompt_learner.text_prompts[0].detach(), case["initial_state"]["prompt_learner.ctx"])
    assert model.prompt_prefix == "a photo of a"  # "of a" stay fixed tokens after the 2 learned ones
    # N_CTX_TEXT > 4: random, whatever CTX_INIT says (the release's rule, not the base's)
    long = IVLP(fixture_clip(), IVLPSettings(n_ctx_text=5, ctx_init="a photo of a big red", prompt_depth_text=3,
                                             prompt_depth_vision=3), classnames)
    assert long.prompt_prefix == "X X X X X"


def test_ctx_init_shorter_than_the_context_is_refused(tiny_clip):
    # the release would learn EOT and padding embeddings and overwrite the class name
    with pytest.raises(ConfigError, match=r"^CTX_INIT='a photo' is invalid: has 2 token\(s\), fewer than N_CTX_TEXT=4"):
        IVLP(tiny_clip, IVLPSettings(**{**TINY, "n_ctx_text": 4, "ctx_init": "a photo"}), CLASSES)


@pytest.mark.parametrize("key,value", [("prompt_depth_text", 4), ("prompt_depth_vision", 4),
                                       ("prompt_depth_text", 0), ("n_ctx_text", 0), ("n_ctx_vision", -1)])
def test_depths_beyond_the_tower_and_bad_counts_are_config_errors(tiny_clip, key, value):
    # the release silently caps a depth beyond the layers; we say so (tiny CLIP: 3 layers)
    with pytest.raises(ConfigError, match=f"^{key.upper()}={value} is invalid"):
        IVLP(tiny_clip, IVLPSettings(**{**TINY, key: value}), CLASSES)


@pytest.mark.parametrize("n_ctx_vision,depth_vision", [(0, 0), (2, 0), (0, 3)])
def test_language_only_has_no_visual_prompt_and_uses_frozen_image_features(tiny_clip, n_ctx_vision, depth_vision):
    settings = IVLPSettings(n_ctx_vision=n_ctx_vision, prompt_depth_vision=depth_vision, n_ctx_text=4,
                            prompt_depth_text=3)
    model = IVLP(tiny_clip, settings, CLASSES).eval()
    assert [name for name, _ in model.prompt_learner.named_parameters()] == [
        "text_prompts.0", "text_prompts.1", "text_prompts.2"]
    assert model.uses_frozen_image_features  # the trainer may cache frozen features of eval images
    images = images_for(model, batch=3)
    with torch.no_grad():
        frozen = model.frozen_image_features(images)
        torch.testing.assert_close(frozen, torch.nn.functional.normalize(tiny_clip.encode_image(images), dim=-1))
        text = model.encode_classes()
        torch.testing.assert_close(model(images, frozen_image_features=frozen), model.logits(frozen, text))
        torch.testing.assert_close(model(images), model.logits(frozen, text))


@pytest.mark.parametrize("language_only", [False, True])
def test_evaluation_does_not_depend_on_batch_size_or_order(tiny_clip, language_only):
    settings = IVLPSettings(**{**TINY, "n_ctx_vision": 0 if language_only else 2})
    torch.manual_seed(0)
    model = IVLP(tiny_clip, settings, CLASSES)
    assert_batch_independent(model, images_for(model, batch=7))


def test_a_short_training_run_lowers_the_loss(tiny_clip):
    torch.manual_seed(0)
    model = IVLP(tiny_clip, IVLPSettings(**TINY), CLASSES)
    images = images_for(model, batch=10)
    losses = train_losses(model, images, torch.arange(10) % len(CLASSES), steps=15, eps=1e-3)
    # measured 2.02 -> 1.43: a few prompt tokens on a random tiny CLIP learn slowly, but past chance
    assert losses[-1] < 0.85 * losses[0] and losses[-1] < math.log(len(CLASSES))
    assert all(not p.requires_grad for p in tiny_clip.parameters())


# ---- the release's checkpoints -------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("layout", ["checkpoint_fp32", "checkpoint_fp16"])
def test_release_checkpoint_layouts_convert_to_our_prompts(name, layout):
    """Every key the release writes (whole CustomCLIP: frozen CLIP, token buffers, logit scale):
    prompts converted, the rest dropped; fp16 entries come back widened."""
    state = ivlp_release_layout_state(load_fixture("ivlp")["cases"][name], layout)
    assert is_release_state_dict(state) and is_release_state_dict({f"module.{k}": v for k, v in state.items()})
    converted = convert_release_state_dict(state)
    assert_ivlp_converted(state, converted)
    model, _ = release_model(name)
    load_strict(model.prompt_learner, converted, layout)


def test_another_methods_release_checkpoint_is_refused():
    maple = {"prompt_learner.ctx": torch.zeros(2, 512), "prompt_learner.proj.weight": torch.zeros(768, 512)}
    with pytest.raises(KeyError, match="prompt_learner.proj.weight .*not one of IVLP or PromptSRC"):
        convert_release_state_dict(maple)


# ---- Dassl: the release's recipes and commands ---------------------------------------------------
@requires_dassl
def test_the_release_recipes_merge_into_our_config_node():
    from dassl.config import get_cfg_default
    from trainers.config import extend_cfg
    from vlprompt.clip.loading import architecture_shape
    from vlprompt.methods.settings import checked, from_values
    from conftest import ROOT
    expected = {"vit_b16_c2_ep5_batch4_2+2ctx": (2, 2, 12, 12),
                "vit_b16_c2_ep5_batch4_4ctx_language_only": (0, 4, 0, 12),
                "vit_b16_c2_ep20_batch4_4+4ctx": (4, 4, 9, 9)}
    for recipe, (n_vision, n_text, depth_vision, depth_text) in expected.items():
        cfg = extend_cfg(get_cfg_default())
        cfg.merge_from_file(f"{ROOT}/configs/trainers/IVLP/{recipe}.yaml")
        settings = checked(from_values(IVLPSettings, dict(cfg.TRAINER.IVLP)), architecture_shape("ViT-B/16"))
        assert settings == IVLPSettings(n_vision, n_text, "a photo of a", depth_vision, depth_text), recipe
        assert cfg.TRAINER.IVLP.PREC == "fp16"


@pytest.fixture(scope="module")
def ivlp_run(workspace, tmp_path_factory):
    """The release's base-to-new commands (scripts/independent-vlp/*_ivlp.sh), tiny settings."""
    output = tmp_path_factory.mktemp("ivlp_output")
    env = script_env(workspace, output)
    options = ivlp_tiny_options("IVLP")
    trained = run_script(workspace, env, "independent-vlp/base2new_train_ivlp.sh", "caltech101", "1", options=options)
    tested = run_script(workspace, env, "independent-vlp/base2new_test_ivlp.sh", "caltech101", "1", options=options)
    run_dir = output / "base2new/train_base/caltech101/shots_16/IVLP/vit_b16_c2_ep5_batch4_2+2ctx/seed1"
    return env, options, trained, tested, run_dir


@requires_dassl
def test_release_scripts_train_and_test(ivlp_run):
    _, _, trained, tested, run_dir = ivlp_run
    assert "Finish training" in trained.stdout and "SUBSAMPLE_CLASSES: new" in tested.stdout
    assert 0 <= accuracies(tested.stdout)[-1] <= 100
    checkpoint = torch.load(run_dir / "VLPromptLearner" / "model.pth.tar-2", weights_only=True)
    assert sorted(checkpoint["state_dict"]) == [f"{tower}.{layer}" for tower in ("text_prompts", "visual_prompts")
                                                for layer in range(3)]


@requires_dassl
def test_release_checkpoint_evaluates_as_our_own(ivlp_run, workspace, tmp_path):
    _, options, _, _, run_dir = ivlp_run
    assert_ivlp_release_checkpoint_evaluates_as_ours(workspace, "IVLP", "vit_b16_c2_ep5_batch4_2+2ctx", run_dir,
                                                tmp_path, options)


@requires_dassl
def test_language_prompting_scripts_run_the_language_only_recipe(workspace, tmp_path):
    env = script_env(workspace, tmp_path)
    options = ivlp_tiny_options("IVLP", epochs=1, vision=False)
    run_script(workspace, env, "language-prompting/base2new_train_lp.sh", "caltech101", "1", options=options)
    tested = run_script(workspace, env, "language-prompting/base2new_test_lp.sh", "caltech101", "1", options=options)
    assert 0 <= accuracies(tested.stdout)[-1] <= 100
    run_dir = tmp_path / "base2new/train_base/caltech101/shots_16/IVLP/vit_b16_c2_ep5_batch4_4ctx_language_only/seed1"
    checkpoint = torch.load(run_dir / "VLPromptLearner" / "model.pth.tar-1", weights_only=True)
    assert sorted(checkpoint["state_dict"]) == ["text_prompts.0", "text_prompts.1", "text_prompts.2"]
