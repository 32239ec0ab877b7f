"""Shared by test_coop.py and test_cocoop.py: our models on the release fixtures' CLIP and known
state, the tolerances for comparing them with the release, and train.py / vlprompt.run commands
on the workspace's tiny dataset and CLIP.

Tolerances (fp32 everywhere; neither release casts anything to fp16, so `as_shipped` and
`no_casts` are the same numbers):
- logits: a logit is exp(logit_scale) * cos, so fp32 rounding anywhere in the towers moves it by a
  few ulps of exp(logit_scale) = 14.3. LOGIT_TOL = 8 ulps of that (1.4e-5) covers our reordered
  sums (shared prefix, cut at EOT, fused attention; measured <= 1.1e-6) and the release's own
  kernel-to-kernel spread (1.6e-6), and is far below a wrong prompt (whole logits move).
- loss: cross-entropy of such logits: 8 ulps of the largest magnitude involved.
- features: unit vectors, 8 ulps of 1 (measured <= 1.1e-7).
- gradients: each element is a sum over images, classes and positions of terms bounded by the
  largest gradient; the release itself spreads by up to 40 ulps of the largest element between
  CPU kernels (9.4e-7 of 0.2). GRAD_ULPS = 128 of the largest element leaves a margin of 3;
  a missing or misplaced term moves gradients by percents.
"""
import os
import sys
from typing import Dict

import torch

from conftest import ROOT
from helpers import generator, load_fixture, release_state

EPS32 = torch.finfo(torch.float32).eps
LOGIT_SCALE = 1 / 0.07  # exp of CLIP's initial logit_scale, which the random CLIPs keep
LOGIT_TOL = 8 * EPS32 * LOGIT_SCALE
FEATURE_TOL = 8 * EPS32
GRAD_ULPS = 128
MODES = ("as_shipped", "no_casts")


def loss_tol(loss: torch.Tensor, logits: torch.Tensor) -> float:
    return 8 * EPS32 * (abs(float(loss)) + float(logits.abs().max()))


def grad_tol(release_grads: Dict[str, torch.Tensor]) -> float:
    return GRAD_ULPS * EPS32 * max(float(g.abs().max()) for g in release_grads.values())


def fixture_clip():
    """The fixtures' CLIP (tiny-B: ViT-B widths, 3 layers), as tests/test_release_fixtures.py builds it."""
    from vlprompt.clip.loading import clip_from_state_dict, freeze
    return freeze(clip_from_state_dict(generator().fixture_clip_state_dict()))


def settings_of(case: dict) -> dict:
    """Our settings from the case's TRAINER node (PREC belongs to the trainer)."""
    return {key.lower(): value for key, value in case["config"].items() if key != "PREC"}


def model_for_case(method: str, name: str, clip_model):
    """(our model with the release's state of the case loaded through the checkpoint converter,
    the fixture, the case)."""
    from vlprompt.methods.cocoop import CoCoOp, CoCoOpSettings
    from vlprompt.methods.coop import CoOp, CoOpSettings, convert_release_state_dict
    fixture = load_fixture(method)
    case = fixture["cases"][name]
    model_type, settings_type = {"coop": (CoOp, CoOpSettings), "cocoop": (CoCoOp, CoCoOpSettings)}[method]
    model = model_type(clip_model, settings_type(**settings_of(case)), fixture["inputs"]["classnames"])
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


def check_against_release(model, fixture, case):
    """Logits, loss and gradients of our model against both modes of the release's fixture;
    returns our nonzero gradients."""
    eval_logits, train_logits, loss, grads = forward_and_backward(model, fixture)
    shipped, bare = case["results"]["as_shipped"], case["results"]["no_casts"]
    assert shipped["cast_sites"] == {} and torch.equal(shipped["eval_logits"], bare["eval_logits"])
    for mode in MODES:
        expected = case["results"][mode]
        torch.testing.assert_close(eval_logits, expected["eval_logits"], rtol=0, atol=LOGIT_TOL)
        torch.testing.assert_close(train_logits, expected["train_logits"], rtol=0, atol=LOGIT_TOL)
        assert abs(float(loss) - float(expected["loss"])) <= loss_tol(expected["loss"], expected["train_logits"])
        tol = grad_tol(expected["grads"]["values"])
        assert set(grads) == set(expected["grads"]["values"])
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected["grads"]["values"][name], rtol=0, atol=tol, msg=name)
    return {name: grad for name, grad in grads.items() if grad.abs().sum() > 0}


# ---- Dassl runs on the workspace's tiny dataset and CLIP ----------------------------------------------
def tiny_options(workspace, node: str, *extra: str):
    return ["MODEL.BACKBONE.PATH", str(workspace / "tiny_clip.pt"), "MODEL.FEATURE_CACHE_DIR", str(workspace / "cache"),
            "INPUT.SIZE", "(32, 32)",
            f"TRAINER.{node}.PREC", "fp32", "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TEST.BATCH_SIZE", "5",
            *extra]


def run_env(workspace, tmp_path):
    return dict(os.environ, DATA=str(workspace / "data"), OUTPUT=str(tmp_path / "output"),
                VLPROMPT_CACHE=str(tmp_path / "cache"), PYTHONWARNINGS="ignore")


def train_py(workspace, trainer: str, config: str, out, *extra: str):
    """train.py on the workspace's caltech101 (6 classes), all classes unless `extra` says otherwise."""
    return [sys.executable, os.path.join(ROOT, "train.py"), "--root", str(workspace / "data"), "--seed", "1",
            "--trainer", trainer, "--dataset-config-file", os.path.join(ROOT, "configs/datasets/caltech101.yaml"),
            "--config-file", os.path.join(ROOT, "configs", "trainers", trainer, f"{config}.yaml"),
            "--output-dir", str(out), *extra]


def release_checkpoint_file(path, state_dict: Dict[str, torch.Tensor], epoch: int) -> None:
    """A checkpoint as the release's Dassl writes it: the whole prompt_learner state dict
    (token buffers included) and a pickled scheduler object, which weights_only loading refuses."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.002)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(epoch))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state_dict, "epoch": epoch, "optimizer": optimizer.state_dict(),
                "scheduler": {"successor": scheduler, "last_epoch": epoch}, "val_result": None}, path)
