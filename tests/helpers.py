"""Helpers shared by the test files (fixtures live in conftest.py): tiny models and inputs, train.py
command lines, hand-written Dassl logs, and the half-precision tolerance."""
import functools
import glob
import importlib.util
import os
import re
import subprocess
import sys
from typing import Dict

import torch

from conftest import ROOT

# ---- tolerances -------------------------------------------------------------------------------
# Half-precision error, measured as a multiple of the dtype's resolution (torch.finfo(dtype).eps)
# times the magnitude compared: a feature that went through a few layers in fp16/bf16 carries a
# relative error of about 1-1.5 eps on every CPU kernel set measured (AVX-512, AVX2, default),
# so 4 eps leaves a margin of about 3 without hiding an error of the size a bug makes (a wrong
# cast or a lost prompt moves features by tens of eps).
HALF_EPS_FACTOR = 4.0


def half_tolerance(dtype: torch.dtype, magnitude: float) -> float:
    """Largest acceptable |low - fp32| for values of size `magnitude` computed in `dtype`.

    For relative errors pass magnitude 1. For logits pass the logit scale (exp(logit_scale)):
    a logit is scale * cos(image, text), and the features' relative error enters through the
    cosine, so the error is bounded by scale * (a few eps) whatever the logits' own range.
    """
    return HALF_EPS_FACTOR * torch.finfo(dtype).eps * magnitude


# ---- tiny models and inputs --------------------------------------------------------------------
HICROPL_CLASSES = ["dog", "cat", "sports_car", "oak tree", "violin"]
DCP_CLASSES = ["dog", "cat", "sports_car", "oak tree"]


def images_for(source, batch=6, seed=0):
    """Random images [batch, 3, R, R] at the input resolution of a CLIP model or of a prompt model."""
    size = source.visual.input_resolution if hasattr(source, "visual") else source.image_encoder.input_resolution
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def build_hicropl(clip_model, classes=HICROPL_CLASSES, seed=0, **overrides):
    from vlprompt.clip.class_features import frozen_class_features
    from vlprompt.clip.encoders import PromptedTextEncoder
    from vlprompt.methods.hicropl import HiCroPL, HiCroPLSettings
    settings = dict(n_ctx=4, ctx_init="", prompt_depth=3, cross_layer=1)
    settings.update(overrides)
    fixed = frozen_class_features(PromptedTextEncoder(clip_model), classes)
    torch.manual_seed(seed)
    return HiCroPL(clip_model, HiCroPLSettings(**settings), classes, fixed)


def build_dcp(clip_model, seed=0, **overrides):
    from vlprompt.methods.dcp import DCP, DCPSettings
    settings = dict(n_ctx=4, prompt_depth=2)
    settings.update(overrides)
    torch.manual_seed(seed)
    return DCP(clip_model, DCPSettings(**settings), DCP_CLASSES)


# ---- train.py runs -------------------------------------------------------------------------------
HICROPL_TINY_OPTIONS = [
    "INPUT.SIZE", "(32, 32)", "TRAINER.HICROPL.N_CTX", "4", "TRAINER.HICROPL.PROMPT_DEPTH", "3",
    "TRAINER.HICROPL.CROSS_LAYER", "1", "DATALOADER.NUM_WORKERS", "0",
    "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "DATALOADER.TEST.BATCH_SIZE", "5", "DATASET.NUM_SHOTS", "4"]
DCP_TINY_OPTIONS = [
    "INPUT.SIZE", "(32, 32)", "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "4",
    "DATALOADER.TEST.BATCH_SIZE", "5", "DATASET.NUM_SHOTS", "4", "OPTIM.MAX_EPOCH", "2"]


def train_command(workspace, out, *extra, subsample="base", epochs=2, prec="fp32", eval_only_from=None):
    """train.py for HiCroPL on the workspace's tiny dataset and CLIP; `extra`: train.py flags
    (--load-epoch N ...) and config options."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--root", str(workspace / "data"),
           "--seed", "1", "--trainer", "HiCroPL",
           "--dataset-config-file", os.path.join(ROOT, "configs/datasets/caltech101.yaml"),
           "--config-file", os.path.join(ROOT, "configs/trainers/HiCroPL/vit_b16_c2_ep50_batch32_16ctx.yaml"),
           "--output-dir", str(out)]
    if eval_only_from is not None:
        cmd += ["--model-dir", str(eval_only_from), "--eval-only"]
    options, opts = [a for a in extra if a.startswith("--")], [a for a in extra if not a.startswith("--")]
    if "--load-epoch" in options:  # its value follows it
        options.append(opts.pop(0))
    return cmd + options + ["DATASET.SUBSAMPLE_CLASSES", subsample, "OPTIM.MAX_EPOCH", str(epochs),
                            "TRAINER.HICROPL.PREC", prec, "MODEL.BACKBONE.PATH", str(workspace / "tiny_clip.pt"),
                            "MODEL.FEATURE_CACHE_DIR", str(workspace / "cache"), *HICROPL_TINY_OPTIONS, *opts]


def dcp_command(workspace, out, trainer="DCP", config="configs/trainers/DCP/vit_b16_c2_ep20_batch4_16ctx.yaml",
                subsample="base", model_dir=None):
    node = f"TRAINER.{trainer}"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--root", str(workspace / "data"), "--seed", "1",
           "--trainer", trainer, "--dataset-config-file", os.path.join(ROOT, "configs/datasets/caltech101.yaml"),
           "--config-file", os.path.join(ROOT, config), "--output-dir", str(out)]
    if model_dir:
        cmd += ["--model-dir", str(model_dir), "--eval-only"]
    return cmd + [f"{node}.N_CTX", "4", f"{node}.PROMPT_DEPTH", "2", f"{node}.PREC", "fp32",
                  "MODEL.BACKBONE.PATH", str(workspace / "tiny_clip.pt"), "DATASET.SUBSAMPLE_CLASSES", subsample,
                  "MODEL.FEATURE_CACHE_DIR", str(workspace / "cache"), *DCP_TINY_OPTIONS]


def run(cmd, expect_ok=True):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.setdefault("VLPROMPT_DEVICE", "cpu")  # as conftest.py: on the CPU unless asked
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def accuracies(stdout):
    return [float(a) for a in re.findall(r"\* accuracy: ([\d.]+)%", stdout)]


def in_process_trainer(workspace, tmp_path, *opts, trainer="HiCroPL"):
    """A Dassl trainer built in this process from train.py's command line."""
    import train
    from dassl.engine import build_trainer
    from dassl.utils import set_random_seed
    cmd = train_command(workspace, tmp_path / "run", *opts)
    cmd[cmd.index("--trainer") + 1] = trainer
    cfg = train.setup_cfg(train.build_parser().parse_args(cmd[2:]))
    set_random_seed(cfg.SEED)
    return build_trainer(cfg)


# ---- datasets ----------------------------------------------------------------------------------
def make_cfg(root, name, shots=-1, seed=1, subsample="all", cache="", allow_fewer_shots=False):
    from dassl.config import get_cfg_default
    from trainers.config import extend_cfg
    cfg = extend_cfg(get_cfg_default())
    cfg.DATASET.ROOT, cfg.DATASET.NAME, cfg.DATASET.NUM_SHOTS = str(root), name, shots
    cfg.DATASET.ALLOW_FEWER_SHOTS = allow_fewer_shots
    cfg.DATASET.SUBSAMPLE_CLASSES, cfg.SEED, cfg.MODEL.FEATURE_CACHE_DIR = subsample, seed, str(cache)
    return cfg


def build_dataset(root, name, **kwargs):
    import datasets  # noqa: F401  registration
    from dassl.data.datasets import build_dataset as dassl_build_dataset
    return dassl_build_dataset(make_cfg(root, name, **kwargs))


# ---- hand-written Dassl logs ------------------------------------------------------------------
LOG_HEADER = "Setting fixed seed: 1\n***************\n** Arguments **\n"


def train_log(final, val=(50.0, 60.0), end="Finish training"):
    lines = [LOG_HEADER]
    for v in val:  # per-epoch validation before the end of training must be ignored
        lines.append(f"Evaluate on the *val* set\n=> result\n* total: 10\n* accuracy: {v}%\n* error: {100 - v}%\n")
    if end:
        lines.append(f"{end}\nDeploy the model with the best val performance\nEvaluate on the *test* set\n"
                     f"=> result\n* total: 100\n* correct: {int(final)}\n* accuracy: {final}%\n"
                     f"* error: {100 - final}%\n* macro_f1: 40.0%\nElapsed: 0:01:00\n")
    return "".join(lines)


def eval_log(accuracy):
    return f"{LOG_HEADER}Evaluate on the *test* set\n=> result\n* total: 100\n* accuracy: {accuracy}%\n"


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ---- the HiCroPL release's checkpoint names ----------------------------------------------------
# Our name -> the release's name (its CrossModalPromptLearner attributes), written out by hand.
MODULE_NAMES = {"text_to_image": "text2visual_net", "image_to_text": "visual2text_net",
                "text_proxies": "attn_pooling_text_nets", "visual_proxies": "attn_pooling_visual_nets"}
LAYER_NAMES = {"q_proj": "linear_q", "k_proj": "linear_k", "v_proj": "linear_v", "mlp": "ffn"}


def release_name(ours: str) -> str:
    parts = ours.split(".")
    if parts[0] == "text_prompts":
        return f"cross_prompts_text.{parts[1]}"
    if parts[0] == "visual_prompts":
        return f"cross_prompts_visual.{parts[1]}"
    if parts[0] in ("text_proxies", "visual_proxies") and parts[2] == "query":
        side = "text" if parts[0] == "text_proxies" else "visual"
        return f"{side}_proxy_token.{parts[1]}"
    return ".".join([MODULE_NAMES[parts[0]]] + [LAYER_NAMES.get(p, p) for p in parts[1:]])


def release_state_dict(model, clip_model):
    """What the release's `VLPromptLearner` state dict holds: learned state in fp16 under its
    names, the duplicated ctx, class-bound buffers and every frozen CLIP weight."""
    state = {f"prompt_learner.{release_name(k)}": v.half() for k, v in model.prompt_learner.state_dict().items()}
    state["prompt_learner.ctx"] = state["prompt_learner.cross_prompts_text.0"]
    state["prompt_learner.token_prefix"] = torch.zeros(5, 1, 64)
    state["prompt_learner.token_suffix"] = torch.zeros(5, 72, 64)
    for k, v in clip_model.visual.state_dict().items():
        state[f"image_encoder.{k}"] = v
        state[f"prompt_learner.ZS_image_encoder.{k}"] = v
    state["logit_scale"] = clip_model.logit_scale.detach()
    return state


# ---- numbers frozen from the official releases (tests/fixtures/releases/*.pt) --------------------
# A fixture holds the release's trainable state under the release's own key names; tensors larger
# than the generator's store limit (MaPLe's 512->768 projections) are not stored but rebuilt from
# the same seeded rule, and checked against the recorded sha256. The fixtures are found by pattern:
# a method's `<method>_release.py` description makes `<method>.pt`, and the shared tests check it.
FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "releases")
FIXTURE_PATTERN = "*.pt"


def fixture_methods(directory: str = FIXTURE_DIR) -> tuple:
    """The method (file stem) of every release fixture in `directory`, sorted."""
    return tuple(sorted(os.path.basename(path)[:-len(".pt")]
                        for path in glob.glob(os.path.join(directory, FIXTURE_PATTERN))))


def clip_fixture_methods(directory: str = FIXTURE_DIR) -> tuple:
    """The fixtures whose cases hold the release's numbers ("results": logits, losses, gradients
    on the tiny CLIP); not the layout-only ones (cmpa) nor EdgeCNN's."""
    return tuple(method for method in fixture_methods(directory)
                 if any("results" in case for case in load_fixture(method, directory).get("cases", {}).values()))


@functools.lru_cache(maxsize=None)
def generator():
    """The generator script as a module, for its seeded rules (it imports only numpy and torch
    at module level; the releases are imported in its worker processes only). Registered as
    `make_fixtures`, the name the release descriptions import it by."""
    if "make_fixtures" in sys.modules:
        return sys.modules["make_fixtures"]
    spec = importlib.util.spec_from_file_location("make_fixtures", os.path.join(FIXTURE_DIR, "make_fixtures.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_fixtures"] = module
    spec.loader.exec_module(module)
    return module


def release_description_module(name: str):
    """tests/fixtures/releases/<name>_release.py as a module (its helpers, e.g. EdgeCNN's seeded state)."""
    return generator().description_module(os.path.join(FIXTURE_DIR, f"{name}_release.py"))


@functools.lru_cache(maxsize=None)
def load_fixture(method: str, directory: str = FIXTURE_DIR) -> dict:
    return torch.load(os.path.join(directory, f"{method}.pt"), map_location="cpu", weights_only=True)


ALL_FIXTURES = fixture_methods()
CLIP_METHODS = clip_fixture_methods()


def seeded_state(spec: Dict[str, dict], seed: int) -> Dict[str, torch.Tensor]:
    """Every tensor of a trainable-state description, rebuilt from its seed and checked."""
    state = {}
    for key, entry in spec.items():
        value = generator().seeded_normal(key, entry["shape"], seed)
        if generator().sha256_of(value) != entry["sha256"]:
            raise AssertionError(f"{key}: the seeded rule no longer gives the recorded values "
                                 f"(numpy's normal stream changed?)")
        state[key] = value
    return state


def release_state(case: dict) -> Dict[str, torch.Tensor]:
    """The release's whole trainable state of a fixture case (stored or rebuilt), fp32."""
    state = seeded_state(case["trainable_spec"], load_seed())
    for key, stored in case["trainable_state"].items():
        if not torch.equal(stored, state[key]):
            raise AssertionError(f"{key}: stored values differ from the seeded rule")
    return state


def load_seed() -> int:
    return generator().STATE_SEED


# ---- killed runs -------------------------------------------------------------------------------
# `python -c KILL_AFTER_FIRST_EPOCH train.py ...`: train.py whose run is SIGKILLed at the end of its
# first epoch (after the resume state is written), as a preempted cluster job; any trainer.
KILL_AFTER_FIRST_EPOCH = """
import os, runpy, signal, sys
import trainers.checkpointed_trainer as base
original = base.CheckpointedTrainer.after_epoch
def after_epoch(self):
    original(self)
    if self.epoch == 0:
        os.kill(os.getpid(), signal.SIGKILL)
base.CheckpointedTrainer.after_epoch = after_epoch
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def train_losses(model, images, labels, steps, lr=5e-3, eps=1e-8):
    """The losses of `steps` Adam steps on the prompt learner (HiCroPL's recipes use eps 1e-3)."""
    optimizer = torch.optim.Adam(model.prompt_learner.parameters(), lr=lr, eps=eps)
    losses = []
    for _ in range(steps):
        loss = model.loss(images, labels)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def half_and_fp32_logits(build, clip_model, dtype, images=None):
    """(logits with frozen CLIP in `dtype`, fp32 logits, logit scale) of one model state: `build`
    makes the model from a CLIP."""
    import copy
    from vlprompt.clip.loading import cast_clip
    reference = build(clip_model).eval()
    half = build(cast_clip(copy.deepcopy(clip_model), dtype)).eval()
    half.prompt_learner.load_state_dict(reference.prompt_learner.state_dict())
    images = images_for(reference) if images is None else images
    with torch.no_grad():
        return half(images), reference(images), reference.logit_scale.exp().item()


def assert_batch_independent(model, images, tol=None):
    """Evaluation logits do not depend on the batch: its size, its order, the class cache."""
    model.eval()
    with torch.no_grad(), model.evaluation():
        whole = model(images)
        pieces = torch.cat([model(images[i:i + 2]) for i in range(0, len(images), 2)])
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(3))
        shuffled = model(images[perm])
    with torch.no_grad():
        uncached = model(images)
    tol = 8 * EPS32 * float(model.logit_scale.exp()) if tol is None else tol
    torch.testing.assert_close(pieces, whole, rtol=0, atol=tol)
    torch.testing.assert_close(shuffled, whole[perm], rtol=0, atol=tol)
    torch.testing.assert_close(uncached, whole, rtol=0, atol=tol)


# ---- comparisons with the releases: tolerances ---------------------------------------------------
EPS32 = torch.finfo(torch.float32).eps
LOGIT_SCALE = 1 / 0.07  # exp(logit_scale) of the random tiny CLIPs (CLIP's initial value)
# Without the releases' casts: a logit is exp(logit_scale) * cos, so fp32 rounding in the towers
# moves it by a few ulps of 14.3; our exact shortcuts (cut at EOT, shared prefix) and other CPU
# kernels reorder sums (measured <= 1.7e-6; the release against itself across kernels: 1.6e-6).
# 8 ulps of the scale (1.4e-5) covers that, stays 3x below the smallest effect of the releases'
# fp16 casts (4.0e-5), so a comparison tells the two apart, and far below a wrong prompt.
LOGIT_TOL = 8 * EPS32 * LOGIT_SCALE
FEATURE_TOL = 8 * EPS32  # unit vectors (measured <= 1.1e-7)
# As shipped, IVLP, MaPLe and PromptSRC round every prompt but the first text context to fp16
# (relative error <= 2^-11, half an fp16 ulp). Features are layer-normalised sums the prompts take
# part in, so they move by at most about that relative amount, a logit (scale * cos) by at most
# scale * 2^-11 = 7.0e-3. Measured: 4.0e-5 (MaPLe) .. 1.4e-4 (language-only IVLP, PromptSRC).
HALF_ULP16 = 2.0 ** -11
FP16_LOGIT_BOUND = LOGIT_SCALE * HALF_ULP16


def loss_tol(loss, logits) -> float:
    """Cross-entropy of logits equal within a few ulps: a few ulps of the largest magnitude involved."""
    return 8 * EPS32 * (abs(float(loss)) + float(logits.abs().max()))


def weighted_l1_tol(term, weight) -> float:
    """weight * mean |a - b| of normalised features (|x| <= 1): a few ulps of the weight."""
    return 8 * EPS32 * (abs(float(term)) + weight)


def grad_tol(release_grads: Dict[str, torch.Tensor], ulps: int) -> float:
    """`ulps` fp32 ulps of the largest gradient: each element sums terms bounded by it; the releases
    themselves spread by up to 40 such ulps between CPU kernels (9.4e-7 of 0.2)."""
    return ulps * EPS32 * max(float(g.abs().max()) for g in release_grads.values())


@functools.lru_cache(maxsize=None)
def fixture_clip():
    """The fixtures' CLIP (tiny-B: ViT-B widths, 3 layers), drawn in float64 by the generator so
    that every CPU kernel set builds the same weights."""
    from vlprompt.clip.loading import clip_from_state_dict, freeze
    return freeze(clip_from_state_dict(generator().fixture_clip_state_dict()))


def fixture_settings(settings_type, case: dict, max_depth=None):
    """Our settings for a fixture case, from its TRAINER node (PREC belongs to the trainer).
    `max_depth`: the release silently caps a prompt depth beyond the tower (the language-only
    recipe's 12 on the 3-layer CLIP); we refuse it, so the cap stands in for it: the same prompts
    before the same layers."""
    values = {key.lower(): value for key, value in case["config"].items() if key != "PREC"}
    if max_depth is not None:
        values.update({k: min(v, max_depth) for k, v in values.items() if "depth" in k})
    return settings_type(**values)


def write_release_checkpoint(path, state_dict: Dict[str, torch.Tensor], epoch: int) -> None:
    """A checkpoint as the releases' Dassl writes it: their state dict, the optimizer, a pickled
    scheduler object (which weights_only loading refuses) and the `checkpoint` pointer."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.002)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(epoch))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state_dict, "epoch": epoch, "optimizer": optimizer.state_dict(),
                "scheduler": {"successor": scheduler, "last_epoch": epoch}, "val_result": None}, path)
    (path.parent / "checkpoint").write_text(f"{path.name}\n")


# ---- Dassl runs of any method on the workspace's tiny data and CLIP ---------------------------
def method_command(workspace, trainer, config, out, options=(), flags=()):
    """train.py `flags` (--eval-only ...) on the workspace's caltech101 with a recipe of
    configs/trainers/<trainer>/ and config `options` ("{clip}" stands for the tiny CLIP file)."""
    options = [str(workspace / "tiny_clip.pt") if o == "{clip}" else o for o in options]
    return [sys.executable, os.path.join(ROOT, "train.py"), *flags, "--root", str(workspace / "data"), "--seed", "1",
            "--trainer", trainer, "--dataset-config-file", os.path.join(ROOT, "configs/datasets/caltech101.yaml"),
            "--config-file", os.path.join(ROOT, "configs", "trainers", trainer, f"{config}.yaml"),
            "--output-dir", str(out), "MODEL.FEATURE_CACHE_DIR", str(workspace / "cache"), *options]


# The workspace's datasets hold 4 training images per class, fewer than the 16 shots of the tasks.
FEWER_SHOTS = ["DATASET.ALLOW_FEWER_SHOTS", "True"]


def tiny_options(workspace, node: str, *extra: str):
    """Options that fit a recipe to the workspace's tiny CLIP (32 px) in fp32 on the CPU."""
    return ["MODEL.BACKBONE.PATH", str(workspace / "tiny_clip.pt"), "MODEL.FEATURE_CACHE_DIR", str(workspace / "cache"),
            "INPUT.SIZE", "(32, 32)", f"TRAINER.{node}.PREC", "fp32", "DATALOADER.NUM_WORKERS", "0",
            "DATALOADER.TEST.BATCH_SIZE", "5", *FEWER_SHOTS, *extra]


def script_env(workspace, output):
    """The environment of the task scripts and vlprompt.run on the workspace."""
    return dict(os.environ, DATA=str(workspace / "data"), OUTPUT=str(output), PYTHONWARNINGS="ignore",
                VLPROMPT_CACHE=str(workspace / "cache"), VLPROMPT_DEVICE=os.environ.get("VLPROMPT_DEVICE", "cpu"))


def run_script(workspace, env, script, *args, options=(), expect_ok=True):
    """bash scripts/<script> ARGS OPTIONS ("{clip}" in options stands for the tiny CLIP file)."""
    options = [str(workspace / "tiny_clip.pt") if o == "{clip}" else o for o in options]
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", script), *args, *options],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# ---- CoOp and CoCoOp against their releases -----------------------------------------------------
MODES = ("as_shipped", "no_casts")


def coop_model_for_case(method: str, name: str, clip_model):
    """(our CoOp or CoCoOp with the release's state of the fixture case loaded through the
    checkpoint converter, the fixture, the case)."""
    from vlprompt.methods.cocoop import CoCoOp, CoCoOpSettings
    from vlprompt.methods.coop import CoOp, CoOpSettings, convert_release_state_dict
    fixture = load_fixture(method)
    case = fixture["cases"][name]
    model_type, settings_type = {"coop": (CoOp, CoOpSettings), "cocoop": (CoCoOp, CoCoOpSettings)}[method]
    model = model_type(clip_model, fixture_settings(settings_type, case), fixture["inputs"]["classnames"])
    state = release_state(case)
    # the release checkpoint holds the class-bound token buffers too; the converter drops them
    state["token_prefix"], state["token_suffix"] = torch.zeros(6, 1, 512), torch.zeros(6, 60, 512)
    model.prompt_learner.load_state_dict(convert_release_state_dict(state))
    return model, fixture, case


def forward_and_backward(model, fixture):
    """(eval logits, train logits, loss, {name: grad}) on the fixture batch, as the release's
    forward_backward and test computed them."""
    images, labels = fixture["inputs"]["images"], fixture["inputs"]["labels"]
    with torch.no_grad():
        eval_logits = model.eval()(images)
    model.train()
    loss, train_logits, _ = model.loss(images, labels)
    loss.backward()
    grads = {name: p.grad for name, p in model.prompt_learner.named_parameters() if p.grad is not None}
    return eval_logits, train_logits.detach(), loss.detach(), grads


def check_coop_against_release(model, fixture, case):
    """Logits, loss and gradients against both modes of the release's fixture (neither CoOp nor
    CoCoOp casts anything, so they are the same numbers); returns our nonzero gradients."""
    eval_logits, train_logits, loss, grads = forward_and_backward(model, fixture)
    shipped, bare = case["results"]["as_shipped"], case["results"]["no_casts"]
    assert shipped["cast_sites"] == {} and torch.equal(shipped["eval_logits"], bare["eval_logits"])
    for mode in MODES:
        expected = case["results"][mode]
        torch.testing.assert_close(eval_logits, expected["eval_logits"], rtol=0, atol=LOGIT_TOL)
        torch.testing.assert_close(train_logits, expected["train_logits"], rtol=0, atol=LOGIT_TOL)
        assert abs(float(loss) - float(expected["loss"])) <= loss_tol(expected["loss"], expected["train_logits"])
        tol = grad_tol(expected["grads"]["values"], ulps=128)
        assert set(grads) == set(expected["grads"]["values"])
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected["grads"]["values"][name], rtol=0, atol=tol, msg=name)
    return {name: grad for name, grad in grads.items() if grad.abs().sum() > 0}


# ---- IVLP and PromptSRC against their releases ----------------------------------------------------
IVLP_NAMES = [f"{tower}.{layer}" for tower in ("text_prompts", "visual_prompts") for layer in range(3)]


def ivlp_release_name(ours: str) -> str:
    """The release's state_dict key of one of our IVLP prompts (written out by hand, the inverse of
    the converter under test)."""
    tower, layer = ours.split(".")
    if tower == "text_prompts":
        return "prompt_learner.ctx" if layer == "0" else f"text_encoder.transformer.resblocks.{layer}.VPT_shallow"
    return "image_encoder.VPT" if layer == "0" else f"image_encoder.transformer.resblocks.{layer}.VPT_shallow"


def ivlp_our_name(release_key: str) -> str:
    return {ivlp_release_name(name): name for name in IVLP_NAMES}[release_key]


def ivlp_state(case: dict, rounded: bool = False):
    """The fixture's trainable state under our names; `rounded`: what the release's .half() casts
    make of it (every prompt but the first text context rounded to fp16)."""
    state = {ivlp_our_name(key): value for key, value in release_state(case).items()}
    return {name: value.half().float() if rounded and name != "text_prompts.0" else value
            for name, value in state.items()}


def ivlp_release_layout_state(case: dict, layout: str):
    """A state dict with every key of a release checkpoint layout (`checkpoint_fp32`/`_fp16`) in
    its dtype: the case's prompts where the release keeps them, zeros for the rest."""
    learned = {ivlp_release_name(name): value for name, value in ivlp_state(case).items()}
    state = {}
    for key, shape, dtype in case[layout]["VLPromptLearner"]["state_dict"]:
        value = learned[key] if key in learned else torch.zeros(shape)
        state[key] = value.to(getattr(torch, dtype))
    return state


def assert_ivlp_converted(state: dict, converted: dict):
    """Exactly our prompts, widened to fp32 from the release's values."""
    assert sorted(converted) == sorted(ivlp_our_name(key) for key in state
                                       if key in map(ivlp_release_name, IVLP_NAMES))
    for name, value in converted.items():
        assert value.dtype == torch.float32 and torch.equal(value, state[ivlp_release_name(name)].float()), name


def assert_ivlp_release_gradients(model, case: dict):
    """Exactly the release's trainable tensors get gradients, equal to its cast-free ones within
    64 ulps of each tensor's largest (measured 21; kernels alone differ by 9.4e-7 of 0.55)."""
    grads = {name: p.grad for name, p in model.prompt_learner.named_parameters()}
    released = case["results"]["no_casts"]["grads"]
    assert sorted(ivlp_release_name(n) for n, g in grads.items() if g is not None and g.abs().max() > 0) \
        == sorted(released["nonzero"])
    for key, expected in released["values"].items():
        tol = 64 * EPS32 * float(expected.abs().max())
        torch.testing.assert_close(grads[ivlp_our_name(key)], expected, rtol=0, atol=tol, msg=key)


def ivlp_release_checkpoint(ours_path, folder, epoch: int, extra=None):
    """One of our IVLP-family checkpoints written as the release writes it: its key names (its whole
    CustomCLIP: frozen entries and token buffers beside the prompts; their values are ignored on
    load), the text context in fp16, Dassl's pickled scheduler."""
    ours = torch.load(ours_path, weights_only=True)["state_dict"]
    state = {ivlp_release_name(k): (v.half() if k == "text_prompts.0" else v) for k, v in ours.items()}
    state.update({"prompt_learner.token_prefix": torch.zeros(3, 1, 64), "prompt_learner.token_suffix":
                  torch.zeros(3, 72, 64), "logit_scale": torch.tensor(4.6052),
                  "image_encoder.conv1.weight": torch.zeros(1), "text_encoder.ln_final.weight": torch.zeros(1)})
    state.update(extra or {})
    write_release_checkpoint(folder / f"model.pth.tar-{epoch}", state, epoch)


def fixture_inputs(method: str):
    """(class names, images, labels) of a release fixture's batch."""
    inputs = load_fixture(method)["inputs"]
    return inputs["classnames"], inputs["images"], inputs["labels"]


def ivlp_tiny_options(node: str, epochs: int = 2, vision: bool = True):
    """IVLP's and PromptSRC's recipes scaled to the tiny CLIP (3 layers, 32 px) and to CPU."""
    options = ["MODEL.BACKBONE.PATH", "{clip}", "INPUT.SIZE", "(32, 32)", "OPTIM.MAX_EPOCH", str(epochs),
               "DATALOADER.NUM_WORKERS", "0", f"TRAINER.{node}.PREC", "fp32", f"TRAINER.{node}.PROMPT_DEPTH_TEXT", "3",
               *FEWER_SHOTS]
    return options + ([f"TRAINER.{node}.PROMPT_DEPTH_VISION", "3"] if vision else [])


def evaluate_new_classes(workspace, trainer, config, model_dir, output, options, expect_ok=True):
    """train.py --eval-only --model-dir on the new classes, epoch 2, as the releases' base2new_test
    scripts call it."""
    flags = ["--model-dir", str(model_dir), "--load-epoch", "2", "--eval-only"]
    return run(method_command(workspace, trainer, config, output, [*options, "DATASET.SUBSAMPLE_CLASSES", "new"],
                              flags), expect_ok=expect_ok)


def assert_ivlp_release_checkpoint_evaluates_as_ours(workspace, trainer, recipe, run_dir, tmp_path, options,
                                                     extra=None):
    """The run's last checkpoint rewritten as the release writes it evaluates through train.py
    --eval-only --model-dir exactly as ours does, once trusted (it pickles a scheduler)."""
    release_dir = tmp_path / "release_run"
    ivlp_release_checkpoint(run_dir / "VLPromptLearner" / "model.pth.tar-2", release_dir / "VLPromptLearner", 2,
                            extra)
    refused = evaluate_new_classes(workspace, trainer, recipe, release_dir, tmp_path / "refused", options,
                                   expect_ok=False)
    assert refused.returncode != 0 and "TRUST_RELEASE_CHECKPOINT" in refused.stderr
    released = evaluate_new_classes(workspace, trainer, recipe, release_dir, tmp_path / "released",
                                    options + ["MODEL.TRUST_RELEASE_CHECKPOINT", "True"])
    assert "a checkpoint of the official release: converting its key names" in released.stdout
    ours = evaluate_new_classes(workspace, trainer, recipe, run_dir, tmp_path / "ours", options)
    assert accuracies(released.stdout)[-1] == accuracies(ours.stdout)[-1]


def shipped_prompt_methods(task: str = "base2new"):
    """The registered prompt methods this repository ships (vlprompt/methods/), in the registry's
    order: not the ones test modules register for themselves (tests/test_method_api.py's ToyPrompt),
    which exist only in the processes that imported those modules."""
    from vlprompt.methods.registry import prompt_methods
    return [spec for spec in prompt_methods(task) if spec.model.__module__.startswith("vlprompt.methods.")]
