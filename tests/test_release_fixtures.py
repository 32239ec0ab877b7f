"""The numbers frozen from the official releases (tests/fixtures/releases, see its README.md):
loadable without unpickling code, rebuilt from their seeds, consistent with the releases' own
formulas, and reproduced by our unmodified-CLIP base (vlprompt.clip.encoders) and our EdgeCNN.
Every fixture found there (helpers.ALL_FIXTURES, by pattern) is checked by the generic tests; a
new method's `<method>.pt` needs no edit here.

Tolerances: a logit is exp(logit_scale) * cos, so fp32 rounding anywhere in the towers moves it
by a few ulps of exp(logit_scale) (14.3 here). LOGIT_TOL = 8 ulps of that scale (1.4e-5) covers
reordered sums in another kernel or in our shortcuts (measured <= 1.7e-6) and stays 3x below the
smallest effect of the releases' fp16 casts (4.0e-5), so a test can tell the two apart.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from helpers import (ALL_FIXTURES, CLIP_METHODS, FIXTURE_DIR, generator, load_fixture, release_description_module,
                     release_state)

EPS32 = torch.finfo(torch.float32).eps
LOGIT_SCALE = 1 / 0.07  # exp of CLIP's initial logit_scale, which the random tiny CLIP keeps
LOGIT_TOL = 8 * EPS32 * LOGIT_SCALE
MODES = ("as_shipped", "no_casts")


def cases(methods=CLIP_METHODS, where=lambda case: True):
    """(method, case) of every case holding the release's numbers."""
    return [(m, name) for m in methods for name, case in load_fixture(m)["cases"].items()
            if "results" in case and where(case)]


def cross_entropy_only(case) -> bool:
    """A release whose loss is more than the cross-entropy records its terms (loss_terms)."""
    return "loss_terms" not in case["results"]["as_shipped"]


def loss_tol(loss: torch.Tensor, logits: torch.Tensor) -> float:
    """Cross-entropy of the same fp32 logits: a few ulps of the largest magnitude involved."""
    return 8 * EPS32 * (abs(float(loss)) + float(logits.abs().max()))


# ---- the files ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ALL_FIXTURES)
def test_fixture_loads_without_pickled_code_and_stays_small(method):
    path = os.path.join(FIXTURE_DIR, f"{method}.pt")
    assert os.path.getsize(path) <= generator().MAX_FIXTURE_BYTES
    fixture = load_fixture(method)  # weights_only=True
    assert fixture["method"] == method and len(fixture["release_commit"]) >= 7


def test_inputs_are_rebuilt_from_their_seeds():
    for method in CLIP_METHODS:
        inputs = load_fixture(method)["inputs"]
        assert torch.equal(inputs["images"], generator().fixture_images())
        assert inputs["labels"].tolist() == generator().LABELS
        assert inputs["classnames"] == generator().CLASSNAMES


@pytest.mark.parametrize("method,name", cases())
def test_trainable_state_is_rebuilt_from_its_seed(method, name):
    case = load_fixture(method)["cases"][name]
    state = release_state(case)  # raises when a stored tensor or a recorded hash disagrees
    grads = case["results"]["as_shipped"]["grads"]
    assert set(state) == set(case["trainable_spec"]) == set(grads["norms"]) | set(grads["none"])


@pytest.mark.parametrize("method,name", cases())
def test_which_trainable_tensors_get_gradients(method, name):
    grads = load_fixture(method)["cases"][name]["results"]["no_casts"]["grads"]
    if name == "depth9_on_3_layers":  # PROMPT_DEPTH 9 makes 8 deep prompts; 3 layers use 2
        unused = {f"prompt_learner.compound_prompts_text.{k}" for k in range(2, 8)} | {
            f"prompt_learner.compound_prompt_projections.{k}.{p}" for k in range(2, 8) for p in ("weight", "bias")}
        assert set(grads["none"]) == unused
    else:
        assert grads["none"] == [] and grads["zero"] == []
    assert grads["nonzero"]


# ---- the releases' own formulas ------------------------------------------------------------------
@pytest.mark.parametrize("method,name", cases(where=cross_entropy_only))
@pytest.mark.parametrize("mode", MODES)
def test_loss_is_cross_entropy_of_the_logits(method, name, mode):
    result = load_fixture(method)["cases"][name]["results"][mode]
    labels = load_fixture(method)["inputs"]["labels"]
    loss = F.cross_entropy(result["train_logits"], labels)
    assert abs(float(loss) - float(result["loss"])) <= loss_tol(loss, result["train_logits"])
    # no dropout anywhere: the eval forward gives the training forward's logits
    torch.testing.assert_close(result["eval_logits"], result["train_logits"], rtol=0, atol=LOGIT_TOL)


@pytest.mark.parametrize("method,name", cases(where=lambda case: not cross_entropy_only(case)))
@pytest.mark.parametrize("mode", MODES)
def test_recorded_loss_terms_make_the_loss(method, name, mode):
    """The convention for a release's loss terms: `loss` is the loss forward_backward returned and
    `loss_ce`, where recorded, the cross-entropy of the training logits."""
    result = load_fixture(method)["cases"][name]["results"][mode]
    terms, logits = result["loss_terms"], result["train_logits"]
    assert float(terms["loss"]) == float(result["loss"])
    if "loss_ce" in terms:
        loss = F.cross_entropy(logits, load_fixture(method)["inputs"]["labels"])
        assert abs(float(loss) - float(terms["loss_ce"])) <= loss_tol(loss, logits)


@pytest.mark.parametrize("mode", MODES)
def test_promptsrc_loss_terms(mode):
    fixture = load_fixture("promptsrc")
    case = fixture["cases"]["depth3"]
    result, labels, config = case["results"][mode], fixture["inputs"]["labels"], case["config"]
    logits, terms = result["train_logits"], result["loss_terms"]
    fixed = case["fixed_embeddings_raw"] / case["fixed_embeddings_raw"].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(result["fixed_embeddings"], fixed, rtol=0, atol=4 * EPS32)
    # the frozen zero-shot logits use fp16-rounded text features as shipped (trainers/promptsrc.py:205)
    text = fixed.half().float() if mode == "as_shipped" else fixed
    zero_shot = torch.tensor(LOGIT_SCALE, dtype=torch.float32) * result["zero_shot_features"] @ text.t()
    torch.testing.assert_close(result["zero_shot_logits"], zero_shot, rtol=0, atol=LOGIT_TOL)
    expected = {
        "loss_ce": F.cross_entropy(logits, labels),
        "loss_scl_text": F.l1_loss(result["text_features"], result["fixed_embeddings"]) * config["TEXT_LOSS_WEIGHT"],
        "loss_scl_image": F.l1_loss(result["image_features"], result["zero_shot_features"]) * config["IMAGE_LOSS_WEIGHT"],
        # KL(zero-shot || prompted), summed and divided by batch * classes
        "L_SCL_logits": F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(result["zero_shot_logits"], dim=1),
                                 reduction="sum", log_target=True) / logits.numel(),
    }
    for name, value in expected.items():
        assert abs(float(value) - float(terms[name])) <= loss_tol(value, logits), name
    total = sum(float(terms[n]) for n in expected)
    assert abs(total - float(terms["loss"])) <= loss_tol(terms["loss"], logits)
    assert float(terms["loss"]) == float(result["loss"])


def test_promptsrc_gpa_weights_and_aggregate():
    case = load_fixture("promptsrc")["cases"]["depth3"]
    gpa, config = case["gpa"], case["config"]
    epochs = case["optim"]["MAX_EPOCH"]
    mean, std = config["GPA_MEAN"], config["GPA_STD"]
    density = [math.exp(-0.5 * ((e - mean) / std) ** 2) for e in range(1, epochs + 1)]
    weights = torch.tensor([d / sum(density) for d in density], dtype=torch.float64)
    torch.testing.assert_close(gpa["weights"], weights, rtol=1e-12, atol=0)
    for seed, stored in zip(gpa["epoch_seeds"], gpa["epoch_states"]):
        assert set(stored) == set(case["trainable_spec"])
        assert all(torch.equal(generator().seeded_normal(k, v.shape, seed), v) for k, v in stored.items())
    # the release's arithmetic: fp32 state * float64 weight (an fp32 product), summed epoch by epoch
    for key, aggregated in gpa["aggregated"].items():
        total = None
        for weight, state in zip(gpa["weights"].tolist(), gpa["epoch_states"]):
            total = state[key] * weight if total is None else total + state[key] * weight
        assert torch.equal(total, aggregated), key
    # it weights the whole state dict: frozen entries move by rounding only
    assert 0 < gpa["frozen_max_drift"] <= 4 * EPS32


def test_cocoop_logits_do_not_depend_on_the_batch():
    for case in load_fixture("cocoop")["cases"].values():
        assert case["batch_independence_max_abs_diff"] <= LOGIT_TOL


@pytest.mark.parametrize("method,name", cases())
def test_casts_change_numbers_only_where_the_release_casts(method, name):
    results = load_fixture(method)["cases"][name]["results"]
    shipped, bare = results["as_shipped"], results["no_casts"]
    difference = float((shipped["eval_logits"] - bare["eval_logits"]).abs().max())
    if shipped["cast_sites"]:
        assert difference > 2 * LOGIT_TOL  # large enough for a test to see which one it matches
    else:
        assert difference == 0


@pytest.mark.parametrize("method,name", cases())
def test_trainable_tensors_are_in_the_release_checkpoints(method, name):
    case = load_fixture(method)["cases"][name]
    folder = case["registered_model"]  # Dassl saves each registered model in a folder of its name
    for layout in (case["checkpoint_fp32"], case["checkpoint_fp16"]):
        assert layout["folders"] == [folder]
        assert f"model.pth.tar-{case['optim']['MAX_EPOCH']}" in layout["files"][folder]
        assert "model-best.pth.tar" in layout["files"][folder]
        checkpoint = layout[folder]
        assert checkpoint["top_level_keys"] == ["state_dict", "epoch", "optimizer", "scheduler", "val_result"]
        # Dassl pickles the scheduler its warm-up wraps ("successor"); without warm-up (MMA's recipes)
        # the checkpoint holds plain values and loads with weights_only=True
        warm_up = case["optim"]["WARMUP_EPOCH"] > 0
        assert ("successor" in checkpoint["scheduler_state"]) == warm_up
        assert ("lr_scheduler" in checkpoint["weights_only_error"]) == warm_up
        shapes = {key: shape for key, shape, _ in checkpoint["state_dict"]}
        for key, entry in case["trainable_spec"].items():
            assert shapes[key] == entry["shape"], key


def test_cmpa_checkpoint_holds_the_shared_prompt_attention_under_every_block():
    case = load_fixture("cmpa")["cases"]["main_sh"]
    assert case["config"]["PS"] is True and case["config"]["FUSING"] == "mean"
    checkpoint = case["checkpoint_fp16"]["MultiModalPromptLearner"]
    keys = [key for key, _, _ in checkpoint["state_dict"]]
    blocks = {key.split(".")[2] for key in keys if ".prompt_attn." in key}
    assert blocks == {"0", "1", "2"}  # one module, saved once per layer of the tiny CLIP
    assert set(case["trainable_keys"]) <= set(keys)
    assert all(".prompt_attn." not in key or key.startswith("encoder.resblocks.0.")
               for key in case["trainable_keys"])  # named_parameters lists the shared module once


# ---- our base reproduces the releases ---------------------------------------------------------
def prompts_of(method: str, state: dict, depth: int, rounded):
    """(text prompts, image prompts) per layer, as the release builds them; `rounded` is applied
    where the release casts with .half()."""
    if method == "coop":
        return [state["ctx"]], []
    if method in ("ivlp", "promptsrc"):
        text = [state["prompt_learner.ctx"]] + [
            rounded(state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"]) for i in range(1, depth)]
        if "image_encoder.VPT" not in state:  # language-only
            return text, []
        image = [rounded(state["image_encoder.VPT"])] + [
            rounded(state[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"]) for i in range(1, depth)]
        return text, image

    def linear(x, name):
        return x @ state[f"{name}.weight"].t() + state[f"{name}.bias"]

    deep = [state[f"prompt_learner.compound_prompts_text.{i}"] for i in range(depth - 1)]
    text = [state["prompt_learner.ctx"]] + [rounded(p) for p in deep]
    image = [rounded(linear(state["prompt_learner.ctx"], "prompt_learner.proj"))] + [
        rounded(linear(p, f"prompt_learner.compound_prompt_projections.{i}")) for i, p in enumerate(deep)]
    return text, image


BASE_CASES = [(m, n) for m, n in cases(("coop", "ivlp", "maple", "promptsrc")) if n != "csc_middle_random"]


@pytest.mark.parametrize("method,name", BASE_CASES)
@pytest.mark.parametrize("mode", MODES)
def test_prompted_clip_base_reproduces_the_release_logits(release_clip, method, name, mode):
    from vlprompt.clip.encoders import PromptedImageEncoder, PromptedTextEncoder
    fixture = load_fixture(method)
    case = fixture["cases"][name]
    rounded = (lambda t: t.half().float()) if mode == "as_shipped" else (lambda t: t)
    text_prompts, image_prompts = prompts_of(method, release_state(case), 3, rounded)
    with torch.no_grad():
        text = PromptedTextEncoder(release_clip)(case["tokenized_prompts"], text_prompts)
        image = PromptedImageEncoder(release_clip)(fixture["inputs"]["images"], image_prompts)
        text, image = F.normalize(text, dim=-1), F.normalize(image, dim=-1)
        logits = release_clip.logit_scale.exp() * image @ text.t()
    results = case["results"]
    torch.testing.assert_close(logits, results[mode]["eval_logits"], rtol=0, atol=LOGIT_TOL)
    other = results["no_casts" if mode == "as_shipped" else "as_shipped"]["eval_logits"]
    if results["as_shipped"]["cast_sites"]:
        assert float((logits - other).abs().max()) > LOGIT_TOL


def test_our_edgecnn_reproduces_the_release_from_its_state_dict_in_order():
    from vlprompt.methods.edgecnn import EdgeCNN
    fixture = load_fixture("edgecnn")
    release = fixture["t7"]["FER2013"]["state_dict"]
    ours = EdgeCNN()
    names = list(ours.state_dict())
    # the same layers in the same order: conv, BN, conv, BN per dense layer
    assert [shape for _, shape, _ in release] == [list(v.shape) for v in ours.state_dict().values()]
    assert fixture["seeded"]["parameter_count"] == sum(p.numel() for p in ours.parameters())
    release_values = release_description_module("edgecnn").seeded_state(release)
    ours.load_state_dict({name: release_values[key] for name, (key, _, _) in zip(names, release)})
    with torch.no_grad():
        logits = ours.eval()(fixture["seeded"]["images"])
    expected = fixture["seeded"]["eval_logits"]
    # fp32 convolutions summed in another order: 16 ulps of the largest logit (measured: 2 ulps)
    torch.testing.assert_close(logits, expected, rtol=0, atol=16 * EPS32 * float(expected.abs().max()))


def test_edgecnn_t7_format_and_label_order():
    fixture = load_fixture("edgecnn")
    for dataset in ("FER2013", "RAF"):
        t7 = fixture["t7"][dataset]
        assert t7["top_level_keys"] == ["net", "best_PrivateTest_acc", "best_PrivateTest_acc_epoch"]
        assert t7["net_type"] == "OrderedDict" and t7["matches_release_model_keys"]
        assert t7["state_dict"][-2][:2] == ["classifier.weight", [7, 152]]
    assert fixture["label_orders"]["training_order"] == ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise",
                                                         "Neutral"]
