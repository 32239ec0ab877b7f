"""MMA (Multi-Modal Adapter) against the official release's numbers (tests/fixtures/releases/mma.pt),
the encoders' layer_output hook it rests on, its settings, checkpoints, and runs through the
scripts and the release's recipes and command lines."""
import math

import pytest
import torch

from conftest import requires_dassl
from helpers import (EPS32, LOGIT_TOL, accuracies, assert_batch_independent, fixture_clip, fixture_inputs,
                     generator, half_and_fp32_logits, half_tolerance, images_for, load_fixture, loss_tol,
                     method_command, release_state, run, run_script, script_env, tiny_options, train_losses,
                     write_release_checkpoint)
from vlprompt.clip.encoders import PromptedImageEncoder, PromptedTextEncoder, run_lockstep
from vlprompt.files import load_strict
from vlprompt.methods.mma import MMA, MMASettings, MultiModalAdapters, convert_release_state_dict, \
    is_release_state_dict
from vlprompt.methods.settings import ConfigError

FIXTURE = load_fixture("mma")
CASES = list(FIXTURE["cases"])  # shipped_layer3 (the recipe: scale 0.001, bottleneck 32), scale5_dim8_layers1to3
CLASSES = ["dog", "cat", "sports_car", "oak tree", "violin"]
TINY = dict(text_ctx_init="a photo of a", adapter_start=2, adapter_end=3, adapter_dim=8, adapter_scale=0.5)


def case_settings(case) -> MMASettings:
    return MMASettings(**{key.lower(): value for key, value in case["config"].items() if key != "PREC"})


def release_model(name):
    """Our MMA on the fixtures' CLIP with the release's trainable state of case `name` (its names)."""
    case = FIXTURE["cases"][name]
    classnames, _, _ = fixture_inputs("mma")
    model = MMA(fixture_clip(), case_settings(case), classnames)
    load_strict(model.prompt_learner, release_state(case), name)
    return model, case


def forward_backward(model):
    _, images, labels = fixture_inputs("mma")
    with torch.no_grad(), model.eval().evaluation():
        eval_logits = model(images)
    loss, train_logits, _ = model.train().loss(images, labels)
    loss.backward()
    grads = {name: p.grad for name, p in model.prompt_learner.named_parameters()}
    return eval_logits, train_logits.detach(), loss.detach(), grads


# ---- the release's numbers -------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_logits_loss_and_gradients_equal_the_release(name):
    model, case = release_model(name)
    assert model.token_ids.equal(case["tokenized_prompts"])  # "a photo of a <name>." as the release tokenizes
    eval_logits, train_logits, loss, grads = forward_backward(model)
    released = case["results"]["no_casts"]
    # fp32: the release casts nothing (its adapters go fp16 with CLIP only): one set of numbers
    assert case["results"]["as_shipped"]["cast_sites"] == {} and case["unpatched_check"] == "identical to as_shipped"
    assert torch.equal(case["results"]["as_shipped"]["eval_logits"], released["eval_logits"])
    torch.testing.assert_close(eval_logits, released["eval_logits"], rtol=0, atol=LOGIT_TOL)
    torch.testing.assert_close(train_logits, released["train_logits"], rtol=0, atol=LOGIT_TOL)
    assert abs(float(loss) - float(released["loss"])) <= loss_tol(released["loss"], eval_logits)
    # exactly the release's trainables get gradients; they carry its 1/ADAPTER_SCALE boost
    assert sorted(k for k, g in grads.items() if g is not None and g.abs().max() > 0) == released["grads"]["nonzero"]
    assert released["grads"]["none"] == released["grads"]["zero"] == []
    for key, norm in released["grads"]["norms"].items():
        assert abs(grads[key].double().norm().item() - norm) <= 1e-5 * norm, key
    assert set(released["grads"]["values"]) == set(released["grads"]["nonzero"])
    # 128 ulps of each tensor's largest (measured 40 and 59: the adapters' gradients sum over every
    # token of both towers; CoOp's comparison uses 128 too), far below a wrong gradient scale (1000x)
    for key, expected in released["grads"]["values"].items():
        tol = 128 * EPS32 * float(expected.abs().max())
        torch.testing.assert_close(grads[key], expected, rtol=0, atol=tol, msg=key)


def test_the_comparison_sees_the_adapters():
    """Without its adapters our model is far from the release's logits: the equality above is not
    that of two zero-shot CLIPs (the shipped scale 0.001 moves logits by only 2.6e-5, hence the
    scale-5 case: 0.18)."""
    model, case = release_model("scale5_dim8_layers1to3")
    with torch.no_grad():
        for p in model.prompt_learner.parameters():
            p.zero_()
        logits = model.eval()(fixture_inputs("mma")[1])
    assert float((logits - case["results"]["no_casts"]["eval_logits"]).abs().max()) > 1000 * LOGIT_TOL


@pytest.mark.parametrize("name", CASES)
def test_initial_adapters_are_the_releases_draws(name):
    """Built in the release's order with its initialisation: the same torch seed, the same weights."""
    recorded = FIXTURE["generated_with"]["cpu_capability"]
    if torch.backends.cpu.get_cpu_capability() != recorded:
        pytest.skip(f"torch's CPU random draws differ in their last bits between CPU kernels: the recorded hashes "
                    f"are the {recorded} kernels' draws")
    case = FIXTURE["cases"][name]
    clip_model = fixture_clip()
    torch.manual_seed(7)  # the fixture's rule: torch.manual_seed(7) right before the release builds them
    adapters = MultiModalAdapters(case_settings(case), clip_model.ln_final.weight.shape[0], 3,
                                  clip_model.visual.ln_post.weight.shape[0], 3)
    assert case["initial_state_rule"].startswith("torch.manual_seed(7)")
    assert {k: generator().sha256_of(p) for k, p in adapters.named_parameters()} == case["initial_state_sha256"]


@pytest.mark.parametrize("name", CASES)
def test_evaluation_does_not_depend_on_the_batch(name):
    model, case = release_model(name)
    assert case["batch_independence_max_abs_diff"] < LOGIT_TOL  # the release's own, one image at a time
    assert_batch_independent(model, fixture_inputs("mma")[1])


# ---- the encoders' layer_output hook -----------------------------------------------------------------
def test_without_a_hook_the_encoders_are_unchanged(tiny_clip):
    """No hook and a hook that returns the layer's output give bit-identical features, and the same
    as frozen CLIP's own encoders."""
    text, image = PromptedTextEncoder(tiny_clip), PromptedImageEncoder(tiny_clip)
    token_ids = torch.cat([__import__("clip").tokenize(f"a photo of a {c}.") for c in CLASSES])
    images = images_for(tiny_clip, batch=3)
    prompt = torch.randn(2, text.width, generator=torch.Generator().manual_seed(1))
    identity = lambda i, x, y: y  # noqa: E731
    with torch.no_grad():
        assert torch.equal(text(token_ids, layer_output=identity), text(token_ids))
        assert torch.equal(text(token_ids, [prompt], layer_output=identity), text(token_ids, [prompt]))
        assert torch.equal(image(images, layer_output=identity), image(images))
        torch.testing.assert_close(text(token_ids), tiny_clip.encode_text(token_ids), rtol=0, atol=1e-5)
        torch.testing.assert_close(image(images), tiny_clip.encode_image(images), rtol=0, atol=1e-5)


def test_hooks_see_every_layer_in_order_with_its_input_and_output(tiny_clip):
    image = PromptedImageEncoder(tiny_clip)
    seen = []

    def record(i, x, y):
        seen.append((i, x.shape, y.shape))
        return y + 1.0 if i == 1 else y

    with torch.no_grad():
        images = images_for(tiny_clip, batch=2)
        changed = image(images, layer_output=record)
        assert not torch.allclose(changed, image(images))
    assert [i for i, _, _ in seen] == list(range(image.depth))
    assert all(x == y for _, x, y in seen)


def test_the_exact_shortcuts_stay_exact_with_a_per_token_hook(tiny_clip):
    """Cut at EOT and the shared prompt prefix, with a per-token hook, give the features of the whole
    77-token sequences with no shortcut (the hook sees the prefix and the rest as separate calls)."""
    fast = PromptedTextEncoder(tiny_clip)
    slow = PromptedTextEncoder(tiny_clip, shared_prefix=False, cut_at_eot=False)
    token_ids = torch.cat([__import__("clip").tokenize(f"X X {c}.") for c in CLASSES])
    prompts = [torch.randn(2, fast.width, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    weight = torch.randn(fast.width, fast.width, generator=torch.Generator().manual_seed(9)) * 0.1
    hook = lambda i, x, y: y + torch.tanh(x @ weight) * (i + 1)  # noqa: E731  (per token)
    with torch.no_grad():
        torch.testing.assert_close(fast(token_ids, prompts, layer_output=hook),
                                   slow(token_ids, prompts, layer_output=hook), rtol=0, atol=1e-5)
        assert not torch.allclose(fast(token_ids, prompts, layer_output=hook), fast(token_ids, prompts))


def test_lockstep_takes_one_hook_per_stream(tiny_clip):
    text, image = PromptedTextEncoder(tiny_clip), PromptedImageEncoder(tiny_clip)
    token_ids = __import__("clip").tokenize(["a photo of a dog."])
    images = images_for(tiny_clip, batch=2)
    hook = lambda i, x, y: 2 * y  # noqa: E731
    no_prompts = lambda i, states: [None, None]  # noqa: E731
    with torch.no_grad():
        states = run_lockstep((text, image), (text.embed(token_ids), image.embed(images)), no_prompts, [None, hook])
        assert torch.equal(text.features(states[0]), text(token_ids))
        assert torch.equal(image.features(states[1]), image(images, layer_output=hook))
        with pytest.raises(ValueError, match="1 layer_outputs for 2 streams"):
            run_lockstep((text, image), (text.embed(token_ids), image.embed(images)), no_prompts, [hook])


# ---- the model ---------------------------------------------------------------------------------------
def test_trainable_state_is_the_adapters_under_the_release_names(tiny_clip):
    model = MMA(tiny_clip, MMASettings(**TINY), CLASSES)
    names = [name for name, _ in model.prompt_learner.named_parameters()]
    for layer in (2, 3):
        assert f"text_adapter.{layer}.down.0.weight" in names and f"visual_adapter.{layer}.up.bias" in names
        assert f"shared_adapter.{layer}.0.weight" in names
    assert not any(n.split(".")[1] in ("0", "1") for n in names)  # only layers ADAPTER_START..ADAPTER_END
    assert model.prompt_learner.shared_adapter[2][0].weight.shape == (8, 8)
    assert all(not p.requires_grad for p in tiny_clip.parameters())
    assert not model.uses_frozen_image_features  # the image side is adapted


@pytest.mark.parametrize("overrides,key,allowed", [
    (dict(adapter_end=4), "ADAPTER_END", r"must be in \[ADAPTER_START=2, 3\]"),
    (dict(adapter_start=3, adapter_end=2), "ADAPTER_END", r"must be in \[ADAPTER_START=3, 3\]"),
    (dict(adapter_start=0), "ADAPTER_START", r"must be in \[1, inf\]"),
    (dict(adapter_dim=128), "ADAPTER_DIM", r"must differ from the towers' widths"),
    (dict(adapter_scale=0.0), "ADAPTER_SCALE", r"must be in \[1e-06, 10\]"),
])
def test_bad_settings_name_the_setting(tiny_clip, overrides, key, allowed):
    with pytest.raises(ConfigError, match=rf"^{key}=.* is invalid: {allowed}"):
        MMA(tiny_clip, MMASettings(**{**TINY, **overrides}), CLASSES)


def test_a_short_training_run_lowers_the_loss(tiny_clip):
    torch.manual_seed(0)
    model = MMA(tiny_clip, MMASettings(**TINY), CLASSES)
    images = images_for(model, batch=10)
    losses = train_losses(model, images, torch.arange(10) % len(CLASSES), steps=15, lr=1e-2)
    assert losses[-1] < 0.7 * losses[0] and losses[-1] < math.log(len(CLASSES)), losses


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_agree_with_fp32(tiny_clip, dtype):
    """Frozen CLIP in fp16/bf16 with fp32 adapters (their input cast up, their output down)."""
    def build(clip_model):
        torch.manual_seed(0)
        return MMA(clip_model, MMASettings(**TINY), CLASSES)

    got, expected, scale = half_and_fp32_logits(build, tiny_clip, dtype)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < half_tolerance(dtype, scale)


def test_amp_trains_the_fp32_adapters(tiny_clip):
    torch.manual_seed(0)
    model = MMA(tiny_clip, MMASettings(**TINY), CLASSES).train()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model.loss(images_for(model, batch=3), torch.tensor([0, 1, 2])).loss
    loss.backward()
    assert all(p.dtype == torch.float32 and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0
               for p in model.prompt_learner.parameters())


def test_training_changes_only_the_adapters(tiny_clip):
    before = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    model = MMA(tiny_clip, MMASettings(**TINY), CLASSES)
    train_losses(model, images_for(model, batch=4), torch.arange(4), steps=2)
    assert all(torch.equal(v, before[k]) for k, v in tiny_clip.state_dict().items())


# ---- the release's checkpoints -------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("layout", ["checkpoint_fp32", "checkpoint_fp16"])
def test_release_checkpoint_layouts_convert_to_our_adapters(name, layout):
    """Every key the release's save_model writes ("adapter_learner": the adapters beside the
    class-bound token_embedding and tokenized_prompts): adapters kept and widened, the rest dropped."""
    case = FIXTURE["cases"][name]
    written = case[layout]
    assert written["folders"] == ["adapter_learner"] == [case["registered_model"]]
    entries = written["adapter_learner"]["state_dict"]
    values = release_state(case)
    state = {key: (values[key] if key in values else torch.zeros(shape)).to(getattr(torch, dtype))
             for key, shape, dtype in entries}
    assert is_release_state_dict(state) and is_release_state_dict({f"module.{k}": v for k, v in state.items()})
    converted = convert_release_state_dict(state)
    assert sorted(converted) == sorted(values)
    assert all(v.dtype == torch.float32 and torch.equal(v, state[k].float()) for k, v in converted.items())
    model, _ = release_model(name)
    load_strict(model.prompt_learner, converted, layout)
    assert not is_release_state_dict(model.prompt_learner.state_dict())  # ours: no class-bound buffers


# ---- Dassl: scripts, the release's recipes and command lines -------------------------------------
def mma_options(workspace, *extra):
    """The release recipe fitted to the workspace's tiny CLIP (3 layers, 32 px) on the CPU."""
    return tiny_options(workspace, "MMADAPTER", "TRAINER.MMADAPTER.ADAPTER_START", "2",
                        "TRAINER.MMADAPTER.ADAPTER_END", "3", "TRAINER.MMADAPTER.ADAPTER_DIM", "8",
                        "OPTIM.MAX_EPOCH", "2", "DATALOADER.TRAIN_X.BATCH_SIZE", "4", *extra)


@pytest.fixture(scope="module")
def mma_run(workspace, tmp_path_factory):
    """bash scripts/mma/base2new_train.sh / base2new_test.sh caltech101 1 (default recipe vit_b16_ep5)."""
    output = tmp_path_factory.mktemp("mma_output")
    env = script_env(workspace, output)
    options = mma_options(workspace)
    trained = run_script(workspace, env, "mma/base2new_train.sh", "caltech101", "1", options=options)
    tested = run_script(workspace, env, "mma/base2new_test.sh", "caltech101", "1", options=options)
    run_dir = output / "base2new/train_base/caltech101/shots_16/MMA/vit_b16_ep5/seed1"
    return env, options, trained, tested, run_dir


@requires_dassl
def test_scripts_train_on_base_and_test_on_new(mma_run):
    _, _, trained, tested, run_dir = mma_run
    assert "MMA: MMASettings(text_ctx_init='a photo of a', adapter_start=2, adapter_end=3, adapter_dim=8, " \
           "adapter_scale=0.001)" in trained.stdout
    assert "Finish training" in trained.stdout and "SUBSAMPLE_CLASSES: new" in tested.stdout
    assert len(accuracies(tested.stdout)) == 1 and 0 <= accuracies(tested.stdout)[0] <= 100
    assert sorted(p.name for p in (run_dir / "adapter_learner").iterdir()) == ["checkpoint", "model.pth.tar-2"]
    state = torch.load(run_dir / "adapter_learner" / "model.pth.tar-2", weights_only=True)["state_dict"]
    assert sorted({k.split(".")[0] + "." + k.split(".")[1] for k in state}) == [
        f"{tower}.{layer}" for tower in ("shared_adapter", "text_adapter", "visual_adapter") for layer in (2, 3)]


def write_release_style_checkpoint(path, state_dict, epoch):
    """What the release's Dassl save_model writes for MMA (fixture: checkpoint_fp32's top-level keys):
    the adapter_learner state dict, epoch, SGD's state, the cosine scheduler's state_dict (plain
    values: MMA's recipes have no warm-up, whose scheduler Dassl would pickle) and val_result."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0015)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(epoch))
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {"state_dict": state_dict, "epoch": epoch, "optimizer": optimizer.state_dict(),
                  "scheduler": scheduler.state_dict(), "val_result": None}
    layout = FIXTURE["cases"]["shipped_layer3"]["checkpoint_fp32"]["adapter_learner"]
    assert list(checkpoint) == layout["top_level_keys"] and layout["weights_only_error"] == ""
    assert {k: type(v).__name__ for k, v in checkpoint["scheduler"].items()} == layout["scheduler_state"]
    torch.save(checkpoint, path)
    (path.parent / "checkpoint").write_text(f"{path.name}\n")


@requires_dassl
def test_release_checkpoint_evaluates_as_our_own(mma_run, workspace, tmp_path):
    """Our last checkpoint written as the release's save_model writes it (its adapter_learner with
    the class-bound buffers, fp16 adapters as its fp16 runs save them) evaluates through train.py
    --model-dir like ours; one holding a pickled object only once trusted."""
    _, options, _, _, run_dir = mma_run
    ours = torch.load(run_dir / "adapter_learner" / "model.pth.tar-2", weights_only=True)["state_dict"]
    release = {"token_embedding": torch.zeros(3, 77, 64, dtype=torch.half),
               "tokenized_prompts": torch.zeros(3, 77, dtype=torch.long), **ours}
    write_release_style_checkpoint(tmp_path / "release" / "adapter_learner" / "model.pth.tar-2", release, 2)
    rounded = {**release, **{k: v.half() for k, v in ours.items()}}
    write_release_style_checkpoint(tmp_path / "release16" / "adapter_learner" / "model.pth.tar-2", rounded, 2)
    write_release_checkpoint(tmp_path / "pickled" / "adapter_learner" / "model.pth.tar-2", release, 2)
    new = ["DATASET.SUBSAMPLE_CLASSES", "new", "DATASET.NUM_SHOTS", "16", *options]

    def evaluate(model_dir, out, *extra):
        return run(method_command(workspace, "MultiModalAdapter", "vit_b16_ep5", tmp_path / out, [*new, *extra],
                                  ["--model-dir", str(model_dir), "--load-epoch", "2", "--eval-only"]),
                   expect_ok=False)

    converted = evaluate(tmp_path / "release", "converted")
    assert converted.returncode == 0, converted.stderr[-2000:]
    assert "is a checkpoint of the official release: converting its key names" in converted.stdout
    direct = evaluate(run_dir, "direct")
    assert accuracies(converted.stdout) == accuracies(direct.stdout) and len(accuracies(direct.stdout)) == 1
    assert evaluate(tmp_path / "release16", "fp16").returncode == 0
    refused = evaluate(tmp_path / "pickled", "refused")
    assert refused.returncode != 0 and "TRUST_RELEASE_CHECKPOINT" in refused.stderr
    trusted = evaluate(tmp_path / "pickled", "trusted", "MODEL.TRUST_RELEASE_CHECKPOINT", "True")
    assert accuracies(trusted.stdout) == accuracies(direct.stdout)


@requires_dassl
def test_release_recipes_and_command_line_run_unchanged(workspace, tmp_path):
    """train.py --trainer MultiModalAdapter with the release's own YAML and its TRAINER.MMADAPTER.*
    options, as its scripts call it: settings read from the release's node, adapters trained."""
    cmd = method_command(workspace, "MultiModalAdapter", "vit_b16_ep5", tmp_path / "out", mma_options(
        workspace, "TRAINER.MMADAPTER.ADAPTER_SCALE", "0.01", "TRAINER.MMADAPTER.TEXT_CTX_INIT", "a photo of the",
        "OPTIM.MAX_EPOCH", "1", "DATASET.NUM_SHOTS", "16", "DATASET.SUBSAMPLE_CLASSES", "base"))
    assert "configs/trainers/MultiModalAdapter/vit_b16_ep5.yaml" in " ".join(cmd)
    proc = run(cmd)
    assert "MultiModalAdapter: MMASettings(text_ctx_init='a photo of the', adapter_start=2, adapter_end=3, " \
           "adapter_dim=8, adapter_scale=0.01)" in proc.stdout
    assert "Finish training" in proc.stdout
    assert (tmp_path / "out" / "adapter_learner" / "model.pth.tar-1").is_file()


@requires_dassl
def test_release_yaml_files_merge_into_the_release_node():
    from dassl.config import get_cfg_default
    from trainers.config import extend_cfg
    from conftest import ROOT
    for recipe, batch in (("vit_b16_ep5", 16), ("vit_b16_ep5_imnet", 128)):
        for folder in ("MultiModalAdapter", "MMA"):
            cfg = extend_cfg(get_cfg_default())
            cfg.merge_from_file(f"{ROOT}/configs/trainers/{folder}/{recipe}.yaml")
            node = cfg.TRAINER.MMADAPTER
            assert (node.TEXT_CTX_INIT, node.ADAPTER_START, node.ADAPTER_END, node.ADAPTER_DIM, node.ADAPTER_SCALE,
                    node.PREC) == ("a photo of a", 5, 12, 32, 0.001, "amp")
            assert cfg.DATALOADER.TRAIN_X.BATCH_SIZE == batch and cfg.OPTIM.NAME == "sgd" and cfg.OPTIM.LR == 0.0015


@requires_dassl
def test_release_script_names_take_the_release_arguments(workspace, tmp_path):
    """scripts/mmadapter/: the release's `base2new_train.sh DATASET SEED CFG` and `base2new_test.sh
    DATASET SEED CFG LOADEP`; a LOADEP other than the last epoch is refused."""
    env = script_env(workspace, tmp_path / "output")
    options = mma_options(workspace, "OPTIM.MAX_EPOCH", "1")
    run_script(workspace, env, "mmadapter/base2new_train.sh", "caltech101", "1", "vit_b16_ep5", options=options)
    wrong = run_script(workspace, env, "mmadapter/base2new_test.sh", "caltech101", "1", "vit_b16_ep5", "3",
                       options=options, expect_ok=False)
    assert wrong.returncode == 2 and "LOADEP=3: base2new_test evaluates the last epoch of CFG=vit_b16_ep5 (5)" \
        in wrong.stderr
    unknown = run_script(workspace, env, "mmadapter/base2new_test.sh", "caltech101", "1", "nocfg", "5",
                         options=options, expect_ok=False)
    assert unknown.returncode == 2 and unknown.stderr.startswith("CFG=nocfg: no ") and "Traceback" not in unknown.stderr
    tested = run_script(workspace, env, "mmadapter/base2new_test.sh", "caltech101", "1", "vit_b16_ep5", "5",
                        options=options)
    assert len(accuracies(tested.stdout)) == 1
    assert (tmp_path / "output/base2new/test_new/caltech101/shots_16/MMA/vit_b16_ep5/seed1").is_dir()
