"""MaPLe: the release's numbers on its own weights, gradients, the coupling, settings, backbones,
and the release's commands and checkpoints through Dassl.

Tolerances (fp32, CPU). A logit is exp(logit_scale) * cos(image, text), so fp32 rounding anywhere
in the towers moves it by a few ulps of exp(logit_scale) = 14.3: LOGIT_TOL = 8 ulps of it (1.4e-5)
covers other kernels and our exact shortcuts (measured <= 1.7e-6 for the release against itself on
two kernel sets, 6.9e-7 for ours against it) and stays below the effect of the release's fp16
casts (4.0e-5), so a test tells the two apart (helpers.py: LOGIT_TOL, FP16_LOGIT_BOUND). Mean
cross-entropy moves by at most twice the largest logit change (its gradient in the logits has an
L1 norm <= 2 per row), plus rounding.
"""
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, requires_dassl
from helpers import (EPS32, FP16_LOGIT_BOUND, HALF_ULP16, LOGIT_TOL, accuracies, half_and_fp32_logits, half_tolerance,
                     images_for, load_fixture, release_state, run, train_losses)

from vlprompt.files import CheckpointError, load_strict, read_checkpoint
from vlprompt.methods.maple import (MaPLe, MaPLePromptLearner, MaPLeSettings, convert_release_state_dict,
                                    is_release_state_dict)
from vlprompt.methods.settings import ConfigError

# A gradient is a sum over images, classes and sequence positions through every layer; summed in
# another order (another kernel, our shortcuts) it moves by tens of fp32 ulps of its largest
# element (the release against itself on two kernels: 5.7e-7 of 0.33, 14 ulps; ours: 6.9e-7).
GRAD_ULPS = 64
CLASSES = ["dog", "cat", "sports_car", "oak tree", "violin"]


def loss_bound(logit_tol, loss):
    """Mean cross-entropy moves by at most twice the largest logit change, plus rounding."""
    return 2 * logit_tol + 8 * EPS32 * abs(float(loss))


def build(clip_model, classes=CLASSES, seed=0, **overrides):
    settings = dict(n_ctx=2, ctx_init="a photo of a", prompt_depth=3)
    settings.update(overrides)
    torch.manual_seed(seed)
    return MaPLe(clip_model, MaPLeSettings(**settings), classes)


def release_model(release_clip, case_name, depth=None):
    """Our MaPLe with the release's state of a fixture case, through the checkpoint converter.
    `depth` < the case's keeps the first depth-1 deep prompts (the ones the release uses)."""
    fixture = load_fixture("maple")
    case = fixture["cases"][case_name]
    depth = depth or case["config"]["PROMPT_DEPTH"]
    model = MaPLe(release_clip, MaPLeSettings(n_ctx=case["config"]["N_CTX"], ctx_init=case["config"]["CTX_INIT"],
                                             prompt_depth=depth), fixture["inputs"]["classnames"])
    state = convert_release_state_dict(release_state(case))
    keep = set(model.prompt_learner.state_dict())
    load_strict(model.prompt_learner, {k: v for k, v in state.items() if k in keep}, case_name)
    return model, case, fixture["inputs"]


def rounded_as_shipped_logits(model, images):
    """Our prompts rounded to fp16 where the release casts them: every prompt but ctx
    (its clip/model.py:306, 323 and 457)."""
    text, visual = model.prompt_learner()
    round16 = lambda t: t.half().float()  # noqa: E731
    text = [text[0]] + [round16(t) for t in text[1:]]
    return model.logits(model.image_encoder(images, [round16(v) for v in visual]),
                        model.text_encoder(model.token_ids, text))


# ---- the release's numbers on its own weights ---------------------------------------------------
def test_prompts_and_context_follow_the_releases_ctx_init_rule(release_clip):
    model, case, _ = release_model(release_clip, "depth3")
    assert torch.equal(model.token_ids, case["tokenized_prompts"])  # "a photo of a apple." ...
    fresh = MaPLe(release_clip, MaPLeSettings(prompt_depth=3), load_fixture("maple")["inputs"]["classnames"])
    # N_CTX 2 with "a photo of a": "a photo" is learned, "of a" stays fixed tokens
    torch.testing.assert_close(fresh.prompt_learner.ctx.detach(), case["initial_state"]["prompt_learner.ctx"],
                               rtol=0, atol=0)
    assert fresh.prompt_prefix == case["prompt_prefix"] == "a photo of a"


@pytest.mark.parametrize("n_ctx,ctx_init,prefix", [
    (4, "a photo of a", "a photo of a"),  # the whole phrase learned
    (5, "a photo of a photo", "X X X X X"),  # N_CTX > 4: random, whatever CTX_INIT says
    (3, "", "X X X"),
])
def test_ctx_init_applies_only_up_to_four_tokens(tiny_clip, n_ctx, ctx_init, prefix):
    model = build(tiny_clip, n_ctx=n_ctx, ctx_init=ctx_init)
    assert model.prompt_prefix == prefix
    assert model.prompt_learner.ctx.shape == (n_ctx, 64)
    if prefix.startswith("X"):
        assert model.first_context is None and float(model.prompt_learner.ctx.detach().std()) < 0.05
    else:
        torch.testing.assert_close(model.prompt_learner.ctx.detach(), model.first_context)


@pytest.mark.parametrize("case_name,depth", [("depth3", 3), ("depth9_on_3_layers", 3)])
def test_logits_and_loss_match_the_release_without_its_casts(release_clip, case_name, depth):
    """depth9_on_3_layers: the shipped PROMPT_DEPTH 9 on a 3-layer CLIP, where the release uses
    deep prompts 0-1 only; ours refuses that depth, and the used prompts give its numbers."""
    model, case, inputs = release_model(release_clip, case_name, depth)
    expected = case["results"]["no_casts"]
    with torch.no_grad():
        logits = model.eval()(inputs["images"])
    torch.testing.assert_close(logits, expected["eval_logits"], rtol=0, atol=LOGIT_TOL)
    loss, train_logits, _ = model.train().loss(inputs["images"], inputs["labels"])
    torch.testing.assert_close(train_logits.detach(), expected["train_logits"], rtol=0, atol=LOGIT_TOL)
    assert abs(loss.item() - float(expected["loss"])) <= loss_bound(LOGIT_TOL, expected["loss"])


def test_logits_and_loss_against_the_release_as_shipped(release_clip):
    """Our fp32 prompts stay unrounded (within fp16 rounding of the release's); rounding them where
    the release casts gives its numbers to fp32 precision, and only then."""
    model, case, inputs = release_model(release_clip, "depth3")
    shipped = case["results"]["as_shipped"]
    with torch.no_grad():
        ours = model.eval()(inputs["images"])
        rounded = rounded_as_shipped_logits(model, inputs["images"])
    torch.testing.assert_close(ours, shipped["eval_logits"], rtol=0, atol=FP16_LOGIT_BOUND)
    torch.testing.assert_close(rounded, shipped["eval_logits"], rtol=0, atol=LOGIT_TOL)
    assert float((ours - shipped["eval_logits"]).abs().max()) > LOGIT_TOL  # the casts are visible
    loss = model.train().loss(inputs["images"], inputs["labels"])[0]
    assert abs(loss.item() - float(shipped["loss"])) <= loss_bound(FP16_LOGIT_BOUND, shipped["loss"])
    rounded_loss = F.cross_entropy(rounded, inputs["labels"])
    assert abs(float(rounded_loss) - float(shipped["loss"])) <= loss_bound(LOGIT_TOL, shipped["loss"])


def grads_of(model, inputs):
    model.train().prompt_learner.zero_grad()
    model.loss(inputs["images"], inputs["labels"])[0].backward()
    return {f"prompt_learner.{n}": p.grad for n, p in model.prompt_learner.named_parameters()}


def compare_grads(ours, release, tolerance):
    """The release's stored gradients: whole tensors up to 65,536 elements, first rows beyond."""
    for name, grad in ours.items():
        expected = release["values"].get(name)
        if expected is None:
            expected = release["head_rows"][name]
            grad = grad[:expected.shape[0]]
        assert float((grad - expected).abs().max()) <= tolerance(expected), name


def test_gradients_reach_the_parameters_the_release_trains_with_its_values(release_clip):
    model, case, inputs = release_model(release_clip, "depth3")
    grads = grads_of(model, inputs)
    release = case["results"]["no_casts"]["grads"]
    assert release["none"] == [] and release["zero"] == []
    assert sorted(grads) == sorted(release["nonzero"]) == sorted(case["trainable_requires_grad_names"])
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    compare_grads(grads, release, lambda expected: GRAD_ULPS * EPS32 * float(expected.abs().max()))
    # as shipped the gradients of the cast prompts are fp16-rounded and the forward is rounded too:
    # a few fp16 roundings of the largest element
    compare_grads(grads, case["results"]["as_shipped"]["grads"],
                  lambda expected: 4 * HALF_ULP16 * float(expected.abs().max()))


def test_the_releases_unused_deep_prompts_are_a_config_error_here(release_clip):
    """The release makes PROMPT_DEPTH-1 deep prompts whatever the depth of CLIP; beyond it they get
    no gradient (the fixture's grads 'none'). Ours names the limit instead."""
    case = load_fixture("maple")["cases"]["depth9_on_3_layers"]
    assert len(case["results"]["no_casts"]["grads"]["none"]) == 18  # prompts 2-7 and their maps
    with pytest.raises(ConfigError, match=r"PROMPT_DEPTH=9 is invalid: must be in \[1, 3\].*3 text and 3 vision"):
        MaPLe(release_clip, MaPLeSettings(prompt_depth=9), ["apple"])


@pytest.mark.parametrize("case_name", ["depth3", "depth9_on_3_layers"])
@pytest.mark.parametrize("precision", ["checkpoint_fp32", "checkpoint_fp16"])
def test_release_checkpoint_key_sets_convert_to_our_learner(case_name, precision):
    """The key names, shapes and dtypes the release writes (whole CustomCLIP) -> exactly our
    trainable state; frozen CLIP, logit_scale and the class-bound buffers are dropped."""
    case = load_fixture("maple")["cases"][case_name]
    listed = case[precision]["MultiModalPromptLearner"]["state_dict"]
    dtypes = {"float16": torch.float16, "float32": torch.float32}
    release = {key: torch.zeros(shape, dtype=dtypes[dtype]) for key, shape, dtype in listed}
    assert is_release_state_dict(release) and len(release) in (96, 114)
    converted = convert_release_state_dict(release)
    learner = MaPLePromptLearner(case["config"]["N_CTX"], case["config"]["PROMPT_DEPTH"], 512, 768)
    load_strict(learner, converted, case_name)  # same keys and shapes, or it raises
    assert {f"prompt_learner.{k}" for k in converted} == set(case["trainable_spec"])
    assert all(v.dtype == torch.float32 for v in converted.values())
    assert not is_release_state_dict(learner.state_dict())  # our own checkpoints are told apart


def test_release_checkpoint_evaluates_as_its_weights(release_clip):
    """An fp16 run's checkpoint (ctx and proj in fp16, the rest fp32, frozen CLIP alongside) gives
    the logits of our model holding the same values."""
    model, _, inputs = release_model(release_clip, "depth3")
    release = {f"prompt_learner.{k}": v.half() if k == "ctx" or k.startswith("proj.") else v.clone()
               for k, v in model.prompt_learner.state_dict().items()}
    release.update({"prompt_learner.token_prefix": torch.zeros(6, 1, 512, dtype=torch.float16),
                    "prompt_learner.token_suffix": torch.zeros(6, 74, 512, dtype=torch.float16),
                    "image_encoder.proj": torch.zeros(768, 512), "text_encoder.ln_final.weight": torch.ones(512),
                    "logit_scale": torch.tensor(2.6593)})
    with torch.no_grad():
        for name in ("ctx", "proj.weight", "proj.bias"):  # what the release's fp16 file holds
            model.prompt_learner.get_parameter(name).copy_(release[f"prompt_learner.{name}"].float())
        expected = model.eval()(inputs["images"])
        load_strict(model.prompt_learner, convert_release_state_dict({f"module.{k}": v for k, v in release.items()}),
                    "release")
        assert torch.equal(model(inputs["images"]), expected)
    with pytest.raises(KeyError, match="prompt_learner.meta_net.weight"):
        convert_release_state_dict({"prompt_learner.meta_net.weight": torch.zeros(1)})


# ---- the method ---------------------------------------------------------------------------------
def test_visual_prompts_are_the_projected_text_prompts(tiny_clip):
    learner = build(tiny_clip, prompt_depth=3).prompt_learner
    text, visual = learner()
    assert [t.shape for t in text] == [(2, 64)] * 3 and [v.shape for v in visual] == [(2, 128)] * 3
    assert text[0] is learner.ctx and text[1] is learner.compound_prompts_text[0]
    torch.testing.assert_close(visual[0], learner.proj(learner.ctx))
    for k in range(2):
        torch.testing.assert_close(visual[k + 1], learner.compound_prompt_projections[k](learner.compound_prompts_text[k]))


def test_deep_projections_start_as_copies_of_one_linear_yet_learn_apart(tiny_clip):
    learner = build(tiny_clip, prompt_depth=3).prompt_learner
    first, second = learner.compound_prompt_projections
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)
    assert not torch.equal(first.weight, learner.proj.weight)  # the first-layer map is its own draw
    assert first.weight.data_ptr() != second.weight.data_ptr()
    with torch.no_grad():
        first.weight.add_(1.0)
    assert not torch.equal(first.weight, second.weight)


def test_vit_b16_learner_at_the_release_defaults_has_the_papers_parameter_count():
    """N_CTX 2, PROMPT_DEPTH 9, 512 -> 768: 3.55M parameters (the paper's Table 7)."""
    from vlprompt.clip.loading import architecture_shape
    shape = architecture_shape("ViT-B/16")
    settings = MaPLeSettings()
    settings.validate(shape)
    learner = MaPLePromptLearner(settings.n_ctx, settings.prompt_depth, shape.text_width, shape.vision_width)
    linear = 512 * 768 + 768
    assert sum(p.numel() for p in learner.parameters()) == 9 * (2 * 512) + 9 * linear == 3_555_072


def test_vit_l14_depth_is_limited_by_its_12_text_layers():
    from vlprompt.clip.loading import architecture_shape
    shape = architecture_shape("ViT-L/14")
    MaPLeSettings(prompt_depth=12).validate(shape)
    with pytest.raises(ConfigError, match=r"must be in \[1, 12\].*12 text and 24 vision layers"):
        MaPLeSettings(prompt_depth=13).validate(shape)


def test_every_trainable_tensor_gets_a_gradient_and_clip_stays_frozen(tiny_clip):
    model = build(tiny_clip, prompt_depth=3)
    images = images_for(model, batch=4)
    model.loss(images, torch.arange(4) % len(CLASSES))[0].backward()
    names = {n for n, p in model.prompt_learner.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert names == {"ctx", "proj.weight", "proj.bias", "compound_prompts_text.0", "compound_prompts_text.1",
                     *(f"compound_prompt_projections.{k}.{p}" for k in range(2) for p in ("weight", "bias"))}
    assert all(not p.requires_grad for p in tiny_clip.parameters())


def test_eval_logits_do_not_depend_on_batch_size_or_order(tiny_clip):
    model = build(tiny_clip).eval()
    images = images_for(model, batch=7)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = model(images)
        with model.evaluation():  # classes and visual prompts encoded once
            pieces = torch.cat([model(images[i:i + 2]) for i in range(0, 7, 2)])
            shuffled = model(images[perm])
    # one image's logits are the same computation whatever the batch: a few ulps of the scale
    tolerance = dict(rtol=0, atol=LOGIT_TOL)
    torch.testing.assert_close(pieces, whole, **tolerance)
    torch.testing.assert_close(shuffled, whole[perm], **tolerance)


def test_a_few_steps_lower_the_loss(tiny_clip):
    # random images through a random CLIP give nearly parallel image features (cos >= 0.92), so the
    # prompts separate them slowly: 4 images, 15 Adam steps
    model = build(tiny_clip)
    images, labels = images_for(model, batch=4), torch.arange(4)
    losses = train_losses(model, images, labels, steps=15, lr=2e-2)
    assert max(losses[-3:]) < 0.85 * losses[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_agree_with_fp32(tiny_clip, dtype):
    got, expected, scale = half_and_fp32_logits(build, tiny_clip, dtype)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < half_tolerance(dtype, scale)


def test_vit_l_shaped_backbone_maps_text_width_to_vision_width(tiny_l_clip):
    """tiny-L: text 128 wide, 3 layers; vision 192 wide, 4 layers (the release hard-codes 512 -> 768)."""
    model = build(tiny_l_clip, n_ctx=3, ctx_init="", prompt_depth=3)
    learner = model.prompt_learner
    assert learner.proj.weight.shape == (192, 128) and learner.compound_prompts_text[1].shape == (3, 128)
    images = images_for(model, batch=3)
    model.loss(images, torch.arange(3))[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.parameters())
    with pytest.raises(ConfigError, match=r"PROMPT_DEPTH=4 is invalid: must be in \[1, 3\]"):
        build(tiny_l_clip, prompt_depth=4)  # the vision tower has 4 layers, the text tower 3


@pytest.mark.parametrize("overrides,key,message", [
    (dict(prompt_depth=0), "PROMPT_DEPTH", "must be in [1, inf]"),
    (dict(prompt_depth=4), "PROMPT_DEPTH", "must be in [1, 3]"),
    (dict(n_ctx=0), "N_CTX", "must be in [1, 73]"),
    (dict(n_ctx=3, ctx_init="a photo"), "CTX_INIT", "has 2 token(s), fewer than N_CTX=3"),
    (dict(ctx_init=None), "CTX_INIT", "expected str"),
])
def test_bad_settings_name_the_setting(tiny_clip, overrides, key, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}=") as err:
        build(tiny_clip, **overrides)
    assert err.value.setting == key.lower() and message in str(err.value)


def test_settings_are_the_releases_keys_and_defaults():
    pytest.importorskip("dassl")
    from dassl.config import get_cfg_default

    from trainers.config import extend_cfg
    assert dict(extend_cfg(get_cfg_default()).TRAINER.MAPLE) == {
        "N_CTX": 2, "CTX_INIT": "a photo of a", "PROMPT_DEPTH": 9, "PREC": "fp16"}


# ---- with Dassl: the release's commands and checkpoints --------------------------------------------
TINY_OPTIONS = ["INPUT.SIZE", "(32, 32)", "TRAINER.MAPLE.PROMPT_DEPTH", "3", "TRAINER.MAPLE.PREC", "fp32",
                "OPTIM.MAX_EPOCH", "2", "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "4",
                "DATALOADER.TEST.BATCH_SIZE", "5", "DATASET.ALLOW_FEWER_SHOTS", "True"]  # 4 images per class


@pytest.fixture(scope="module")
def base2new(workspace, tmp_path_factory):
    """Base-to-new through the release's script name for training and ours for testing."""
    root = tmp_path_factory.mktemp("maple")
    env = dict(os.environ, DATA=str(workspace / "data"), OUTPUT=str(root / "output"),
               VLPROMPT_CACHE=str(root / "cache"), PYTHONWARNINGS="ignore")
    options = ["MODEL.BACKBONE.PATH", str(workspace / "tiny_clip.pt"), *TINY_OPTIONS]

    def script(name, *args):
        proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "maple", name), *args, *options],
                              capture_output=True, text=True, cwd=str(root), env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    trained = script("base2new_train_maple.sh", "caltech101", "1")
    tested = script("base2new_test.sh", "caltech101", "1")
    run_dir = root / "output/base2new/train_base/caltech101/shots_16/MaPLe/vit_b16_c2_ep5_batch4_2ctx/seed1"
    return trained, tested, run_dir


@requires_dassl
def test_base2new_runs_with_the_releases_script_names(base2new):
    trained, tested, run_dir = base2new
    assert "MaPLe: MaPLeSettings(n_ctx=2, ctx_init='a photo of a', prompt_depth=3)" in trained
    assert "Finish training" in trained
    folder = run_dir / "MultiModalPromptLearner"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint", "model.pth.tar-2"]
    state = torch.load(folder / "model.pth.tar-2", weights_only=True)["state_dict"]
    assert sorted(state) == sorted(["ctx", "proj.weight", "proj.bias", "compound_prompts_text.0",
                                    "compound_prompts_text.1", *(f"compound_prompt_projections.{k}.{p}"
                                                                 for k in range(2) for p in ("weight", "bias"))])
    assert "SUBSAMPLE_CLASSES: new" in tested and "model.pth.tar-2" in tested and len(accuracies(tested)) == 1


def train_py(workspace, out, model_dir=None, *opts):
    """train.py as base2new_test_maple.sh calls it (eval-only at epoch 5 when `model_dir` is given)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--root", str(workspace / "data"), "--seed", "1",
           "--trainer", "MaPLe", "--dataset-config-file", os.path.join(ROOT, "configs/datasets/caltech101.yaml"),
           "--config-file", os.path.join(ROOT, "configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml"),
           "--output-dir", str(out)]
    if model_dir is not None:
        cmd += ["--model-dir", str(model_dir), "--load-epoch", "5", "--eval-only"]
    return cmd + ["MODEL.BACKBONE.PATH", str(workspace / "tiny_clip.pt"), "MODEL.FEATURE_CACHE_DIR", str(out / "cache"),
                  "DATASET.NUM_SHOTS", "16", "DATASET.SUBSAMPLE_CLASSES", "new", *TINY_OPTIONS, *opts]


@requires_dassl
def test_a_release_checkpoint_folder_evaluates_like_ours(base2new, workspace, tmp_path):
    """The release's file: whole CustomCLIP state, ctx/proj in fp16, a pickled LR scheduler,
    loaded by --model-dir/--load-epoch as its base2new_test_maple.sh does."""
    ours = torch.load(base2new[2] / "MultiModalPromptLearner" / "model.pth.tar-2", weights_only=True)["state_dict"]
    rounded = {k: v.half() if k == "ctx" or k.startswith("proj.") else v for k, v in ours.items()}
    release = {f"prompt_learner.{k}": v for k, v in rounded.items()}
    release.update({"prompt_learner.token_prefix": torch.zeros(3, 1, 64), "prompt_learner.token_suffix":
                    torch.zeros(3, 74, 64), "image_encoder.conv1.weight": torch.zeros(1),
                    "text_encoder.positional_embedding": torch.zeros(1), "logit_scale": torch.zeros(())})
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    for folder, state, extra in (("release", release, {"scheduler": {"successor": torch.optim.lr_scheduler.
                                                                     CosineAnnealingLR(opt, 5.0)}}),
                                 ("ours", {k: v.float() for k, v in rounded.items()}, {})):
        path = tmp_path / folder / "MultiModalPromptLearner" / "model.pth.tar-5"
        path.parent.mkdir(parents=True)
        torch.save({"state_dict": state, "epoch": 5, "val_result": None, **extra}, path)
    # the trainer reads checkpoints with read_checkpoint: a pickled file only when trusted
    with pytest.raises(CheckpointError, match="set MODEL.TRUST_RELEASE_CHECKPOINT True"):
        read_checkpoint(str(tmp_path / "release" / "MultiModalPromptLearner" / "model.pth.tar-5"),
                        trust_key="MODEL.TRUST_RELEASE_CHECKPOINT")
    from_release = run(train_py(workspace, tmp_path / "eval_release", tmp_path / "release",
                                "MODEL.TRUST_RELEASE_CHECKPOINT", "True"))
    assert "checkpoint of the official release: converting its key names" in from_release.stdout
    from_ours = run(train_py(workspace, tmp_path / "eval_ours", tmp_path / "ours"))
    assert accuracies(from_release.stdout) == accuracies(from_ours.stdout) and len(accuracies(from_ours.stdout)) == 1


@requires_dassl
def test_a_prompt_depth_beyond_the_backbone_stops_the_run_naming_the_key(workspace, tmp_path):
    cmd = train_py(workspace, tmp_path / "deep")
    cmd[cmd.index("TRAINER.MAPLE.PROMPT_DEPTH") + 1] = "9"  # the recipe's depth on the 3-layer tiny CLIP
    proc = run(cmd, expect_ok=False)
    assert proc.returncode != 0 and "TRAINER.MAPLE.PROMPT_DEPTH=9 is invalid: must be in [1, 3]" in proc.stderr
