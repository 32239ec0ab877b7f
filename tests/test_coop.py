"""CoOp: the release's numbers on known weights, its prompt layouts, gradients, batch
independence, training, checkpoints, and the release's trainer name, configs and commands."""
import os
import re
import subprocess
import sys

import clip
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, requires_dassl
from helpers import (FEATURE_TOL, accuracies, assert_batch_independent, check_coop_against_release, coop_model_for_case, half_and_fp32_logits,
                     half_tolerance, images_for, load_fixture, method_command, run, script_env, tiny_options,
                     train_losses, write_release_checkpoint)

from vlprompt.methods.coop import CoOp, CoOpSettings, convert_release_state_dict, is_release_state_dict
from vlprompt.methods.settings import ConfigError

CASES = list(load_fixture("coop")["cases"])
CLASSES = ["dog", "sports_car", "oak tree", "violin", "golden retriever"]


def build(clip_model, classes=CLASSES, seed=0, **settings):
    torch.manual_seed(seed)
    return CoOp(clip_model, CoOpSettings(**{"n_ctx": 4, **settings}), classes)


# ---- the release's numbers -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_logits_loss_and_gradients_equal_the_release(release_clip, name):
    """end (random and CTX_INIT) and class-specific middle, with the release's state loaded through
    the checkpoint converter; both fixture modes (identical: CoOp casts nothing to fp16). Gradients
    reach exactly the tensors the release trains."""
    model, fixture, case = coop_model_for_case("coop", name, release_clip)
    assert torch.equal(model.token_ids, case["tokenized_prompts"]) and model.prompt_prefix == case["prompt_prefix"]
    grads = check_coop_against_release(model, fixture, case)
    release_grads = case["results"]["no_casts"]["grads"]
    assert set(grads) == set(release_grads["nonzero"]) == {"ctx"} and release_grads["none"] == release_grads["zero"] == []
    # the release's names under its registered model: prompt_learner.<our name>
    assert {f"prompt_learner.{n}" for n in grads} == set(case["trainable_requires_grad_names"])
    assert all(p.grad is None for p in release_clip.parameters())
    with torch.no_grad():
        text = F.normalize(model.encode_classes(), dim=-1)
        image = model.frozen_image_features(fixture["inputs"]["images"])
    result = case["results"]["no_casts"]
    torch.testing.assert_close(text, result["text_features"], rtol=0, atol=FEATURE_TOL)
    torch.testing.assert_close(image, result["image_features"], rtol=0, atol=FEATURE_TOL)


def test_ctx_init_sets_the_length_and_ignores_n_ctx_and_csc(release_clip):
    """The release's CoOp rule: one context token per word of CTX_INIT, initialised with their
    embeddings; N_CTX and CSC are ignored."""
    case = load_fixture("coop")["cases"]["end_ctx_init"]
    model = CoOp(release_clip, CoOpSettings(n_ctx=16, csc=True, ctx_init="a photo of a"),
                 load_fixture("coop")["inputs"]["classnames"])
    assert model.n_ctx == case["n_ctx"] == 4 and model.prompt_learner.ctx.shape == (4, 512)
    assert torch.equal(model.prompt_learner.ctx.detach(), case["initial_state"]["ctx"])
    assert torch.equal(model.token_ids, case["tokenized_prompts"])


def test_underscores_in_ctx_init_are_spaces(tiny_clip):
    model = build(tiny_clip, ctx_init="a_photo_of_a")
    assert model.n_ctx == 4 and model.prompt_prefix == "a photo of a"


# ---- the prompt layouts --------------------------------------------------------------------------------
def release_text_features(clip_model, ctx, classes, position, prefix_text):
    """CoOp's PromptLearner + TextEncoder as the release writes them: token_prefix/suffix sliced
    from the embedded "<prefix> <name>." prompts, the context concatenated around the class
    tokens, CLIP's own transformer (sequence-first, 77x77 mask)."""
    names = [c.replace("_", " ") for c in classes]
    name_lens = [len(clip.clip._tokenizer.encode(name)) for name in names]
    tokenized = clip.tokenize([f"{prefix_text} {name}." for name in names])
    n = ctx.shape[-2]
    ctx = ctx.unsqueeze(0).expand(len(names), -1, -1) if ctx.dim() == 2 else ctx
    with torch.no_grad():
        embedding = clip_model.token_embedding(tokenized)
        prefix, suffix = embedding[:, :1], embedding[:, 1 + n:]
        prompts = []
        for i, k in enumerate(name_lens):
            half = n // 2
            pieces = {"end": [prefix[i], ctx[i], suffix[i]],
                      "middle": [prefix[i], ctx[i, :half], suffix[i, :k], ctx[i, half:], suffix[i, k:]],
                      "front": [prefix[i], suffix[i, :k], ctx[i], suffix[i, k:]]}[position]
            prompts.append(torch.cat(pieces))
        x = torch.stack(prompts) + clip_model.positional_embedding
        x = clip_model.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = clip_model.ln_final(x)
        return x[torch.arange(len(names)), tokenized.argmax(-1)] @ clip_model.text_projection


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True])
def test_class_token_positions_build_the_release_sequences(tiny_clip, position, csc):
    """An odd context length (5 = 2 + 3 around the name in the middle) and names of 1-2 tokens."""
    model = build(tiny_clip, n_ctx=5, csc=csc, class_token_position=position)
    ctx = model.prompt_learner.ctx.detach()
    assert ctx.shape == ((len(CLASSES), 5, 64) if csc else (5, 64))
    with torch.no_grad():
        ours = model.encode_classes()
    expected = release_text_features(tiny_clip, ctx, CLASSES, position, model.prompt_prefix)
    # fp32 rounding of reordered sums (fused attention, shortcuts) on features of size ~1
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_positions_give_different_prompts(tiny_clip):
    features = [build(tiny_clip, class_token_position=p).encode_classes().detach() for p in ("end", "middle", "front")]
    assert all(not torch.allclose(a, b, atol=1e-3) for i, a in enumerate(features) for b in features[i + 1:])


# ---- behaviour --------------------------------------------------------------------------------------
@pytest.mark.parametrize("csc,position", [(False, "end"), (True, "front")])
def test_eval_logits_do_not_depend_on_batch_size_or_order(tiny_clip, csc, position):
    model = build(tiny_clip, csc=csc, class_token_position=position)
    assert_batch_independent(model, images_for(model, batch=7))


@pytest.mark.parametrize("csc,position", [(False, "end"), (True, "middle")])
def test_a_few_steps_lower_the_loss(tiny_clip, csc, position):
    model = build(tiny_clip, csc=csc, class_token_position=position)
    images, labels = images_for(model, batch=5), torch.arange(5)
    losses = train_losses(model, images, labels, steps=15, lr=0.02)
    assert min(losses[-3:]) < 0.8 * losses[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_agree_with_fp32(tiny_clip, dtype):
    got, expected, scale = half_and_fp32_logits(lambda clip_model: build(clip_model, class_token_position="middle"),
                                                tiny_clip, dtype)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < half_tolerance(dtype, scale)


def test_set_classes_retargets_a_shared_context_but_not_class_specific_ones(tiny_clip):
    shared = build(tiny_clip, class_token_position="middle")
    shared.set_classes(["tulip", "yacht"])
    assert shared.token_order.shape == (2, 77)
    with torch.no_grad():
        assert shared.eval()(images_for(shared, batch=3)).shape == (3, 2)
    specific = build(tiny_clip, csc=True)
    with pytest.raises(ValueError, match="learned for 5 classes; they cannot serve 2 other classes"):
        specific.set_classes(["tulip", "yacht"])
    assert set(shared.prompt_learner.state_dict()) == {"ctx"}  # class-bound tensors are not checkpointed


@pytest.mark.parametrize("overrides,key", [
    (dict(class_token_position="start"), "CLASS_TOKEN_POSITION"),
    (dict(ctx_init="a  photo"), "CTX_INIT"),
    (dict(ctx_init="a photo "), "CTX_INIT"),
    (dict(n_ctx=0), "N_CTX"),
    (dict(csc="True"), "CSC"),
])
def test_bad_settings_name_the_setting(tiny_clip, overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}=") as err:
        build(tiny_clip, **overrides)
    assert err.value.setting == key.lower()


# ---- the release's checkpoints -------------------------------------------------------------------
def test_release_state_dicts_are_recognised_and_converted(tiny_clip):
    trained = build(tiny_clip, seed=1, csc=True)
    ctx = trained.prompt_learner.ctx.detach()
    # an fp16 run's checkpoint, saved from a DataParallel model
    release = {"module.ctx": ctx.half(), "module.token_prefix": torch.zeros(5, 1, 64, dtype=torch.half),
               "module.token_suffix": torch.zeros(5, 72, 64, dtype=torch.half)}
    assert is_release_state_dict(release) and not is_release_state_dict(trained.prompt_learner.state_dict())
    converted = convert_release_state_dict(release)
    assert set(converted) == {"ctx"} and converted["ctx"].dtype == torch.float32
    fresh = build(tiny_clip, seed=2, csc=True)
    fresh.prompt_learner.load_state_dict(converted)
    assert torch.equal(fresh.prompt_learner.ctx.detach(), ctx.half().float())


# ---- with Dassl ---------------------------------------------------------------------------------
@requires_dassl
def test_config_nodes_are_the_releases():
    """TRAINER.COOP and TRAINER.COCOOP: the release's keys (fixture configs) and its defaults
    (its train.py extend_cfg), PREC included."""
    from dassl.config import get_cfg_default

    from dassl.engine import TRAINER_REGISTRY
    from trainers.config import extend_cfg
    cfg = extend_cfg(get_cfg_default())
    # TRAINER.COOP is shared with releases that read it (KgCoOp, TCP): a key they disagree on is None in
    # the node and each trainer applies its own default
    assert TRAINER_REGISTRY.get("CoOp").settings_from(cfg) == CoOpSettings(
        n_ctx=16, csc=False, ctx_init="", class_token_position="end") and cfg.TRAINER.COOP.PREC == "fp16"
    assert dict(cfg.TRAINER.COCOOP) == {"N_CTX": 16, "CTX_INIT": "", "PREC": "fp16"}
    for method, node in (("coop", cfg.TRAINER.COOP), ("cocoop", cfg.TRAINER.COCOOP)):
        assert all(set(case["config"]) <= set(node) for case in load_fixture(method)["cases"].values())


def vlprompt_run(env, *args):
    proc = subprocess.run([sys.executable, "-m", "vlprompt.run", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def base2new(workspace, tmp_path_factory):
    """`python -m vlprompt.run base2new_train/test CoOp caltech101 1` with the base-to-new recipe
    (vit_b16_ctxv1: CTX_INIT "a photo of a"), 2 epochs on the tiny data and CLIP."""
    tmp = tmp_path_factory.mktemp("coop")
    env = script_env(workspace, tmp / "output")
    options = tiny_options(workspace, "COOP", "OPTIM.MAX_EPOCH", "2", "DATALOADER.TRAIN_X.BATCH_SIZE", "4")
    trained = vlprompt_run(env, "base2new_train", "CoOp", "caltech101", "1", *options)
    tested = vlprompt_run(env, "base2new_test", "CoOp", "caltech101", "1", *options)
    run_dir = tmp / "output/base2new/train_base/caltech101/shots_16/CoOp/vit_b16_ctxv1/seed1"
    return run_dir, trained, tested, options


@requires_dassl
def test_base_to_new_trains_checkpoints_in_the_release_folder_and_tests(base2new):
    run_dir, trained, tested, _ = base2new
    assert "CoOp: CoOpSettings(n_ctx=16, csc=False, ctx_init='a photo of a', class_token_position='end')" in trained
    assert "prompt prefix 'a photo of a'" in trained and "Finish training" in trained
    assert sorted(p.name for p in (run_dir / "prompt_learner").iterdir()) == ["checkpoint", "model.pth.tar-2"]
    state = torch.load(run_dir / "prompt_learner" / "model.pth.tar-2", weights_only=True)["state_dict"]
    assert list(state) == ["ctx"] and state["ctx"].shape == (4, 64)
    assert "SUBSAMPLE_CLASSES: new" in tested and len(accuracies(tested)) == 1


@requires_dassl
def test_release_checkpoint_evaluates_as_our_own(base2new, workspace, tmp_path):
    """A `prompt_learner/model.pth.tar-2` written by the release (token buffers, pickled
    scheduler) evaluates through train.py --model-dir like our checkpoint of the same weights."""
    run_dir, _, _, options = base2new
    ours = torch.load(run_dir / "prompt_learner" / "model.pth.tar-2", weights_only=True)["state_dict"]
    release = {"ctx": ours["ctx"], "token_prefix": torch.zeros(3, 1, 64), "token_suffix": torch.zeros(3, 72, 64)}
    write_release_checkpoint(tmp_path / "release" / "prompt_learner" / "model.pth.tar-2", release, 2)
    new = ["DATASET.SUBSAMPLE_CLASSES", "new", "DATASET.NUM_SHOTS", "16", *options]

    def evaluate(model_dir, out, *extra):
        return run(method_command(workspace, "CoOp", "vit_b16_ctxv1", tmp_path / out, [*new, *extra],
                                  ["--model-dir", str(model_dir), "--load-epoch", "2", "--eval-only"]), expect_ok=False)

    refused = evaluate(tmp_path / "release", "refused")
    assert refused.returncode != 0 and "TRUST_RELEASE_CHECKPOINT" in refused.stderr
    converted = evaluate(tmp_path / "release", "converted", "MODEL.TRUST_RELEASE_CHECKPOINT", "True")
    assert converted.returncode == 0, converted.stderr[-2000:]
    assert "is a checkpoint of the official release" in converted.stdout
    direct = evaluate(run_dir, "direct")
    assert accuracies(converted.stdout) == accuracies(direct.stdout) and len(accuracies(direct.stdout)) == 1


@requires_dassl
def test_release_main_sh_runs_in_the_release_folders(workspace, tmp_path):
    """`bash scripts/coop/main.sh DATASET CFG CTP NCTX SHOTS CSC`: seeds 1-3 in
    output/DATASET/CoOp/CFG_SHOTSshots/nctxN_cscC_ctpP/seedS; a second call skips them."""
    env = script_env(workspace, tmp_path / "output")
    command = ["bash", os.path.join(ROOT, "scripts/coop/main.sh"), "caltech101", "vit_b16_ep50", "middle", "3", "2",
               "True", *tiny_options(workspace, "COOP", "OPTIM.MAX_EPOCH", "1")]
    first = subprocess.run(command, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    setting = tmp_path / "output/caltech101/CoOp/vit_b16_ep50_2shots/nctx3_cscTrue_ctpmiddle"
    assert sorted(p.name for p in setting.iterdir()) == ["seed1", "seed2", "seed3"]
    state = torch.load(setting / "seed2" / "prompt_learner" / "model.pth.tar-1", weights_only=True)["state_dict"]
    assert state["ctx"].shape == (6, 3, 64)  # class-specific: 6 classes x 3 tokens
    assert len(re.findall(r"\* accuracy: ", first.stdout)) == 3
    again = subprocess.run(command, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("skipping") == 3
    usage = subprocess.run(["bash", os.path.join(ROOT, "scripts/coop/main.sh"), "caltech101"], env=env,
                           capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr
