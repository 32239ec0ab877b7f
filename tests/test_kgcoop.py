"""KgCoOp: its loss term by hand and against the release's numbers, which tensors learn, batch
independence, training, the release's template table, CTX_INIT switch and checkpoints, and its
recipes, scripts and command lines through Dassl."""
import os
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, requires_dassl
from helpers import (EPS32, accuracies, assert_batch_independent, half_and_fp32_logits, half_tolerance, images_for,
                     method_command, run, run_script, script_env, tiny_options, train_losses,
                     write_release_checkpoint)

from vlprompt.clip.class_features import frozen_class_features
from vlprompt.clip.encoders import PromptedTextEncoder
from vlprompt.methods.coop import CoOp, CoOpSettings
from vlprompt.methods.coop import convert_release_state_dict as convert_coop_state_dict
from vlprompt.methods.kgcoop import (RELEASE_TEMPLATES, KgCoOp, KgCoOpSettings, convert_release_state_dict,
                                     hand_crafted_template, is_release_state_dict, knowledge_gap, release_ctx_init)
from vlprompt.methods.registry import get_method

CLASSES = ["dog", "sports_car", "oak tree", "violin", "golden retriever"]


def frozen_features(clip_model, classes=CLASSES, dataset="OxfordPets"):
    return frozen_class_features(PromptedTextEncoder(clip_model), classes, templates=(hand_crafted_template(dataset),))


def build(clip_model, classes=CLASSES, seed=0, **settings):
    torch.manual_seed(seed)
    return KgCoOp(clip_model, KgCoOpSettings(**{"n_ctx": 4, **settings}), classes, frozen_features(clip_model, classes))


# ---- the loss ---------------------------------------------------------------------------------------
def test_loss_is_cross_entropy_plus_w_times_one_minus_the_mean_cosine(tiny_clip):
    """The release's CustomCLIP.forward and forward_backward written out: normalised features, the
    logits, CE, score = 1 - mean_i cos(t_i, t_i^clip), loss = CE + W * score."""
    model = build(tiny_clip, w=3.5, csc=True)
    images, labels = images_for(model, batch=4), torch.tensor([0, 3, 4, 1])
    loss, logits, parts = model.train().loss(images, labels)
    with torch.no_grad():
        text = F.normalize(model.encode_classes(), dim=-1)
        image = F.normalize(tiny_clip.encode_image(images), dim=-1)
        frozen = F.normalize(frozen_features(tiny_clip), dim=-1)
    expected_logits = tiny_clip.logit_scale.exp() * image @ text.t()
    score = 1.0 - torch.nn.CosineSimilarity(dim=1, eps=1e-07)(text, frozen).mean()
    ce = F.cross_entropy(expected_logits, labels)
    torch.testing.assert_close(logits.detach(), expected_logits, rtol=0, atol=1e-5)
    assert abs(parts["loss_ce"] - ce.item()) < 1e-5 and abs(parts["loss_kg"] - score.item()) < 1e-6
    assert abs(loss.item() - (ce + 3.5 * score).item()) < 1e-5 and score.item() > 0.01


def test_the_term_is_half_the_papers_mean_squared_distance(tiny_clip):
    model = build(tiny_clip, seed=2)
    with torch.no_grad():
        text = F.normalize(model.encode_classes(), dim=-1)
        gap = knowledge_gap(model.encode_classes(), model.frozen_text_features)
    paper = (text - model.frozen_text_features).pow(2).sum(-1).mean()
    assert abs(gap.item() - paper.item() / 2) < 1e-6


def test_with_w_zero_it_is_coop(tiny_clip):
    kg = build(tiny_clip, w=0.0, class_token_position="middle")
    torch.manual_seed(0)
    coop = CoOp(tiny_clip, CoOpSettings(n_ctx=4, class_token_position="middle"), CLASSES)
    assert torch.equal(kg.prompt_learner.ctx, coop.prompt_learner.ctx)
    images, labels = images_for(kg, batch=3), torch.tensor([0, 1, 2])
    assert kg.loss(images, labels).loss.item() == coop.loss(images, labels).loss.item()


def test_only_the_context_learns_and_the_term_reaches_it(tiny_clip):
    """The release trains the parameters whose name holds "ctx": prompt_learner.ctx."""
    grads = {}
    for w in (0.0, 8.0):
        model = build(tiny_clip, w=w)
        model.loss(images_for(model, batch=3), torch.tensor([0, 1, 2])).loss.backward()
        grads[w] = {n: p.grad for n, p in model.prompt_learner.named_parameters()}
        assert set(grads[w]) == {"ctx"} and grads[w]["ctx"].abs().max() > 0
        assert all(p.grad is None for p in tiny_clip.parameters())
    assert (grads[8.0]["ctx"] - grads[0.0]["ctx"]).abs().max() > 1e-4


def test_frozen_features_of_other_classes_are_refused(tiny_clip):
    with pytest.raises(ValueError, match="needs frozen CLIP's class text features"):
        KgCoOp(tiny_clip, KgCoOpSettings(n_ctx=4), CLASSES)
    model = build(tiny_clip)
    with pytest.raises(ValueError, match="3 class features for 5 classes"):
        model.set_classes(CLASSES, frozen_features(tiny_clip, CLASSES[:3]))


# ---- behaviour --------------------------------------------------------------------------------------
def test_eval_logits_do_not_depend_on_batch_size_or_order(tiny_clip):
    model = build(tiny_clip, csc=True, class_token_position="front")
    assert_batch_independent(model, images_for(model, batch=7))


def test_training_lowers_the_loss_and_the_term_keeps_the_classes_near_frozen_clip(tiny_clip):
    """20 Adam steps: the loss falls; the class features stay closer to frozen CLIP's with W 8
    than without the term (W 0, CoOp)."""
    gaps = {}
    for w in (0.0, 8.0):
        model = build(tiny_clip, w=w, ctx_init="a photo of a")
        images, labels = images_for(model, batch=5), torch.arange(5)
        losses = train_losses(model, images, labels, steps=20, lr=0.02)
        assert min(losses[-3:]) < 0.8 * losses[0], (w, losses)
        gaps[w] = model.loss(images, labels).parts["loss_kg"]
    assert gaps[8.0] < 0.5 * gaps[0.0], gaps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_agree_with_fp32(tiny_clip, dtype):
    got, expected, scale = half_and_fp32_logits(lambda clip_model: build(clip_model), tiny_clip, dtype)
    assert got.dtype == torch.float32 and (got - expected).abs().max() < half_tolerance(dtype, scale)


# ---- the release's template table, CTX_INIT switch and checkpoints ---------------------------------------
def test_hand_crafted_prompts_are_the_releases_table():
    assert len(RELEASE_TEMPLATES) == 15
    assert hand_crafted_template("DescribableTextures") == "a photo of a {}, a type of texture."  # not "{} texture."
    assert hand_crafted_template("EuroSAT") == "a centered satellite photo of {}."
    assert hand_crafted_template("ToyObjects") == "a photo of a {}."  # outside the table (the release: KeyError)
    assert hand_crafted_template("FER2013") == "a photo of a face looking {}."  # the zero-shot table's
    texts = get_method("KgCoOp").class_texts(KgCoOpSettings(), "Food101")
    assert texts.templates == ("a photo of {}, a type of food.",) and not texts.descriptions


def test_the_releases_ctx_init_switch():
    assert release_ctx_init(True, "EuroSAT") == "a photo of a" and release_ctx_init(False, "EuroSAT") == ""
    assert release_ctx_init("a photo of", "Caltech101") == "a photo of"  # words keep CoOp's meaning


def release_layout(ctx, dtype=torch.float16, prefix=""):
    """What the release's prompt_learner state dict holds (recorded from its save path): ctx, its
    never-trained bias_vectors and meta_net (always fp16), the class-bound token buffers."""
    state = {"ctx": ctx.to(dtype), "bias_vectors": torch.zeros(1, 512, dtype=dtype),
             "token_prefix": torch.zeros(5, 1, 64, dtype=dtype), "token_suffix": torch.zeros(5, 72, 64, dtype=dtype),
             "meta_net.linear1.weight": torch.zeros(512, 512, dtype=torch.float16),
             "meta_net.linear1.bias": torch.zeros(512, dtype=torch.float16)}
    return {prefix + k: v for k, v in state.items()}


@pytest.mark.parametrize("prefix", ["", "module."])
def test_release_state_dicts_convert_to_the_context_alone(tiny_clip, prefix):
    trained = build(tiny_clip, seed=1)
    ctx = trained.prompt_learner.ctx.detach()
    release = release_layout(ctx, prefix=prefix)
    assert is_release_state_dict(release) and not is_release_state_dict(trained.prompt_learner.state_dict())
    converted = convert_release_state_dict(release)
    assert set(converted) == {"ctx"} and converted["ctx"].dtype == torch.float32
    assert "bias_vectors" in convert_coop_state_dict(release_layout(ctx))  # CoOp's converter would keep it
    fresh = build(tiny_clip, seed=2)
    fresh.prompt_learner.load_state_dict(converted)
    assert torch.equal(fresh.prompt_learner.ctx.detach(), ctx.half().float())
    assert abs(float(ctx.half().float().sub(ctx).abs().max())) <= 2 ** -11 * float(ctx.abs().max()) + EPS32


# ---- with Dassl: the release's node, recipes, command lines, scripts and checkpoints ------------------
RELEASE_RECIPE = "vit_b16_ep100_ctxv1"
# the release's scripts/base2new_train.sh options, unchanged
RELEASE_OPTIONS = ["TRAINER.COOP.N_CTX", "4", "TRAINER.COOP.CSC", "False", "TRAINER.COOP.W", "8.0",
                   "TRAINER.COOP.CLASS_TOKEN_POSITION", "end"]


def settings_for(trainer, recipe=None, *options):
    """The settings `trainer` reads from a config built as train.py builds it."""
    import train
    from dassl.engine import TRAINER_REGISTRY
    argv = ["--trainer", trainer, "--dataset-config-file", os.path.join(ROOT, "configs/datasets/caltech101.yaml")]
    if recipe:
        argv += ["--config-file", os.path.join(ROOT, "configs/trainers", trainer, f"{recipe}.yaml")]
    cfg = train.setup_cfg(train.build_parser().parse_args(argv + list(options)))
    trainer_class = TRAINER_REGISTRY.get(trainer)
    return trainer_class.settings_from(cfg), trainer_class.precision_of(cfg)


@requires_dassl
def test_the_releases_yaml_and_command_line_read_coops_node():
    """TRAINER.COOP.* with W and the bool CTX_INIT of the release's YAML, unchanged; CoOp reads the
    same node with its own defaults and its own meaning of CTX_INIT (words)."""
    assert settings_for("KgCoOp", RELEASE_RECIPE, *RELEASE_OPTIONS) == (
        KgCoOpSettings(n_ctx=4, csc=False, ctx_init="a photo of a", class_token_position="end", w=8.0), "fp16")
    assert settings_for("KgCoOp") == (KgCoOpSettings(), "fp16") and KgCoOpSettings().w == 8.0
    assert settings_for("KgCoOp", None, "TRAINER.COOP.CTX_INIT", "False", "TRAINER.COOP.W", "1.0")[0] == \
        KgCoOpSettings(ctx_init="", w=1.0)
    assert settings_for("CoOp") == (CoOpSettings(), "fp16")
    assert settings_for("CoOp", "vit_b16_ctxv1", "TRAINER.COOP.N_CTX", "8")[0] == CoOpSettings(n_ctx=8,
                                                                                               ctx_init="a photo of a")
    from vlprompt.errors import UserError
    with pytest.raises(UserError, match=r"TRAINER\.COOP\.CTX_INIT=True is invalid: expected str"):
        settings_for("CoOp", None, "TRAINER.COOP.CTX_INIT", "True")  # only KgCoOp knows the release's switch
    with pytest.raises(UserError, match=r"TRAINER\.COOP\.W=-1\.0 is invalid: must be in \[0, inf\]"):
        settings_for("KgCoOp", None, "TRAINER.COOP.W", "-1.0")


@pytest.fixture(scope="module")
def kgcoop_run(workspace, tmp_path_factory):
    """`bash scripts/kgcoop/base2new_train.sh caltech101 1` and base2new_test.sh (the default
    recipe is the release's YAML) with the release's options and the tiny CLIP's, 2 epochs."""
    output = tmp_path_factory.mktemp("kgcoop_output")
    env = script_env(workspace, output)
    options = tiny_options(workspace, "COOP", "OPTIM.MAX_EPOCH", "2", "DATALOADER.TRAIN_X.BATCH_SIZE", "4",
                           *RELEASE_OPTIONS)
    trained = run_script(workspace, env, "kgcoop/base2new_train.sh", "caltech101", "1", options=options)
    tested = run_script(workspace, env, "kgcoop/base2new_test.sh", "caltech101", "1", options=options)
    run_dir = output / f"base2new/train_base/caltech101/shots_16/KgCoOp/{RELEASE_RECIPE}/seed1"
    return options, trained.stdout, tested.stdout, run_dir


@requires_dassl
def test_release_recipe_trains_and_tests_through_the_scripts(kgcoop_run):
    _, trained, tested, run_dir = kgcoop_run
    assert ("KgCoOp: KgCoOpSettings(n_ctx=4, csc=False, ctx_init='a photo of a', class_token_position='end', "
            "w=8.0)") in trained
    assert "Class text templates: ['a photo of a {}.']" in trained  # Caltech101's in the release's table
    assert re.search(r"loss_kg [\d.]+", trained) and "Finish training" in trained
    assert sorted(p.name for p in (run_dir / "prompt_learner").iterdir()) == ["checkpoint", "model.pth.tar-2"]
    state = torch.load(run_dir / "prompt_learner" / "model.pth.tar-2", weights_only=True)["state_dict"]
    assert list(state) == ["ctx"] and state["ctx"].shape == (4, 64)
    assert "SUBSAMPLE_CLASSES: new" in tested and len(accuracies(tested)) == 1


@requires_dassl
def test_release_checkpoint_evaluates_as_our_own(kgcoop_run, workspace, tmp_path):
    """Our last checkpoint written in the release's layout (its prompt_learner state dict, fp16 as
    its default PREC saves it, a pickled scheduler) evaluates through the release's test command
    line (--model-dir --load-epoch --eval-only) as ours does, once trusted."""
    options, _, _, run_dir = kgcoop_run
    ours = torch.load(run_dir / "prompt_learner" / "model.pth.tar-2", weights_only=True)["state_dict"]
    exact = release_layout(ours["ctx"], dtype=torch.float32)  # fp32: the same numbers as ours
    write_release_checkpoint(tmp_path / "release" / "prompt_learner" / "model.pth.tar-2", exact, 2)
    new = [*options, "DATASET.NUM_SHOTS", "16", "DATASET.SUBSAMPLE_CLASSES", "new"]

    def evaluate(model_dir, out, *extra):
        return run(method_command(workspace, "KgCoOp", RELEASE_RECIPE, tmp_path / out, [*new, *extra],
                                  ["--model-dir", str(model_dir), "--load-epoch", "2", "--eval-only"]), expect_ok=False)

    refused = evaluate(tmp_path / "release", "refused")
    assert refused.returncode == 2 and "MODEL.TRUST_RELEASE_CHECKPOINT" in refused.stderr
    converted = evaluate(tmp_path / "release", "converted", "MODEL.TRUST_RELEASE_CHECKPOINT", "True")
    assert converted.returncode == 0, converted.stderr[-2000:]
    assert "is a checkpoint of the official release: converting its key names" in converted.stdout
    direct = evaluate(run_dir, "direct")
    assert accuracies(converted.stdout) == accuracies(direct.stdout) and len(accuracies(direct.stdout)) == 1
