"""Every user mistake ends in one message naming the key, file or value and the fix, exit status 2,
no traceback and nothing left behind; checks that need no weights or data come first; one run
folder, one process."""
import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, requires_dassl
from helpers import run, train_command

pytestmark = requires_dassl
B16 = os.path.join(ROOT, "configs/trainers/HiCroPL/vit_b16_c2_ep50_batch32_16ctx.yaml")


def train_py(workspace, out, *options, root=None, config=B16, env=None):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--root", str(root or workspace / "data"), "--seed", "1",
           "--trainer", "HiCroPL", "--dataset-config-file", os.path.join(ROOT, "configs/datasets/caltech101.yaml"),
           "--config-file", config, "--output-dir", str(out), *options]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, PYTHONWARNINGS="ignore", **(env or {})))


TINY = ["MODEL.BACKBONE.PATH", "{clip}", "INPUT.SIZE", "(32, 32)", "TRAINER.HICROPL.PROMPT_DEPTH", "3",
        "TRAINER.HICROPL.CROSS_LAYER", "1", "TRAINER.HICROPL.N_CTX", "4"]


@pytest.mark.parametrize("options,message", [
    # fail fast: ViT-B/16's 12 layers are known, so no weights are looked for (there are none here)
    (["TRAINER.HICROPL.PROMPT_DEPTH", "99"],
     "error: TRAINER.HICROPL.PROMPT_DEPTH=99 is invalid: must be in [2, 12]"),
    (["TRAINER.HICROPL.NCTX", "4"], "unknown config key TRAINER.HICROPL.NCTX (did you mean TRAINER.HICROPL.N_CTX"),
    (["TRAINER.HICROPL.N_CTX", "many"], "TRAINER.HICROPL.N_CTX=many is invalid: expected int (like its default 16)"),
    (["OPTIM.MAX_EPOCH"], "config options come in KEY VALUE pairs"),
    (["OPTIM.LR", "0.0"], "error: OPTIM.LR=0.0 is invalid: must be a positive number"),  # was a ZeroDivisionError
    (["OPTIM.MAX_EPOCH", "0"], "error: OPTIM.MAX_EPOCH=0 is invalid: must be at least 1"),
    (["TRAINER.HICROPL.MAPPER_MODE", "copy"], "TRAINER.HICROPL.MAPPER_MODE='copy' is invalid: must be one of"),
    (["MODEL.BACKBONE.PATH", "/nowhere/ViT-B-16.pt"], "MODEL.BACKBONE.PATH='/nowhere/ViT-B-16.pt' is not a file"),
    (["DATASET.DESCRIPTIONS_FILE", "/nowhere/caltech_prompt.json"],
     "DATASET.DESCRIPTIONS_FILE='/nowhere/caltech_prompt.json' does not exist"),
    (["DATASET.REQUIRE_DESCRIPTIONS", "True", "DATASET.DESCRIPTIONS_DIR", "/nowhere"],
     "DATASET.REQUIRE_DESCRIPTIONS is True and there is no class descriptions file /nowhere/caltech_prompt.json"),
])
def test_a_mistake_is_one_message_exit_2_and_leaves_nothing(workspace, tmp_path, options, message):
    out = tmp_path / "run"
    proc = train_py(workspace, out, *options)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()  # nothing the next command could take for an unfinished run


def test_missing_dataset_folder_after_the_logger_started_leaves_nothing(workspace, tmp_path):
    out = tmp_path / "run"
    options = [o.replace("{clip}", str(workspace / "tiny_clip.pt")) for o in TINY]
    proc = train_py(workspace, out, *options, root=tmp_path / "nowhere")
    assert proc.returncode == 2 and f"error: {tmp_path / 'nowhere' / 'caltech-101'} not found" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_unknown_trainer_and_missing_config_file(workspace, tmp_path):
    proc = train_py(workspace, tmp_path / "r", config=str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and f"--config-file {tmp_path / 'nope.yaml'}: no such file" in proc.stderr
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("OPTIM: [unclosed\n")
    proc = train_py(workspace, tmp_path / "r", config=str(bad_yaml))
    assert proc.returncode == 2 and f"--config-file {bad_yaml} is not valid YAML" in proc.stderr
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("TRAINER:\n  HICROPL:\n    LAMDA: 3.0\n")
    proc = train_py(workspace, tmp_path / "r", config=str(unknown))
    assert proc.returncode == 2 and "unknown config key TRAINER.HICROPL.LAMDA (did you mean TRAINER.HICROPL.LAMBD" in proc.stderr
    cmd = train_command(workspace, tmp_path / "r")
    cmd[cmd.index("--trainer") + 1] = "HiCroPl"
    proc = run(cmd, expect_ok=False)
    assert proc.returncode == 2 and "TRAINER.NAME='HiCroPl' is not a registered trainer (did you mean HiCroPL?)" in proc.stderr


def test_traceback_on_request_and_for_bugs(workspace, tmp_path):
    proc = train_py(workspace, tmp_path / "r", "TRAINER.HICROPL.PROMPT_DEPTH", "99", env={"VLPROMPT_TRACEBACK": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "PROMPT_DEPTH=99" in proc.stderr
    bug = ("import runpy, sys; import trainers.clip_prompt as t\n"
           "def broken(*a, **k): raise ZeroDivisionError('a bug')\n"
           "t.ClipPromptTrainer.build_model = broken\n"
           "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    cmd = train_command(workspace, tmp_path / "bug")
    proc = run([sys.executable, "-c", bug] + cmd[1:], expect_ok=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ZeroDivisionError: a bug" in proc.stderr
    assert not (tmp_path / "bug").exists()


def lock(folder, pid, host=None, **extra):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".lock").write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid,
                                              "started": "2026-11-30 10:00:00", **extra}))


def test_a_second_process_is_refused_with_the_holders_host_and_pid(workspace, tmp_path):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock(out, holder.pid)
        proc = run(train_command(workspace, out), expect_ok=False)
    finally:
        holder.kill()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{out} is in use by process {holder.pid} on {socket.gethostname()}" in proc.stderr
    assert "delete" in proc.stderr and (out / ".lock").exists() and not (out / "log.txt").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(workspace, tmp_path):
    from vlprompt.files import FolderBusy, exclusive_folder
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "stale"
    lock(folder, dead.pid)
    said = []
    with exclusive_folder(str(folder), report=said.append):
        assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()
        with pytest.raises(FolderBusy, match=f"in use by process {os.getpid()}"):
            with exclusive_folder(str(folder)):
                pass
    assert said == [f"Taking over {folder / '.lock'}: process {dead.pid} on {socket.gethostname()} is no longer running"]
    assert not (folder / ".lock").exists()  # released
    lock(folder, 1, host="another-node", slurm_job="4242")  # a requeued Slurm job's earlier run
    os.environ["SLURM_JOB_ID"] = "4242"
    try:
        with exclusive_folder(str(folder), report=said.append):
            pass
    finally:
        del os.environ["SLURM_JOB_ID"]
    assert "an earlier run of this Slurm job (4242)" in said[-1]
    lock(folder, 1, host="another-node")
    with pytest.raises(FolderBusy, match="in use by process 1 on another-node"):
        with exclusive_folder(str(folder)):
            pass


def test_install_names_the_local_copy_option_when_github_is_unreachable(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"$@\" >> \"$FAKE_LOG\"\ncase \"$*\" in\n"
                    "  \"-c import dassl\") exit 1 ;;\n  *git+https*) echo 'exit code: 128' >&2; exit 1 ;;\nesac\nexit 0\n")
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), FAKE_LOG=str(tmp_path / "log"))
    install = os.path.join(ROOT, "scripts", "install.sh")
    proc = subprocess.run(["bash", install], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "DASSL_SRC=/path/to/Dassl.pytorch bash scripts/install.sh" in proc.stderr
    copy = tmp_path / "Dassl.pytorch"
    copy.mkdir()
    (copy / "setup.py").write_text("")
    proc = subprocess.run(["bash", install], capture_output=True, text=True, env=dict(env, DASSL_SRC=str(copy)))
    assert proc.returncode == 0 and f"installed from {copy}" in proc.stdout
    assert f"-m pip install -q --no-deps --no-build-isolation {copy}" in (tmp_path / "log").read_text()
    proc = subprocess.run(["bash", install], capture_output=True, text=True, env=dict(env, DASSL_SRC=str(tmp_path)))
    assert proc.returncode == 2 and "is not a copy of Dassl.pytorch" in proc.stderr
