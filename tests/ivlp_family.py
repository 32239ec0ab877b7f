"""What test_ivlp.py and test_promptsrc.py share: the release fixtures' model built as ours, the
tolerances against the release (and why), the release's checkpoint names, and Dassl runs through
the task scripts."""
import functools
import os
import re
import subprocess
import sys

import torch

from conftest import ROOT
from helpers import generator, load_fixture, release_state

EPS32 = torch.finfo(torch.float32).eps
LOGIT_SCALE = 1 / 0.07  # exp(logit_scale) of the random tiny CLIPs (CLIP's initial value)
# No casts: a logit is exp(logit_scale) * cos, so fp32 rounding in the towers moves it by a few ulps
# of 14.3; our exact shortcuts (cut at EOT, shared prefix) and other CPU kernels reorder sums
# (measured <= 1.7e-6). 8 ulps of the scale (1.4e-5) covers that and stays 3x below the smallest
# effect of the release's fp16 casts (4.0e-5), so the comparison tells the two apart.
LOGIT_TOL = 8 * EPS32 * LOGIT_SCALE
# As shipped, the release rounds every prompt but the first text context to fp16 (relative error
# <= 2^-11, half an fp16 ulp). Features are layer-normalised sums in which the prompts take part,
# so they move by at most about that relative amount, and a logit, scale * cos, by at most
# scale * 2^-11 = 7.0e-3. Measured: 4.9e-5 (IVLP) .. 1.4e-4 (language-only, PromptSRC).
HALF_ULP16 = 2.0 ** -11
FP16_LOGIT_BOUND = LOGIT_SCALE * HALF_ULP16
# Gradients without casts: sums reordered as above, a few dozen ulps of the tensor's largest
# gradient (measured 2.5e-6 of 0.50 = 21 ulps; kernels alone differ by 9.4e-7 of 0.55).
GRAD_ULPS = 64


def loss_tol(loss, logits) -> float:
    """Cross-entropy of logits equal within a few ulps: a few ulps of the largest magnitude involved."""
    return 8 * EPS32 * (abs(float(loss)) + float(logits.abs().max()))


def weighted_l1_tol(term, weight) -> float:
    """weight * mean |a - b| of normalised features (|x| <= 1): a few ulps of the weight."""
    return 8 * EPS32 * (abs(float(term)) + weight)


@functools.lru_cache(maxsize=None)
def fixture_clip():
    """The fixtures' CLIP (tiny-B), rebuilt as tests/test_release_fixtures.py does."""
    from vlprompt.clip.loading import clip_from_state_dict, freeze
    return freeze(clip_from_state_dict(generator().fixture_clip_state_dict()))


def fixture_settings(settings_type, case: dict):
    """Our settings for a fixture case. The release caps a prompt depth beyond the tower (the
    language-only recipe's 12 on the 3-layer CLIP); we refuse it, so 3 stands for it: the same
    prompts before the same layers."""
    values = {key.lower(): value for key, value in case["config"].items() if key != "PREC"}
    values["prompt_depth_text"] = min(values["prompt_depth_text"], 3)
    values["prompt_depth_vision"] = min(values["prompt_depth_vision"], 3)
    return settings_type(**values)


def release_name(ours: str) -> str:
    """The release's state_dict key of one of our prompts (written out by hand, the inverse of
    the converter under test)."""
    tower, layer = ours.split(".")
    if tower == "text_prompts":
        return "prompt_learner.ctx" if layer == "0" else f"text_encoder.transformer.resblocks.{layer}.VPT_shallow"
    return "image_encoder.VPT" if layer == "0" else f"image_encoder.transformer.resblocks.{layer}.VPT_shallow"


OUR_NAMES = [f"{tower}.{layer}" for tower in ("text_prompts", "visual_prompts") for layer in range(3)]


def our_name(release_key: str) -> str:
    return {release_name(name): name for name in OUR_NAMES}[release_key]


def our_state(case: dict, rounded: bool = False):
    """The fixture's trainable state under our names; `rounded`: what the release's .half() casts
    make of it (every prompt but the first text context rounded to fp16)."""
    state = {our_name(key): value for key, value in release_state(case).items()}
    return {name: value.half().float() if rounded and name != "text_prompts.0" else value
            for name, value in state.items()}


def release_layout_state(case: dict, layout: str):
    """A state dict with every key of a release checkpoint layout (`checkpoint_fp32`/`_fp16`) in
    its dtype: the case's prompts where the release keeps them, zeros for the rest."""
    learned = {release_name(name): value for name, value in our_state(case).items()}
    state = {}
    for key, shape, dtype in case[layout]["VLPromptLearner"]["state_dict"]:
        value = learned[key] if key in learned else torch.zeros(shape)
        state[key] = value.to(getattr(torch, dtype))
    return state


def assert_converted(state: dict, converted: dict):
    """Exactly our prompts, widened to fp32 from the release's values."""
    assert sorted(converted) == sorted(our_name(key) for key in state if key in map(release_name, OUR_NAMES))
    for name, value in converted.items():
        assert value.dtype == torch.float32 and torch.equal(value, state[release_name(name)].float()), name


def fixture_inputs(method: str):
    inputs = load_fixture(method)["inputs"]
    return inputs["classnames"], inputs["images"], inputs["labels"]


def grads_by_name(model):
    return {name: p.grad for name, p in model.prompt_learner.named_parameters()}


def assert_release_gradients(model, case: dict):
    """Exactly the release's trainable tensors get gradients, equal to its cast-free ones."""
    grads = grads_by_name(model)
    released = case["results"]["no_casts"]["grads"]
    assert sorted(release_name(n) for n, g in grads.items() if g is not None and g.abs().max() > 0) \
        == sorted(released["nonzero"])
    for key, expected in released["values"].items():
        ours = grads[our_name(key)]
        tol = GRAD_ULPS * EPS32 * float(expected.abs().max())
        torch.testing.assert_close(ours, expected, rtol=0, atol=tol, msg=key)


def assert_batch_independent(model, images):
    """Evaluation logits do not depend on the batch: sizes, order, the class cache."""
    model.eval()
    with torch.no_grad(), model.evaluation():
        whole = model(images)
        pieces = torch.cat([model(images[i:i + 2]) for i in range(0, len(images), 2)])
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(3))
        shuffled = model(images[perm])
    with torch.no_grad():
        uncached = model(images)
    tol = 8 * EPS32 * float(model.logit_scale.exp())
    torch.testing.assert_close(pieces, whole, rtol=0, atol=tol)
    torch.testing.assert_close(shuffled, whole[perm], rtol=0, atol=tol)
    torch.testing.assert_close(uncached, whole, rtol=0, atol=tol)


# ---- Dassl runs through the scripts --------------------------------------------------------
def script_env(workspace, output):
    return dict(os.environ, DATA=str(workspace / "data"), OUTPUT=str(output), PYTHONWARNINGS="ignore",
                VLPROMPT_CACHE=str(workspace / "cache"))


def tiny_options(node: str, epochs: int = 2, vision: bool = True):
    """The recipes' settings, scaled to the tiny CLIP (3 layers, 32 px) and to CPU."""
    options = ["MODEL.BACKBONE.PATH", "{clip}", "INPUT.SIZE", "(32, 32)", "OPTIM.MAX_EPOCH", str(epochs),
               "DATALOADER.NUM_WORKERS", "0", f"TRAINER.{node}.PREC", "fp32", f"TRAINER.{node}.PROMPT_DEPTH_TEXT", "3"]
    return options + ([f"TRAINER.{node}.PROMPT_DEPTH_VISION", "3"] if vision else [])


def _with_clip(workspace, options):
    return [str(workspace / "tiny_clip.pt") if o == "{clip}" else o for o in options]


def run_script(workspace, env, script, *args, options=(), ok=True):
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", script), *args, *_with_clip(workspace, options)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    return _checked(proc, script, ok)


def train_py(workspace, trainer, config, output, options, flags=()):
    """train.py on the workspace's tiny Caltech101 with a release recipe, `flags` (--eval-only ...)
    and config options."""
    return [sys.executable, os.path.join(ROOT, "train.py"), "--root", str(workspace / "data"), "--seed", "1",
            "--trainer", trainer, "--dataset-config-file", os.path.join(ROOT, "configs/datasets/caltech101.yaml"),
            "--config-file", os.path.join(ROOT, "configs/trainers", trainer, f"{config}.yaml"),
            "--output-dir", str(output), *flags, "MODEL.FEATURE_CACHE_DIR", str(workspace / "cache"),
            *_with_clip(workspace, options)]


def run_train_py(cmd, ok=True):
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    return _checked(proc, "train.py", ok)


def evaluate(workspace, trainer, config, model_dir, output, options, ok=True):
    """train.py --eval-only --model-dir on the new classes, as the release's base2new_test scripts
    call it (epoch given)."""
    flags = ["--model-dir", str(model_dir), "--load-epoch", "2", "--eval-only"]
    return run_train_py(train_py(workspace, trainer, config, output, [*options, "DATASET.SUBSAMPLE_CLASSES", "new"],
                                 flags), ok)


def _checked(proc, what, ok):
    if ok and proc.returncode != 0:
        raise AssertionError(f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def accuracy(stdout: str) -> float:
    found = re.findall(r"\* accuracy: ([\d.]+)%", stdout)
    assert found, stdout[-2000:]
    return float(found[-1])


def assert_release_checkpoint_evaluates_as_ours(workspace, trainer, recipe, run_dir, tmp_path, options,
                                                extra=None):
    """The run's last checkpoint rewritten as the release writes it evaluates through train.py
    --eval-only --model-dir exactly as ours does, once trusted (it pickles a scheduler)."""
    release_dir = tmp_path / "release_run"
    write_release_checkpoint(run_dir / "VLPromptLearner" / "model.pth.tar-2", release_dir / "VLPromptLearner", 2,
                             extra)
    refused = evaluate(workspace, trainer, recipe, release_dir, tmp_path / "refused", options, ok=False)
    assert refused.returncode != 0 and "TRUST_RELEASE_CHECKPOINT" in refused.stderr
    released = evaluate(workspace, trainer, recipe, release_dir, tmp_path / "released",
                        options + ["MODEL.TRUST_RELEASE_CHECKPOINT", "True"])
    assert "a checkpoint of the official release: converting its key names" in released.stdout
    ours = evaluate(workspace, trainer, recipe, run_dir, tmp_path / "ours", options)
    assert accuracy(released.stdout) == accuracy(ours.stdout)


def write_release_checkpoint(ours_path, folder, epoch: int, extra=None):
    """A checkpoint as the release writes it from one of ours: its key names (its whole CustomCLIP:
    frozen entries and token buffers beside the prompts; their values are ignored on load), fp16
    text context, and Dassl's pickled scheduler."""
    ours = torch.load(ours_path, weights_only=True)["state_dict"]
    state = {release_name(k): (v.half() if k == "text_prompts.0" else v) for k, v in ours.items()}
    state.update({"prompt_learner.token_prefix": torch.zeros(3, 1, 64), "prompt_learner.token_suffix":
                  torch.zeros(3, 72, 64), "logit_scale": torch.tensor(4.6052),
                  "image_encoder.conv1.weight": torch.zeros(1), "text_encoder.ln_final.weight": torch.zeros(1)})
    state.update(extra or {})
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    folder.mkdir(parents=True)
    torch.save({"state_dict": state, "epoch": epoch, "optimizer": optimizer.state_dict(), "val_result": None,
                "scheduler": {"successor": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 5.0)}},
               folder / f"model.pth.tar-{epoch}")
    (folder / "checkpoint").write_text(f"model.pth.tar-{epoch}\n")
