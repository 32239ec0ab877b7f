"""TCP: where its class-aware tokens enter the text encoder, its loss, the release's numbers on known
weights, training, checkpoints, and the release's config node, YAML and command lines."""
import pytest
import torch
import torch.nn.functional as F

from conftest import requires_dassl
from helpers import (EPS32, FEATURE_TOL, LOGIT_TOL, accuracies, assert_batch_independent, fixture_clip, grad_tol,
                     half_and_fp32_logits, half_tolerance, images_for, load_fixture, loss_tol, method_command,
                     release_state, run, script_env, tiny_options, train_losses, write_release_checkpoint)
from vlprompt.clip.class_features import frozen_class_features
from vlprompt.clip.encoders import PromptedTextEncoder
from vlprompt.methods.settings import ConfigError
from vlprompt.methods.tcp import (RELEASE_CHECKPOINT, TCP, TCPSettings, class_prompt, frozen_template, kg_regulariser,
                                  release_ctx_init)

CLASSES = ["dog", "sports_car", "oak tree", "violin", "golden retriever"]


def frozen(clip_model, classes=CLASSES, dataset="OxfordPets"):
    return frozen_class_features(PromptedTextEncoder(clip_model), classes, templates=(frozen_template(dataset),))


def build(clip_model, classes=CLASSES, seed=0, dataset="OxfordPets", **settings):
    torch.manual_seed(seed)
    settings = {"tke_layer": 2, "class_template": class_prompt(dataset), **settings}
    model = TCP(clip_model, TCPSettings(**settings), classes, frozen(clip_model, classes, dataset))
    with torch.no_grad():  # a meta-net whose tokens are of the size of CLIP's hidden states
        for name, p in model.prompt_learner.meta_net.named_parameters():
            p.normal_(0, 0.5 if name == "linear1.weight" else 0.2)
    return model


# ---- the release's numbers (tests/fixtures/releases/tcp.pt, made by tcp_release.py) -------------------
CASES = list(load_fixture("tcp")["cases"])  # script (OxfordPets' words, random context), ctx_init_w8 (UCF101's)


def release_model(name):
    """Our TCP on the fixtures' CLIP with the release's settings, frozen-feature template and
    trainable state (through the checkpoint converter) of case `name`."""
    fixture = load_fixture("tcp")
    case = fixture["cases"][name]
    dataset, config, classnames = case["template_dataset"], case["config"], fixture["inputs"]["classnames"]
    settings = TCPSettings(n_ctx=config["N_CTX"], csc=config["CSC"],
                           ctx_init=release_ctx_init(config["CTX_INIT"], dataset),
                           class_token_position=config["CLASS_TOKEN_POSITION"], w=config["W"],
                           tke_layer=case["tke_layer"], class_template=class_prompt(dataset))
    model = TCP(fixture_clip(), settings, classnames, frozen(fixture_clip(), classnames, dataset))
    initial = model.prompt_learner.ctx.detach().clone()
    state = {**release_state(case), "token_prefix": torch.zeros(6, 1, 512), "token_suffix": torch.zeros(6, 72, 512)}
    model.prompt_learner.load_state_dict(RELEASE_CHECKPOINT.convert(state))
    return model, fixture, case, initial


@pytest.mark.parametrize("name", CASES)
def test_logits_loss_terms_and_gradients_equal_the_release(name):
    model, fixture, case, _ = release_model(name)
    images, labels = fixture["inputs"]["images"], fixture["inputs"]["labels"]
    assert torch.equal(model.token_ids, case["tokenized_prompts"])
    released = case["results"]["no_casts"]
    assert case["results"]["as_shipped"]["cast_sites"] == {}  # TCP calls no Tensor.half
    torch.testing.assert_close(model.frozen_text_features, released["frozen_text_features"], rtol=0, atol=FEATURE_TOL)
    with torch.no_grad(), model.eval().evaluation():
        logits = model(images)
    loss, train_logits, parts = model.train().loss(images, labels)
    loss.backward()
    torch.testing.assert_close(logits, released["eval_logits"], rtol=0, atol=LOGIT_TOL)
    torch.testing.assert_close(train_logits.detach(), released["train_logits"], rtol=0, atol=LOGIT_TOL)
    terms, tol = released["loss_terms"], loss_tol(released["loss"], logits)
    assert abs(loss.item() - float(released["loss"])) <= tol
    assert abs(parts["loss_ce"] - float(terms["loss_ce"])) <= tol
    assert abs(parts["loss_kg"] - 8.0 * float(terms["score"])) <= 8 * EPS32 * 8.0  # the release's literal 8.0
    with torch.no_grad():
        text = F.normalize(model.encode_classes(), dim=-1)
    torch.testing.assert_close(text, released["text_features"], rtol=0, atol=FEATURE_TOL)
    # exactly the release's trainables get gradients, equal within a few ulps of the largest
    grads = {n: p.grad for n, p in model.prompt_learner.named_parameters()}  # the release's names under its model
    assert sorted(grads) == sorted(released["grads"]["nonzero"])
    assert sorted(f"prompt_learner.{n}" for n in grads) == case["trainable_requires_grad_names"]
    assert released["grads"]["none"] == released["grads"]["zero"] == []
    tol = grad_tol(released["grads"]["values"], ulps=64)
    for key, expected in released["grads"]["values"].items():
        torch.testing.assert_close(grads[key], expected, rtol=0, atol=tol, msg=key)
    for key, rows in released["grads"]["head_rows"].items():  # meta_net.linear2.weight [2048, 128]
        torch.testing.assert_close(grads[key][:8], rows, rtol=0, atol=tol, msg=key)


def test_the_comparison_sees_which_class_gets_which_tokens():
    """The fixture is not blind to the class-aware tokens: the tokens of other classes (the class
    features in reverse order) move the logits 250 times the tolerance."""
    model, fixture, _, _ = release_model("ctx_init_w8")
    learner = model.prompt_learner
    released = fixture["cases"]["ctx_init_w8"]["results"]["no_casts"]["eval_logits"]
    with torch.no_grad():
        mixed = model.text_encoder(model.token_ids, [learner.ctx, None, learner.class_aware_tokens(
            model.frozen_text_features.flip(0))])
        logits = model.logits(model.frozen_image_features(fixture["inputs"]["images"]), mixed)
    assert (logits - released).abs().max() > 250 * LOGIT_TOL


def test_release_initial_context_and_frozen_features():
    """CTX_INIT True: "a photo of a"'s embeddings, as the release; its frozen features, made by an fp16
    CLIP as shipped, differ from fp32 ones by fp16 rounding only."""
    model, _, case, initial = release_model("ctx_init_w8")
    assert torch.equal(initial, case["initial_state"]["ctx"]) and model.prompt_prefix == "a photo of a"
    shipped = case["frozen_text_features_fp16_clip"]
    difference = (shipped - model.frozen_text_features).abs().max()
    assert FEATURE_TOL < difference < 2.0 ** -9


@pytest.mark.parametrize("layout", ["checkpoint_fp32", "checkpoint_fp16"])
def test_release_checkpoint_layouts_convert_to_our_state(layout):
    """The state dict the release's save_model writes (fp32 and fp16 runs) converts to ours."""
    model, _, case, _ = release_model("script")
    entries = case[layout]["prompt_learner"]["state_dict"]
    release = {key: torch.zeros(shape, dtype=getattr(torch, dtype)) for key, shape, dtype in entries}
    assert case[layout]["folders"] == ["prompt_learner"] and RELEASE_CHECKPOINT.recognizes(release)
    converted = RELEASE_CHECKPOINT.convert(release)
    ours = model.prompt_learner.state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert all(v.dtype == torch.float32 for v in converted.values())


# ---- where the class-aware tokens enter ----------------------------------------------------------
def reference_text_features(clip_model, token_ids, ctx, class_aware, layer):
    """TCP's text side written out with CLIP's own transformer (sequence-first, 77x77 mask): ctx at
    positions 1..n of the embedded prompts, replaced by the class-aware tokens before `layer`."""
    n = ctx.shape[0]
    with torch.no_grad():
        x = clip_model.token_embedding(token_ids)
        x = torch.cat([x[:, :1], ctx.expand(len(token_ids), -1, -1), x[:, 1 + n:]], dim=1)
        x = (x + clip_model.positional_embedding).permute(1, 0, 2)
        for i, block in enumerate(clip_model.transformer.resblocks):
            if i == layer:
                x = torch.cat([x[:1], class_aware.permute(1, 0, 2), x[1 + n:]])
            x = block(x)
        x = clip_model.ln_final(x.permute(1, 0, 2))
        return x[torch.arange(len(token_ids)), token_ids.argmax(-1)] @ clip_model.text_projection


@pytest.mark.parametrize("layer", [1, 2])
@pytest.mark.parametrize("shortcuts", [True, False])
def test_class_aware_tokens_replace_the_context_states_before_their_layer(tiny_clip, layer, shortcuts):
    model = build(tiny_clip, tke_layer=layer)
    model.text_encoder.shared_prefix = model.text_encoder.cut_at_eot = shortcuts
    learner = model.prompt_learner
    with torch.no_grad():
        ours = model.encode_classes()
        class_aware = learner.class_aware_tokens(model.frozen_text_features)
    assert class_aware.shape == (len(CLASSES), 4, 64)
    expected = reference_text_features(tiny_clip, model.token_ids, learner.ctx.detach(), class_aware, layer)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    # the layer matters, and so do the tokens: the reference is not blind to either
    other = reference_text_features(tiny_clip, model.token_ids, learner.ctx.detach(), class_aware, 3 - layer)
    assert (ours - other).abs().max() > 1e-2
    plain = reference_text_features(tiny_clip, model.token_ids, learner.ctx.detach(), class_aware, layer=99)
    assert (ours - plain).abs().max() > 1e-2


def test_class_prompts_follow_the_release_templates(tiny_clip):
    """Placeholders for the context, then the dataset's words: "X X X X dog, a type of pet."."""
    from clip import clip as clip_api
    for dataset, words in [("OxfordPets", "{}, a type of pet."), ("UCF101", "person doing {}."),
                           ("StanfordCars", "{}, a type of car"), ("ToyObjects", "{}.")]:
        model = build(tiny_clip, dataset=dataset)
        expected = clip_api.tokenize([f"X X X X {words.format(c.replace('_', ' '))}" for c in CLASSES])
        assert torch.equal(model.token_ids, expected), dataset
    with_init = build(tiny_clip, ctx_init="a photo of a", n_ctx=16)
    assert with_init.n_ctx == 4 and with_init.prompt_prefix == "a photo of a"
    embedding = tiny_clip.token_embedding(clip_api.tokenize("a photo of a"))[0, 1:5]
    assert torch.equal(with_init.prompt_learner.ctx.detach(), embedding.detach())


# ---- loss -------------------------------------------------------------------------------------------
def test_loss_is_cross_entropy_plus_the_weighted_regulariser(tiny_clip):
    model = build(tiny_clip, kg_weight=3.0)
    images, labels = images_for(model, batch=5), torch.tensor([0, 1, 2, 3, 4])
    loss, logits, parts = model.loss(images, labels)
    with torch.no_grad():
        text = F.normalize(model.encode_classes(), dim=-1)
        expected_logits = model.logit_scale.exp() * model.frozen_image_features(images) @ text.t()
        cos = (text * model.frozen_text_features).sum(-1)
    torch.testing.assert_close(logits.detach(), expected_logits, rtol=0, atol=1e-5)
    ce = F.cross_entropy(expected_logits, labels)
    assert abs(parts["loss_ce"] - ce.item()) < 1e-5 and abs(parts["loss_kg"] - 3.0 * (1 - cos.mean().item())) < 1e-5
    assert abs(loss.item() - (parts["loss_ce"] + parts["loss_kg"])) < 1e-5 and parts["loss_kg"] > 1e-3
    assert model.settings.kg_weight == 3.0 and TCPSettings().kg_weight == 8.0  # the release's constant
    # frozen features themselves are at distance 0
    assert abs(kg_regulariser(model.frozen_text_features * 2.0, model.frozen_text_features).item()) < 1e-6


def test_w_has_no_effect_as_in_the_release(tiny_clip):
    images, labels = images_for(tiny_clip, batch=3), torch.tensor([0, 2, 4])
    one, eight = (build(tiny_clip, w=w).loss(images, labels) for w in (1.0, 8.0))
    assert one.loss.item() == eight.loss.item() and torch.equal(one.logits, eight.logits)


def test_gradients_reach_the_context_and_the_meta_net_only(tiny_clip):
    model = build(tiny_clip)
    model.loss(images_for(model, batch=3), torch.tensor([0, 2, 4]))[0].backward()
    grads = {name: p.grad for name, p in model.prompt_learner.named_parameters()}
    assert sorted(grads) == ["ctx", "meta_net.linear1.bias", "meta_net.linear1.weight", "meta_net.linear2.bias",
                             "meta_net.linear2.weight"]
    assert all(g is not None and g.abs().max() > 0 for g in grads.values())
    assert all(p.grad is None for p in tiny_clip.parameters())


# ---- behaviour --------------------------------------------------------------------------------------
def test_evaluation_does_not_depend_on_batch_size_or_order(tiny_clip):
    model = build(tiny_clip)
    assert_batch_independent(model, images_for(model, batch=7))


def test_a_short_training_run_lowers_the_loss(tiny_clip):
    model = build(tiny_clip)
    images, labels = images_for(model, batch=5), torch.arange(5)
    losses = train_losses(model, images, labels, steps=15, lr=0.01)
    assert min(losses[-3:]) < 0.8 * losses[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_agree_with_fp32(tiny_clip, dtype):
    frozen_features = frozen(tiny_clip)

    def make(clip_model):
        torch.manual_seed(0)
        return TCP(clip_model, TCPSettings(tke_layer=2), CLASSES, frozen_features)

    got, expected, scale = half_and_fp32_logits(make, tiny_clip, dtype)
    assert got.dtype == torch.float32 and (got - expected).abs().max() < half_tolerance(dtype, scale)


def test_new_classes_get_class_aware_tokens_from_their_own_features(tiny_clip):
    model = build(tiny_clip)
    new = ["tulip", "yacht"]
    with pytest.raises(ValueError, match="frozen CLIP's class text features"):
        model.set_classes(new)
    model.set_classes(new, frozen(tiny_clip, new))
    with torch.no_grad():
        assert model.eval()(images_for(model, batch=3)).shape == (3, 2)
    assert set(model.prompt_learner.state_dict()) == {"ctx", "meta_net.linear1.weight", "meta_net.linear1.bias",
                                                      "meta_net.linear2.weight", "meta_net.linear2.bias"}


@pytest.mark.parametrize("overrides,key", [
    (dict(tke_layer=3), "TKE_LAYER"),  # the tiny CLIP has 3 text layers
    (dict(tke_layer=0), "TKE_LAYER"),
    (dict(csc=True), "CSC"),
    (dict(class_token_position="middle"), "CLASS_TOKEN_POSITION"),
    (dict(class_template="a photo"), "CLASS_TEMPLATE"),
    (dict(kg_weight=-1.0), "KG_WEIGHT"),
    (dict(ctx_init="a  photo"), "CTX_INIT"),
])
def test_bad_settings_name_the_setting(tiny_clip, overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}=") as err:
        TCP(tiny_clip, TCPSettings(**{"tke_layer": 2, **overrides}), CLASSES, frozen(tiny_clip))
    assert err.value.setting == key.lower()


# ---- the release's checkpoints -------------------------------------------------------------------------
def test_release_state_dicts_are_recognised_and_converted(tiny_clip):
    from vlprompt.methods.tcp import RELEASE_CHECKPOINT
    trained = build(tiny_clip, seed=1)
    ours = trained.prompt_learner.state_dict()
    # an fp16 run's prompt_learner (the release's meta-net is fp16 then), saved from DataParallel
    release = {f"module.{k}": v.half() for k, v in ours.items()}
    release.update({"module.token_prefix": torch.zeros(5, 1, 64).half(),
                    "module.token_suffix": torch.zeros(5, 72, 64).half()})
    assert RELEASE_CHECKPOINT.recognizes(release) and not RELEASE_CHECKPOINT.recognizes(ours)
    converted = RELEASE_CHECKPOINT.convert(release)
    assert set(converted) == set(ours) and all(v.dtype == torch.float32 for v in converted.values())
    fresh = build(tiny_clip, seed=2)
    fresh.prompt_learner.load_state_dict(converted)
    assert all(torch.equal(fresh.prompt_learner.state_dict()[k], ours[k].half().float()) for k in ours)


# ---- with Dassl: the release's node, YAML, command lines, scripts and checkpoints -----------------------
RELEASE_OPTIONS = ["TRAINER.COOP.N_CTX", "4", "TRAINER.COOP.CSC", "False", "TRAINER.COOP.W", "1.0",
                   "TRAINER.COOP.CLASS_TOKEN_POSITION", "end"]  # the release's scripts/base2new_train.sh


def release_settings(dataset_config, *options):
    """TCP's settings from the release's YAML (our copy) and a command line, as train.py reads them."""
    import os

    import train
    from conftest import ROOT
    from dassl.engine import TRAINER_REGISTRY
    argv = ["--trainer", "TCP", "--dataset-config-file", os.path.join(ROOT, "configs/datasets", dataset_config),
            "--config-file", os.path.join(ROOT, "configs/trainers/TCP/vit_b16_ep100_ctxv1.yaml"), *options]
    cfg = train.setup_cfg(train.build_parser().parse_args(argv))
    return TRAINER_REGISTRY.get("TCP").settings_from(cfg), cfg


@requires_dassl
def test_the_release_yaml_and_command_lines_run_unchanged():
    settings, cfg = release_settings("oxford_pets.yaml", *RELEASE_OPTIONS, "DATASET.NUM_SHOTS", "16",
                                     "DATASET.SUBSAMPLE_CLASSES", "base")
    assert settings == TCPSettings(n_ctx=4, csc=False, ctx_init="", class_token_position="end", w=1.0,
                                   kg_weight=8.0, tke_layer=8, class_template="{}, a type of pet.")
    assert cfg.TRAINER.COOP.PREC == "fp16" and cfg.OPTIM.NAME == "adam" and cfg.OPTIM.MAX_EPOCH == 50
    # CTX_INIT as the release's bool; the W of its older scripts (no effect, as in the release)
    settings, _ = release_settings("ucf101.yaml", "TRAINER.COOP.CTX_INIT", "True", "TRAINER.COOP.W", "8.0")
    assert (settings.ctx_init, settings.w, settings.kg_weight, settings.class_template) == (
        "a photo of a", 8.0, 8.0, "person doing {}.")


@requires_dassl
def test_bad_values_name_the_release_key():
    from vlprompt.errors import UserError
    with pytest.raises(UserError, match=r"TRAINER\.COOP\.CSC=True is invalid"):
        release_settings("caltech101.yaml", "TRAINER.COOP.CSC", "True")
    with pytest.raises(UserError, match=r"TRAINER\.COOP\.CLASS_TOKEN_POSITION='middle' is invalid"):
        release_settings("caltech101.yaml", "TRAINER.COOP.CLASS_TOKEN_POSITION", "middle")


def tcp_options(workspace):
    """The release's command-line options, fitted to the workspace's tiny CLIP (3 text layers)."""
    return [*RELEASE_OPTIONS, *tiny_options(workspace, "COOP", "TRAINER.COOP.TKE_LAYER", "2", "OPTIM.MAX_EPOCH", "2",
                                            "DATALOADER.TRAIN_X.BATCH_SIZE", "4")]


@pytest.fixture(scope="module")
def tcp_run(workspace, tmp_path_factory):
    """bash scripts/tcp/base2new_train.sh / base2new_test.sh caltech101 1 with the release's options."""
    from helpers import run_script
    output = tmp_path_factory.mktemp("tcp_output")
    env = script_env(workspace, output)
    options = tcp_options(workspace)
    trained = run_script(workspace, env, "tcp/base2new_train.sh", "caltech101", "1", options=options)
    tested = run_script(workspace, env, "tcp/base2new_test.sh", "caltech101", "1", options=options)
    run_dir = output / "base2new/train_base/caltech101/shots_16/TCP/vit_b16_ep100_ctxv1/seed1"
    return options, trained, tested, run_dir


@requires_dassl
def test_base_to_new_trains_checkpoints_in_the_release_folder_and_tests(tcp_run):
    _, trained, tested, run_dir = tcp_run
    assert "Finish training" in trained.stdout and "prompt prefix 'X X X X'" in trained.stdout
    assert "kg_weight=8.0, tke_layer=2, class_template='{}.'" in trained.stdout
    assert sorted(p.name for p in (run_dir / "prompt_learner").iterdir()) == ["checkpoint", "model.pth.tar-2"]
    state = torch.load(run_dir / "prompt_learner" / "model.pth.tar-2", weights_only=True)["state_dict"]
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "ctx": (4, 64), "meta_net.linear1.weight": (8, 32), "meta_net.linear1.bias": (8,),
        "meta_net.linear2.weight": (256, 8), "meta_net.linear2.bias": (256,)}
    assert "SUBSAMPLE_CLASSES: new" in tested.stdout and len(accuracies(tested.stdout)) == 1


@requires_dassl
def test_release_checkpoint_evaluates_as_our_own(tcp_run, workspace, tmp_path):
    """prompt_learner/model.pth.tar-2 as the release's save_model writes it (its prompt learner's
    state dict: the learned tensors in fp16 beside the class-bound token buffers; Dassl's pickled
    scheduler) evaluates through train.py --model-dir like our checkpoint of the same weights."""
    options, _, _, run_dir = tcp_run
    ours = torch.load(run_dir / "prompt_learner" / "model.pth.tar-2", weights_only=True)["state_dict"]
    release = {"ctx": ours["ctx"].half(), "token_prefix": torch.zeros(3, 1, 64).half(),
               "token_suffix": torch.zeros(3, 72, 64).half(),
               **{k: v.half() for k, v in ours.items() if k.startswith("meta_net.")}}
    write_release_checkpoint(tmp_path / "release" / "prompt_learner" / "model.pth.tar-2", release, 2)
    rounded = {k: v.half().float() for k, v in ours.items()}
    (tmp_path / "rounded" / "prompt_learner").mkdir(parents=True)
    torch.save({"state_dict": rounded, "epoch": 2}, tmp_path / "rounded" / "prompt_learner" / "model.pth.tar-2")

    def evaluate(model_dir, out, *extra):
        flags = ["--model-dir", str(model_dir), "--load-epoch", "2", "--eval-only"]
        return run(method_command(workspace, "TCP", "vit_b16_ep100_ctxv1", tmp_path / out,
                                  [*options, "DATASET.SUBSAMPLE_CLASSES", "new", *extra], flags), expect_ok=False)

    refused = evaluate(tmp_path / "release", "refused")
    assert refused.returncode == 2 and "TRUST_RELEASE_CHECKPOINT" in refused.stderr
    converted = evaluate(tmp_path / "release", "converted", "MODEL.TRUST_RELEASE_CHECKPOINT", "True")
    assert converted.returncode == 0, converted.stderr[-2000:]
    assert "is a checkpoint of the official release" in converted.stdout
    direct = evaluate(tmp_path / "rounded", "direct")
    assert accuracies(converted.stdout) == accuracies(direct.stdout) and len(accuracies(direct.stdout)) == 1
