"""The task scripts: data root check, output layout, skip finished runs, resume unfinished ones."""
import os
import re
import subprocess

import pytest

from conftest import ROOT, requires_dassl, write_workspace

pytestmark = requires_dassl
SCRIPTS = os.path.join(ROOT, "scripts")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = write_workspace(tmp_path_factory.mktemp("scripts"), {"Caltech101": (6, (4, 2, 3)), "EuroSAT": (6, (4, 2, 3))})
    clip_file = str(root / "tiny_clip.pt")
    environment = dict(os.environ, DATA=str(root / "data"), OUTPUT=str(root / "output"), CFG="demo_tiny_clip",
                       VLPROMPT_CACHE=str(root / "cache"), PYTHONWARNINGS="ignore")
    return root, environment, ["MODEL.BACKBONE.PATH", clip_file]


def script(env, name, *args, extra_env=None, ok=True):
    root, environment, clip_opts = env
    proc = subprocess.run(["bash", os.path.join(SCRIPTS, name), *args, *clip_opts], capture_output=True,
                          text=True, cwd=str(root), env=dict(environment, **(extra_env or {})), timeout=300)
    if ok and proc.returncode != 0:
        raise AssertionError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


def test_data_root_must_be_set(env):
    root, environment, _ = env
    environment = {k: v for k, v in environment.items() if k != "DATA"}
    proc = subprocess.run(["bash", os.path.join(SCRIPTS, "hicropl/base2new_train.sh"), "caltech101", "1"],
                          capture_output=True, text=True, env=environment)
    assert proc.returncode == 2 and "Set DATA to the folder that holds your datasets" in proc.stderr


def test_usage_and_unknown_dataset(env):
    assert "usage:" in script(env, "hicropl/few_shot.sh", ok=False).stderr
    proc = script(env, "hicropl/base2new_train.sh", "flowers", "1", ok=False)
    assert proc.returncode == 2 and "unknown dataset 'flowers'" in proc.stderr


def test_base2new_layout_skip_and_resume(env):
    root = env[0]
    train_dir = root / "output/base2new/train_base/caltech101/shots_16/HiCroPL/demo_tiny_clip/seed1"
    test_dir = root / "output/base2new/test_new/caltech101/shots_16/HiCroPL/demo_tiny_clip/seed1"
    premature = script(env, "hicropl/base2new_test.sh", "caltech101", "1", ok=False)
    assert premature.returncode == 1 and "run bash scripts/hicropl/base2new_train.sh caltech101 1 first" in premature.stderr
    train_dir.mkdir(parents=True)
    (train_dir / "log.txt").write_text("epoch [1/12] ...\n")  # a run killed in its first epoch
    first = script(env, "hicropl/base2new_train.sh", "caltech101", "1")
    assert f"Starting over in {train_dir}: an earlier attempt finished no epoch" in first.stdout
    assert (train_dir / "VLPromptLearner" / "model-best.pth.tar").exists()
    again = script(env, "hicropl/base2new_train.sh", "caltech101", "1")
    assert "skipping" in again.stdout and "epoch [" not in again.stdout
    tested = script(env, "hicropl/base2new_test.sh", "caltech101", "1")
    assert re.search(r"\* accuracy: [\d.]+%", tested.stdout) and "SUBSAMPLE_CLASSES: new" in tested.stdout
    assert (test_dir / "log.txt").exists()
    assert "skipping" in script(env, "hicropl/base2new_test.sh", "caltech101", "1").stdout


def test_cross_dataset_and_few_shot_layouts(env):
    root = env[0]
    script(env, "hicropl/xd_train.sh", "caltech101", "2")
    model_dir = root / "output/caltech101/HiCroPL/demo_tiny_clip_16shots/seed2"
    assert (model_dir / "VLPromptLearner" / "model.pth.tar-12").exists()
    tested = script(env, "hicropl/xd_test.sh", "eurosat", "2", extra_env={"SOURCE": "caltech101"})
    assert "model.pth.tar-12" in tested.stdout  # the last epoch, read from the config
    assert (root / "output/evaluation/HiCroPL/demo_tiny_clip_16shots/eurosat/seed2/log.txt").exists()
    script(env, "hicropl/few_shot.sh", "eurosat", "2", "3")
    few = root / "output/eurosat/HiCroPL/demo_tiny_clip_2shots/seed3"
    assert "# train_x  12" in (few / "log.txt").read_text()  # 6 classes x 2 shots


def test_zero_shot_rows_sit_beside_trained_methods(env):
    root = env[0]
    script(env, "zsclip/base2new.sh", "eurosat", "INPUT.SIZE", "(32, 32)", "TRAINER.ZSCLIP.PREC", "fp32",
           extra_env={"CFG": "vit_b16"})
    import parse_test_res as ptr
    rows, _, _ = ptr.base2new_summary(str(root / "output/base2new"), trainer="ZeroshotCLIP", out=lambda *_: None)
    assert rows[0]["dataset"] == "eurosat" and rows[0]["base"] is not None and rows[0]["new"] is not None


def test_dcp_scripts_share_the_task_layouts(env):
    root = env[0]
    script(env, "dcp/few_shot.sh", "eurosat", "2", "1")
    run_dir = root / "output/eurosat/DCP/demo_tiny_clip_2shots/seed1"
    assert (run_dir / "MultiModalPromptLearner" / "model.pth.tar-4").exists()
    assert "skipping" in script(env, "dcp/few_shot.sh", "eurosat", "2", "1").stdout
    import parse_test_res as ptr
    result = ptr.parse_seeds(str(run_dir.parent), ptr.TRAIN_END, out=lambda *_: None)
    assert result["n"] == 1
