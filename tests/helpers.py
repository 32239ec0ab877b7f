"""Helpers shared by the test files (fixtures live in conftest.py): tiny models and inputs, train.py
command lines, hand-written Dassl logs, and the half-precision tolerance."""
import functools
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
def make_cfg(root, name, shots=-1, seed=1, subsample="all", cache=""):
    from dassl.config import get_cfg_default
    from trainers.config import extend_cfg
    cfg = extend_cfg(get_cfg_default())
    cfg.DATASET.ROOT, cfg.DATASET.NAME, cfg.DATASET.NUM_SHOTS = str(root), name, shots
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
# the same seeded rule, and checked against the recorded sha256.
FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "releases")
CLIP_METHODS = ("coop", "cocoop", "ivlp", "maple", "promptsrc")
ALL_FIXTURES = CLIP_METHODS + ("cmpa", "edgecnn")


@functools.lru_cache(maxsize=None)
def generator():
    """The generator script as a module, for its seeded rules (it imports only numpy and torch
    at module level; the releases are imported in its worker processes only)."""
    spec = importlib.util.spec_from_file_location("make_fixtures", os.path.join(FIXTURE_DIR, "make_fixtures.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def load_fixture(method: str) -> dict:
    return torch.load(os.path.join(FIXTURE_DIR, f"{method}.pt"), map_location="cpu", weights_only=True)


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
