"""train.py --trainer HiCroPL with real Dassl on a tiny CoOp-format dataset and a tiny CLIP."""
import os
import re
import signal
import sys

import pytest
import torch

from conftest import requires_dassl
from helpers import KILL_AFTER_FIRST_EPOCH, accuracies, release_name, run, train_command

pytestmark = requires_dassl


@pytest.fixture(scope="module")
def trained(workspace):
    out = workspace / "train_base"
    proc = run(train_command(workspace, out))
    return out, proc.stdout


def test_training_saves_trainable_only_checkpoints(trained, workspace):
    out, stdout = trained
    folder = out / "VLPromptLearner"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint", "model-best.pth.tar", "model.pth.tar-2"]
    state = torch.load(folder / "model-best.pth.tar", weights_only=True)  # no pickled objects
    keys = set(state["state_dict"])
    assert {k.split(".")[0] for k in keys} == {"text_prompts", "visual_prompts", "text_proxies",
                                               "visual_proxies", "text_to_image", "image_to_text"}
    trainable_bytes = sum(v.numel() * v.element_size() for v in state["state_dict"].values())
    clip_bytes = os.path.getsize(workspace / "tiny_clip.pt")
    assert os.path.getsize(folder / "model-best.pth.tar") < trainable_bytes + 200_000 < clip_bytes
    assert "Finish training" in stdout and "Deploy the model with the best val performance" in stdout
    assert len(accuracies(stdout)) == 3  # val after each epoch, then test
    assert "prompt templates" in stdout  # which class-feature source was used is logged


def test_new_classes_are_evaluated_from_the_base_checkpoint_twice_identically(trained, workspace):
    model_dir, _ = trained
    results = []
    for attempt in range(2):
        proc = run(train_command(workspace, workspace / f"test_new_{attempt}", subsample="new", eval_only_from=model_dir))
        assert "* total: 9" in proc.stdout  # 3 new classes x 3 test images
        results.append(accuracies(proc.stdout))
    assert len(results[0]) == 1 and results[0] == results[1]
    assert "class text features read from cache" in proc.stdout
    assert re.search(r"frozen image features: \d+ cached in", proc.stdout)  # the first run's rows
    assert " new, " not in proc.stdout  # nothing recomputed


def test_eval_only_with_load_epoch_and_missing_checkpoint(trained, workspace):
    model_dir, _ = trained
    proc = run(train_command(workspace, workspace / "ep2", "--load-epoch", "2", eval_only_from=model_dir))
    assert "model.pth.tar-2" in proc.stdout and len(accuracies(proc.stdout)) == 1
    proc = run(train_command(workspace, workspace / "ep9", "--load-epoch", "9", eval_only_from=model_dir), expect_ok=False)
    assert proc.returncode != 0 and "No checkpoint at" in proc.stderr and "model.pth.tar-9" in proc.stderr


def test_killed_run_resumes_to_the_same_result(workspace):
    straight = workspace / "straight"
    reference = run(train_command(workspace, straight, epochs=3))
    resumed = workspace / "resumed"
    cmd = train_command(workspace, resumed, epochs=3)
    killed = run([sys.executable, "-c", KILL_AFTER_FIRST_EPOCH] + cmd[1:], expect_ok=False)
    assert killed.returncode == -signal.SIGKILL
    assert (resumed / "VLPromptLearner" / "resume.pth.tar").exists()
    again = run(cmd)
    assert "Resuming from" in again.stdout and "after epoch 1" in again.stdout
    last = "VLPromptLearner/model.pth.tar-3"
    a = torch.load(straight / last, weights_only=True)["state_dict"]
    b = torch.load(resumed / last, weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert accuracies(again.stdout)[-1] == accuracies(reference.stdout)[-1]
    assert not (resumed / "VLPromptLearner" / "resume.pth.tar").exists()  # removed once finished
    rerun = run(cmd)  # a finished run: nothing left to train, the final test again
    assert "epoch [" not in rerun.stdout and accuracies(rerun.stdout)[-1] == accuracies(reference.stdout)[-1]


@pytest.mark.parametrize("prec", ["fp16", "bf16", "amp"])
def test_every_precision_trains_on_cpu(workspace, prec):
    proc = run(train_command(workspace, workspace / f"prec_{prec}", epochs=1, prec=prec))
    losses = [float(x) for x in re.findall(r" loss ([\d.]+) \(", proc.stdout)]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert (workspace / f"prec_{prec}" / "VLPromptLearner" / "model.pth.tar-1").exists()


@pytest.mark.parametrize("opts,message", [
    (["TRAINER.HICROPL.CROSS_LAYER", "0"], "TRAINER.HICROPL.CROSS_LAYER=0 is invalid"),
    (["TRAINER.HICROPL.PROMPT_DEPTH", "13"], "TRAINER.HICROPL.PROMPT_DEPTH=13 is invalid"),
    (["TRAINER.HICROPL.PREC", "fp8"], "TRAINER.HICROPL.PREC='fp8' is invalid"),
    (["TRAINER.HICROPL.MAPPER_MODE", "copy"], "TRAINER.HICROPL.MAPPER_MODE='copy' is invalid"),
    (["INPUT.SIZE", "(224, 224)"], "INPUT.SIZE=(224, 224) does not match"),
])
def test_bad_config_gives_a_clear_error(workspace, opts, message):
    proc = run(train_command(workspace, workspace / "bad", *opts), expect_ok=False)
    assert proc.returncode != 0 and message in proc.stderr


def test_missing_dataset_folder_names_the_path(workspace, tmp_path):
    cmd = train_command(workspace, tmp_path / "out")
    cmd[cmd.index("--root") + 1] = str(tmp_path / "nowhere")
    proc = run(cmd, expect_ok=False)
    assert proc.returncode != 0 and f"{tmp_path / 'nowhere' / 'caltech-101'} not found" in proc.stderr


def test_release_checkpoint_folder_is_converted_on_load(trained, workspace):
    """A `VLPromptLearner/model-best.pth.tar` written by the release evaluates with our trainer."""
    model_dir, _ = trained
    ours = torch.load(model_dir / "VLPromptLearner" / "model-best.pth.tar", weights_only=True)
    release = {f"prompt_learner.{release_name(k)}": v for k, v in ours["state_dict"].items()}
    release["image_encoder.conv1.weight"] = torch.zeros(1)  # frozen towers are ignored
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    folder = workspace / "release_run" / "VLPromptLearner"
    folder.mkdir(parents=True)
    torch.save({"state_dict": release, "epoch": 2, "val_result": 50.0,
                "scheduler": {"successor": torch.optim.lr_scheduler.CosineAnnealingLR(opt, 5.0)}},
               folder / "model-best.pth.tar")
    refused = run(train_command(workspace, workspace / "rel_eval", eval_only_from=folder.parent), expect_ok=False)
    assert refused.returncode != 0 and "TRUST_RELEASE_CHECKPOINT" in refused.stderr
    proc = run(train_command(workspace, workspace / "rel_eval", "MODEL.TRUST_RELEASE_CHECKPOINT", "True",
                       eval_only_from=folder.parent))
    direct = run(train_command(workspace, workspace / "our_eval", eval_only_from=model_dir))
    assert accuracies(proc.stdout) == accuracies(direct.stdout)


def test_command_line_seed_zero_is_a_seed():
    import train
    args = train.build_parser().parse_args(["--seed", "0", "--trainer", "HiCroPL", "OPTIM.MAX_EPOCH", "3"])
    cfg = train.setup_cfg(args)
    assert cfg.SEED == 0 and cfg.OPTIM.MAX_EPOCH == 3
    assert train.setup_cfg(train.build_parser().parse_args([])).SEED == -1  # unset stays unset


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")  # stepping the schedule alone
def test_trainer_uses_optim_eps_and_dassls_schedule(workspace, tmp_path):
    """In process: Adam gets OPTIM.EPS (upstream Dassl ignores the key) and the first epoch runs
    at the constant warm-up lr."""
    import train
    from dassl.engine import build_trainer
    cmd = train_command(workspace, tmp_path / "inproc")
    cfg = train.setup_cfg(train.build_parser().parse_args(cmd[2:]))
    trainer = build_trainer(cfg)
    assert {g["eps"] for g in trainer.optim.param_groups} == {1e-3}
    assert trainer.optim.param_groups[0]["lr"] == pytest.approx(1e-5)
    trainer.sched.step()
    assert trainer.optim.param_groups[0]["lr"] == pytest.approx(2.5e-3)


def test_last_step_final_model(workspace):
    out = workspace / "last_step"
    proc = run(train_command(workspace, out, "TEST.FINAL_MODEL", "last_step"))
    assert "Deploy the last-epoch model" in proc.stdout and "Evaluate on the *val* set" not in proc.stdout
    assert sorted(p.name for p in (out / "VLPromptLearner").iterdir()) == ["checkpoint", "model.pth.tar-2"]
    evaluated = run(train_command(workspace, workspace / "last_step_eval", eval_only_from=out))
    assert "model.pth.tar-2" in evaluated.stdout  # no model-best: the latest checkpoint


def test_deterministic_mode_trains_and_says_so(workspace):
    """--deterministic turns on torch's deterministic algorithms (which raise on any op without a
    deterministic kernel) and turns cuDNN autotuning off; the run trains under them."""
    proc = run(train_command(workspace, workspace / "deterministic", "--deterministic", epochs=1))
    assert "Deterministic mode: deterministic algorithms only" in proc.stdout
    assert (workspace / "deterministic" / "VLPromptLearner" / "model.pth.tar-1").exists()


def test_configure_determinism_sets_torch_and_cublas(monkeypatch):
    import train
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        assert "Deterministic mode" in train.configure_determinism(True, on_cuda=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    assert "autotuning on" in train.configure_determinism(False, on_cuda=True) and torch.backends.cudnn.benchmark
    assert train.configure_determinism(False, on_cuda=False) == "" and not torch.backends.cudnn.benchmark
