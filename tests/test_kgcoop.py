"""KgCoOp: its loss term by hand and against the release's numbers, which tensors learn, batch
independence, training, the release's template table, CTX_INIT switch and checkpoints, and its
recipes, scripts and command lines through Dassl."""
import os
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, requires_dassl
from helpers import (EPS32, FEATURE_TOL, LOGIT_TOL, accuracies, assert_batch_independent, fixture_clip, grad_tol,
                     half_and_fp32_logits, half_tolerance, images_for, load_fixture, loss_tol, method_command,
                     release_state, run, run_script, script_env, tiny_options, train_losses,
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


# ---- the release's numbers (tests/fixtures/releases/kgcoop.pt) -------------------------------------------
RELEASE_CASES = list(load_fixture("kgcoop")["cases"])


def release_model(name, class_token_position="end"):
    """Our KgCoOp on the fixtures' CLIP with the release's settings and trainable state of case
    `name` (loaded through the checkpoint converter, from the release's own checkpoint keys), and
    frozen features of the release's template for the fixture's dataset. The release builds the
    `end` layout whatever CLASS_TOKEN_POSITION says."""
    fixture = load_fixture("kgcoop")
    case = fixture["cases"][name]
    config, classes = case["config"], fixture["inputs"]["classnames"]
    settings = KgCoOpSettings(n_ctx=config["N_CTX"], csc=config["CSC"], w=config["W"],
                              ctx_init=release_ctx_init(config["CTX_INIT"], ""),
                              class_token_position=class_token_position)
    model = KgCoOp(fixture_clip(), settings, classes, frozen_features(fixture_clip(), classes, "OxfordPets"))
    state = {key: torch.zeros(shape, dtype=getattr(torch, dtype))
             for key, shape, dtype in case["checkpoint_fp32"]["prompt_learner"]["state_dict"]}
    state.update(release_state(case))
    model.prompt_learner.load_state_dict(convert_release_state_dict(state))
    return model, fixture, case


def our_numbers(model, fixture):
    images, labels = fixture["inputs"]["images"], fixture["inputs"]["labels"]
    with torch.no_grad(), model.eval().evaluation():
        eval_logits = model(images)
    loss, train_logits, parts = model.train().loss(images, labels)
    loss.backward()
    return eval_logits, train_logits.detach(), loss.detach(), parts


@pytest.mark.parametrize("name", RELEASE_CASES)
def test_logits_loss_terms_and_gradients_equal_the_release(name):
    """Its YAML + script command line (CTX_INIT True, W 8) and a random class-specific context (W 1):
    eval and train logits, CE, the knowledge term, the loss, the gradient of the one tensor it
    trains, and both sides' class features."""
    model, fixture, case = release_model(name)
    assert torch.equal(model.token_ids, case["tokenized_prompts"]) and model.prompt_prefix == case["prompt_prefix"]
    assert case["frozen_template"] == hand_crafted_template("OxfordPets") and case["w"] == model.settings.w
    eval_logits, train_logits, loss, parts = our_numbers(model, fixture)
    released = case["results"]["no_casts"]
    shipped = case["results"]["as_shipped"]  # the release casts nothing to fp16 during a step
    assert shipped["cast_sites"] == {} and torch.equal(shipped["eval_logits"], released["eval_logits"])
    terms = released["loss_terms"]
    torch.testing.assert_close(eval_logits, released["eval_logits"], rtol=0, atol=LOGIT_TOL)
    torch.testing.assert_close(train_logits, released["train_logits"], rtol=0, atol=LOGIT_TOL)
    assert abs(parts["loss_ce"] - float(terms["loss_ce"])) <= loss_tol(terms["loss_ce"], released["train_logits"])
    assert abs(parts["loss_kg"] - float(terms["score"])) <= 8 * EPS32
    assert abs(float(loss) - float(terms["loss"])) <= loss_tol(terms["loss"], released["train_logits"])
    assert float(terms["loss"]) == pytest.approx(float(terms["loss_ce"]) + case["w"] * float(terms["score"]), abs=1e-6)
    grads = {n: p.grad for n, p in model.prompt_learner.named_parameters() if p.grad is not None}
    assert {f"prompt_learner.{n}" for n in grads} == set(case["trainable_requires_grad_names"])
    assert released["grads"]["nonzero"] == ["ctx"] and set(grads) == {"ctx"}
    expected = released["grads"]["values"]["ctx"]
    torch.testing.assert_close(grads["ctx"], expected, rtol=0, atol=grad_tol(released["grads"]["values"], ulps=128))
    with torch.no_grad():
        text = F.normalize(model.encode_classes(), dim=-1)
    torch.testing.assert_close(text, released["text_features"], rtol=0, atol=FEATURE_TOL)
    torch.testing.assert_close(model.frozen_text_features, released["text_features_old"], rtol=0, atol=FEATURE_TOL)


def test_the_ctx_init_switch_starts_from_the_releases_words():
    case = load_fixture("kgcoop")["cases"]["ctxv1_w8"]
    assert case["config"]["CTX_INIT"] is True and case["n_ctx"] == 4
    classes = load_fixture("kgcoop")["inputs"]["classnames"]
    model = KgCoOp(fixture_clip(), KgCoOpSettings(n_ctx=16, csc=True, ctx_init=release_ctx_init(True, "")), classes,
                   frozen_features(fixture_clip(), classes))
    assert torch.equal(model.prompt_learner.ctx.detach(), case["initial_state"]["ctx"])


def test_the_release_ignores_class_token_position_and_we_do_not():
    """The release's `middle` case is its `end` layout; ours builds CoOp's middle layout."""
    assert load_fixture("kgcoop")["cases"]["csc_random_w1_middle"]["config"]["CLASS_TOKEN_POSITION"] == "middle"
    model, fixture, case = release_model("csc_random_w1_middle", class_token_position="middle")
    eval_logits = our_numbers(model, fixture)[0]
    assert float((eval_logits - case["results"]["no_casts"]["eval_logits"]).abs().max()) > 100 * LOGIT_TOL


def test_the_releases_frozen_features_are_fp16_computations_of_ours():
    """As shipped, the release encodes the hand-crafted prompts in fp16 (its fixture's fp32 fix
    encodes them again in fp32): within fp16 rounding of ours, and visibly different."""
    model, fixture, case = release_model("ctxv1_w8")
    difference = float((case["frozen_text_features_fp16"] - model.frozen_text_features).abs().max())
    assert FEATURE_TOL < difference < 1e-3
    # the term as shipped: our model given the release's fp16 features, against its text features
    model.set_classes(fixture["inputs"]["classnames"], case["frozen_text_features_fp16"])
    released = case["results"]["no_casts"]
    shipped = 1 - F.cosine_similarity(released["text_features"], F.normalize(case["frozen_text_features_fp16"], dim=-1),
                                      dim=1, eps=1e-7).mean()
    assert abs(our_numbers(model, fixture)[3]["loss_kg"] - float(shipped)) <= 8 * EPS32
    assert abs(float(shipped) - float(released["loss_terms"]["score"])) > 1e-6


@pytest.mark.parametrize("layout", ["checkpoint_fp32", "checkpoint_fp16"])
def test_the_releases_checkpoint_keys_convert_to_our_context(layout):
    """Every key the release's save path writes (recorded in the fixture), in its dtype: only ctx
    is kept, widened to fp32; the file needs full unpickling (its scheduler)."""
    model, _, case = release_model("ctxv1_w8")
    checkpoint = case[layout]["prompt_learner"]
    assert case["registered_model"] == get_method("KgCoOp").checkpoint_folder == "prompt_learner"
    assert checkpoint["weights_only_error"] and {"state_dict", "epoch", "optimizer", "scheduler"} <= set(
        checkpoint["top_level_keys"])
    ctx = release_state(case)["ctx"]
    state = {key: (ctx if key == "ctx" else torch.zeros(shape)).to(getattr(torch, dtype))
             for key, shape, dtype in checkpoint["state_dict"]}
    assert is_release_state_dict(state)
    converted = convert_release_state_dict(state)
    assert set(converted) == {"ctx"} and torch.equal(converted["ctx"], state["ctx"].float())
    model.prompt_learner.load_state_dict(converted)


# ---- behaviour --------------------------------------------------------------------------------------
def test_eval_logits_do_not_depend_on_batch_size_or_order(tiny_clip):
    model = build(tiny_clip, csc=True, class_token_position="front")
    assert_batch_independent(model, images_for(model, batch=7))
    # the release too (its eval logits of the batch against one image at a time)
    assert load_fixture("kgcoop")["cases"]["csc_random_w1_middle"]["batch_independence_max_abs_diff"] < LOGIT_TOL


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
    """Our last checkpoint written with every key and dtype the release's save path writes in fp32
    (recorded in its fixture; the class-bound buffers and the unused modules as zeros) and a pickled
    scheduler evaluates through the release's test command line (--model-dir --load-epoch
    --eval-only) as ours does, once trusted."""
    options, _, _, run_dir = kgcoop_run
    ours = torch.load(run_dir / "prompt_learner" / "model.pth.tar-2", weights_only=True)["state_dict"]
    recorded = load_fixture("kgcoop")["cases"]["ctxv1_w8"]["checkpoint_fp32"]["prompt_learner"]["state_dict"]
    release = {key: ours["ctx"] if key == "ctx" else torch.zeros(shape, dtype=getattr(torch, dtype))
               for key, shape, dtype in recorded}
    assert sorted(release) == sorted(release_layout(ours["ctx"]))
    write_release_checkpoint(tmp_path / "release" / "prompt_learner" / "model.pth.tar-2", release, 2)
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
