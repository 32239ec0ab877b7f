"""Faults injected into runs: killed jobs, failed writes, broken images, non-finite losses,
fuzzed configs, determinism. Each ends in a clear message and a recoverable state."""
import errno
import os
import re
import signal
import sys

import pytest
import torch

from conftest import ROOT, requires_dassl, write_workspace
from helpers import KILL_AFTER_FIRST_EPOCH, accuracies, dcp_command, in_process_trainer, run, train_command
from vlprompt.files import OutputWriteError, atomic_torch_save, atomic_write, atomic_write_text


# ---- atomic outputs ------------------------------------------------------------------------
def test_failed_write_leaves_the_previous_file_and_names_path_and_reason(tmp_path):
    path = tmp_path / "results.csv"
    atomic_write_text(str(path), "v1\n")

    def disk_full(handle):
        handle.write(b"half of v2")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputWriteError, match=rf"could not write {re.escape(str(path))}: No space left on device"):
        atomic_write(str(path), disk_full)
    assert path.read_text() == "v1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]  # no temporary file left


def test_unwritable_folder_is_named(tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputWriteError, match=rf"{re.escape(str(tmp_path / 'ckpt.pth'))}: Permission denied.*writable"):
        atomic_torch_save({"a": torch.zeros(1)}, str(tmp_path / "ckpt.pth"))


# ---- helpers for runs ----------------------------------------------------------------------


PATCHED_RUN = """
import os, runpy, signal, sys
{patch}
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_patched(patch, cmd, expect_ok):
    return run([sys.executable, "-c", PATCHED_RUN.format(patch=patch)] + cmd[1:], expect_ok=expect_ok)


# ---- kill and resume, every trainer ---------------------------------------------------------


def edgecnn_command(data, out):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--root", str(data), "--seed", "3", "--trainer", "EdgeCNN",
            "--dataset-config-file", os.path.join(ROOT, "configs/datasets/fer2013.yaml"),
            "--config-file", os.path.join(ROOT, "configs/trainers/EdgeCNN/fer2013.yaml"), "--output-dir", str(out),
            "OPTIM.MAX_EPOCH", "3", "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "8",
            "TRAINER.EDGECNN.DECAY_START", "1", "TRAINER.EDGECNN.DECAY_EVERY", "1"]


@requires_dassl
@pytest.mark.parametrize("trainer", ["EdgeCNN", "DCP"])
def test_killed_run_resumes_to_the_same_result_for_other_trainers(workspace, tmp_path, trainer):
    if trainer == "EdgeCNN":
        from datasets.synthetic import write_dataset
        write_dataset(str(tmp_path / "data"), "FER2013", 7, (4, 2, 2))
        make, folder = (lambda out: edgecnn_command(tmp_path / "data", out)), "model"
    else:
        make = lambda out: dcp_command(workspace, out, subsample="all") + ["OPTIM.MAX_EPOCH", "3"]
        folder = "MultiModalPromptLearner"
    reference = run(make(tmp_path / "straight"))
    killed = run([sys.executable, "-c", KILL_AFTER_FIRST_EPOCH] + make(tmp_path / "resumed")[1:], expect_ok=False)
    assert killed.returncode == -signal.SIGKILL
    resume_file = tmp_path / "resumed" / folder / "resume.pth.tar"
    assert torch.load(resume_file, weights_only=True)["epoch"] == 1
    again = run(make(tmp_path / "resumed"))
    assert "after epoch 1" in again.stdout
    a = torch.load(tmp_path / "straight" / folder / "model.pth.tar-3", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "resumed" / folder / "model.pth.tar-3", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert accuracies(again.stdout)[-1] == accuracies(reference.stdout)[-1]


@requires_dassl
def test_disk_full_while_checkpointing_keeps_the_last_good_state(workspace, tmp_path):
    """The second epoch's resume file cannot be written: the run stops naming it, the first
    epoch's file is intact, and the same command afterwards resumes from it."""
    patch = """
import errno
import trainers.checkpointed_trainer as base
real = base.atomic_torch_save
calls = []
def full_disk(obj, path):
    if path.endswith("resume.pth.tar"):
        calls.append(path)
        if len(calls) == 2:
            from vlprompt.files import atomic_write
            def write(handle):
                raise OSError(errno.ENOSPC, "No space left on device")
            atomic_write(path, write)
    real(obj, path)
base.atomic_torch_save = full_disk
"""
    cmd = train_command(workspace, tmp_path / "out", epochs=3)
    failed = run_patched(patch, cmd, expect_ok=False)
    resume_file = tmp_path / "out" / "VLPromptLearner" / "resume.pth.tar"
    assert failed.returncode != 0
    assert f"could not write {resume_file}: No space left on device" in failed.stderr
    assert torch.load(resume_file, weights_only=True)["epoch"] == 1
    assert "after epoch 1" in run(cmd).stdout


# ---- broken images ---------------------------------------------------------------------------
def break_images(folder):
    """Truncate one test image and replace another with text; returns their paths."""
    import json
    split = json.load(open(folder / "split_zhou_Caltech101.json"))
    truncated = folder / "101_ObjectCategories" / split["test"][0][0]
    not_image = folder / "101_ObjectCategories" / split["test"][1][0]
    truncated.write_bytes(truncated.read_bytes()[:200])
    not_image.write_text("this is not a picture")
    return truncated, not_image


@requires_dassl
def test_unreadable_image_stops_the_run_naming_it_or_is_skipped_on_request(tmp_path):
    write_workspace(tmp_path, {"Caltech101": (4, (2, 1, 3))})
    truncated, not_image = break_images(tmp_path / "data" / "caltech-101")
    cmd = train_command(tmp_path, tmp_path / "out", "TEST.FINAL_MODEL", "last_step", "DATASET.NUM_SHOTS", "2",
                        subsample="all", epochs=1)  # 2 training images per class
    failed = run(cmd, expect_ok=False)
    assert failed.returncode != 0 and "cannot read image" in failed.stderr
    assert str(truncated) in failed.stderr or str(not_image) in failed.stderr
    assert "DATALOADER.SKIP_BROKEN_IMAGES True" in failed.stderr
    skipped = run(train_command(tmp_path, tmp_path / "out2", "TEST.FINAL_MODEL", "last_step", "DATASET.NUM_SHOTS", "2",
                                "DATALOADER.SKIP_BROKEN_IMAGES", "True", subsample="all", epochs=1))
    assert f"skipping unreadable image {truncated}" in skipped.stdout
    assert f"skipping unreadable image {not_image}" in skipped.stdout
    assert "* total: 10" in skipped.stdout  # 4 classes x 3 test images, two left out


# ---- non-finite losses ----------------------------------------------------------------------
def corrupt_loss(trainer, on_call: int, factor: float):
    """Multiply the loss of the `on_call`-th training batch by `factor` (nan, inf)."""
    real_loss, calls = trainer.model.loss, []

    def loss(images, labels):
        value, logits, parts = real_loss(images, labels)
        calls.append(1)
        return (value * factor if len(calls) == on_call else value), logits, parts
    trainer.model.loss = loss


@requires_dassl
def test_nan_loss_stops_with_step_precision_and_advice(workspace, tmp_path):
    from trainers.checkpointed_trainer import NonFiniteLossError
    trainer = in_process_trainer(workspace, tmp_path, "TRAINER.HICROPL.PREC", "fp16")
    corrupt_loss(trainer, on_call=2, factor=float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at epoch 1, batch 2 with precision "
                                                 r"fp16: fp16 overflows easily: use PREC amp"):
        trainer.train()


@requires_dassl
def test_amp_skips_are_counted_not_fatal(workspace, tmp_path, capsys):
    trainer = in_process_trainer(workspace, tmp_path, "TRAINER.HICROPL.PREC", "amp")
    # an overflowing gradient in the first step (what fp16 backward does), with a finite loss
    first = next(trainer.model.prompt_learner.parameters())
    calls = []
    first.register_hook(lambda grad: calls.append(1) or (grad * float("inf") if len(calls) == 1 else grad))
    trainer.train()
    out = capsys.readouterr().out
    assert "amp: the gradient scaler skipped 1 optimizer step(s) this epoch" in out
    assert "Finish training" in out


@requires_dassl
def test_a_non_finite_amp_loss_stops_the_run(workspace, tmp_path):
    from trainers.checkpointed_trainer import NonFiniteLossError
    trainer = in_process_trainer(workspace, tmp_path, "TRAINER.HICROPL.PREC", "amp", "TRAIN.PRINT_FREQ", "100")
    corrupt_loss(trainer, on_call=1, factor=float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at epoch 1, batch 1 with precision amp"):
        trainer.train()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_non_finite_update_is_refused_on_the_device(optimizer):
    """fp16: an inf gradient with a finite loss; the step must leave the parameters and the
    optimizer's moments as they were, decided without reading the flag on the host."""
    from trainers.checkpointed_trainer import all_finite, guarded_step
    weight = torch.nn.Parameter(torch.ones(3))
    optim = (torch.optim.SGD([weight], lr=0.1, momentum=0.9) if optimizer == "sgd"
             else torch.optim.Adam([weight], lr=0.1))
    (weight * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    guarded_step(optim, all_finite(torch.tensor(1.0), [weight]))  # a good step
    good, state = weight.detach().clone(), {k: v.clone() for k, v in optim.state[weight].items()}
    assert not torch.equal(good, torch.ones(3))
    weight.grad = torch.tensor([1.0, float("inf"), 0.0])
    finite = all_finite(torch.tensor(2.0), [weight])
    assert not bool(finite)
    guarded_step(optim, finite)
    assert torch.equal(weight.detach(), good)
    for key, value in optim.state[weight].items():
        if key != "step":
            assert torch.equal(value, state[key]), key


# ---- determinism -----------------------------------------------------------------------------
@requires_dassl
def test_same_seed_and_config_give_identical_losses_and_metrics_on_cpu(workspace, tmp_path):
    logs = [run(train_command(workspace, tmp_path / f"run{i}", epochs=2)).stdout for i in range(2)]
    strip_times = lambda log: [re.sub(r"time [\d.]+ \([\d.]+\) data [\d.]+ \([\d.]+\)|eta [\d:]+", "", line)
                               for line in log.splitlines() if line.startswith(("epoch [", "* "))]
    first, second = map(strip_times, logs)
    assert len(first) > 6 and first == second
