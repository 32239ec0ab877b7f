"""Issue 19 (honest runs): a result is labelled with what produced it, nothing a user asked for is
silently changed or ignored; the experiment tooling in its own subpackage without import cycles."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "vlprompt", "experiments")


def experiments_imports():
    """module -> the vlprompt.experiments modules it imports (at any depth of its code)."""
    names = {f[:-3] for f in os.listdir(EXPERIMENTS) if f.endswith(".py") and f != "__init__.py"}
    graph = {}
    for name in names:
        tree = ast.parse(open(os.path.join(EXPERIMENTS, f"{name}.py")).read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level == 1 and not module:  # from . import x
                    found |= {a.name for a in node.names if a.name in names}
                elif node.level == 1 or module.startswith("vlprompt.experiments."):
                    found.add(module.split(".")[-1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[-1] for a in node.names if a.name.startswith("vlprompt.experiments.")}
        graph[name] = found & names
    return graph


def test_experiment_tooling_has_no_import_cycle():
    graph = experiments_imports()
    assert {"run", "sweep", "report", "report_figures", "results", "layout"} <= set(graph)
    assert "report" not in graph["report_figures"]  # they imported each other

    def visit(name, path):
        assert name not in path, f"import cycle: {' -> '.join(path + [name])}"
        for other in graph[name]:
            visit(other, path + [name])

    for name in graph:
        visit(name, [])


# ---- item 1 and 7: the run record; a run is resumed or skipped only with its own options -----------
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from conftest import requires_dassl  # noqa: E402
from helpers import script_env, tiny_options  # noqa: E402

COOP_ARGS = ("base2new_train", "CoOp", "caltech101", "1")


@pytest.fixture(scope="module")
def finished_run(workspace, tmp_path_factory):
    """One finished CoOp base-to-new training (1 epoch, tiny data and CLIP) through vlprompt.run."""
    tmp = tmp_path_factory.mktemp("honest")
    env = script_env(workspace, tmp / "output")
    options = tiny_options(workspace, "COOP", "OPTIM.MAX_EPOCH", "1", "DATALOADER.TRAIN_X.BATCH_SIZE", "4")
    proc = subprocess.run([sys.executable, "-m", "vlprompt.run", *COOP_ARGS, *options], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = tmp / "output/base2new/train_base/caltech101/shots_16/CoOp/vit_b16_ctxv1/seed1"
    return folder, env, options, proc.stdout


def run_main(env, *args):
    from vlprompt.experiments import run
    return run.main(list(args), env)


@requires_dassl
def test_a_run_records_what_produced_it(finished_run):
    folder, _, _, stdout = finished_run
    assert "epoch 1/1 took " in stdout and " s; 0:00:00 left at the average epoch time (" in stdout  # item 6's ETA
    record = json.loads((folder / "run.json").read_text())
    assert record["config"]["OPTIM.MAX_EPOCH"] == 1 and record["config"]["TRAINER.NAME"] == "CoOp"
    assert record["config"]["DATASET.SUBSAMPLE_CLASSES"] == "base" and record["config"]["--eval-only"] is False
    assert record["settings"]["ctx_init"] == "a photo of a" and "COOP.N_CTX" in record["reads"]
    assert len(record["backbone"]["fingerprint"]) == 64 and record["backbone"]["path"].endswith("tiny_clip.pt")
    assert record["dataset"]["name"] == "Caltech101" and record["dataset"]["classes"] == 3  # base half of 6
    assert record["request"]["argv"][:2] == ["--output-dir", str(folder)]
    assert all(len(sha) == 64 for sha in record["request"]["files"].values())


@requires_dassl
def test_a_finished_run_is_skipped_only_with_its_own_options(finished_run, capsys):
    folder, env, options, _ = finished_run
    assert run_main(env, *COOP_ARGS, *options) == 0
    assert "made with these options: skipping" in capsys.readouterr().out
    # harmless keys may differ, and the output says they did
    assert run_main(env, *COOP_ARGS, *options, "DATALOADER.NUM_WORKERS", "1", "TRAIN.PRINT_FREQ", "3") == 0
    out = capsys.readouterr().out
    assert "skipping" in out and "cannot change the results" in out and "DATALOADER.NUM_WORKERS 0 -> 1" in out
    # other options: refused, naming the keys and both ways out
    assert run_main(env, *COOP_ARGS, *options, "OPTIM.MAX_EPOCH", "2", "OPTIM.LR", "0.1") == 2
    err = capsys.readouterr().err
    assert f"{folder} holds a finished run made with other options" in err
    assert "OPTIM.LR 0.002 -> 0.1" in err and "OPTIM.MAX_EPOCH 1 -> 2" in err and "DATALOADER" not in err
    assert "--restart" in err and "new output folder" in err
    assert not (folder / "prompt_learner" / "model.pth.tar-2").exists()


@requires_dassl
def test_an_unfinished_run_is_not_resumed_with_other_options(finished_run, tmp_path):
    """train.py itself (the entry of every resume) refuses before writing anything; --restart passes."""
    import train
    folder, env, options, _ = finished_run
    unfinished = tmp_path / "seed1"
    unfinished.mkdir()
    (unfinished / "run.json").write_text((folder / "run.json").read_text())  # started, no epoch finished
    argv = json.loads((folder / "run.json").read_text())["request"]["argv"]
    argv[argv.index("--output-dir") + 1] = str(unfinished)
    with pytest.raises(Exception) as refused:
        train.main(train.build_parser().parse_args(argv + ["OPTIM.LR", "0.1"]))
    assert type(refused.value).__name__ == "ChangedRun"
    assert "holds an unfinished run made with other options: OPTIM.LR 0.002 -> 0.1" in str(refused.value)
    assert sorted(p.name for p in unfinished.iterdir()) == ["run.json"]
    args = train.build_parser().parse_args(["--restart"] + argv + ["OPTIM.LR", "0.1"])
    assert train.check_record(train.setup_cfg(args), args) == (None, None)
    args = train.build_parser().parse_args(argv + ["DATALOADER.TEST.BATCH_SIZE", "7"])  # batch-independent
    previous, changes = train.check_record(train.setup_cfg(args), args)
    assert previous is not None and [c[0] for c in changes.harmless] == ["DATALOADER.TEST.BATCH_SIZE", "OUTPUT_DIR"]


# ---- item 3: what used to succeed silently -------------------------------------------------------
def train_cli(monkeypatch, argv):
    """train.py's command line in this process: its exit status (SystemExit) and stderr."""
    import train
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    with pytest.raises(SystemExit) as exited:
        train.cli()
    return exited.value.code


def hicropl_argv(workspace, out, *extra):
    from helpers import train_command
    return train_command(workspace, out, *extra)[2:]


@requires_dassl
def test_eval_only_without_model_dir_is_refused(workspace, tmp_path, monkeypatch, capsys):
    assert train_cli(monkeypatch, hicropl_argv(workspace, tmp_path / "out", "--eval-only")) == 2
    err = capsys.readouterr().err
    assert "--eval-only without --model-dir: HiCroPL trains, so this would evaluate its untrained prompts" in err
    assert not (tmp_path / "out").exists()


@requires_dassl
@pytest.mark.parametrize("make", ["missing", "empty"])
def test_resume_from_a_folder_without_checkpoint_is_refused(workspace, tmp_path, monkeypatch, capsys, make):
    resume = tmp_path / "nonexistent"
    if make == "empty":
        resume.mkdir()
    assert train_cli(monkeypatch, ["--resume", str(resume), *hicropl_argv(workspace, tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"--resume {resume}: " in err and "training would start from scratch" in err
    assert ("no such folder" if make == "missing" else "no checkpoint in it") in err


def test_an_empty_class_folder_is_refused(tmp_path):
    from datasets.coop_split import DatasetLayoutError
    from datasets.imagenet import read_class_folders
    for wnid in ("n01", "n02", "n03"):
        (tmp_path / wnid).mkdir()
    for wnid in ("n01", "n03"):
        (tmp_path / wnid / "a.jpg").write_bytes(b"x")
    with pytest.raises(DatasetLayoutError) as refused:
        read_class_folders(str(tmp_path), {"n01": "dog", "n02": "cat", "n03": "cow"}, "ImageNetSketch")
    assert f"class folder {tmp_path / 'n02'} (cat) is empty: ImageNetSketch would lose that class" in str(refused.value)


@requires_dassl
def test_another_methods_options_are_warned_about_naming_the_trainers_node(workspace, tmp_path):
    import train
    from helpers import train_command
    argv = train_command(workspace, tmp_path, "TRAINER.MAPLE.N_CTX", "8", "TRAINER.COOP.CSC", "True")[2:]
    cfg = train.setup_cfg(train.build_parser().parse_args(argv))
    assert train.unread_keys_warning(cfg) == (
        "warning: TRAINER.COOP.CSC, TRAINER.MAPLE.N_CTX are not read by HiCroPL and change nothing: its options are "
        "under TRAINER.HICROPL (python train.py --trainer HiCroPL --help-config lists them)")
    own = train.setup_cfg(train.build_parser().parse_args(train_command(workspace, tmp_path)[2:]))
    assert train.unread_keys_warning(own) == ""  # its own keys (set by the recipe and the test options)


# ---- item 2: more shots than images ------------------------------------------------------------
@requires_dassl
def test_more_shots_than_images_is_refused_unless_allowed(tmp_path, monkeypatch, capsys):
    from datasets.synthetic import write_dataset
    from helpers import build_dataset
    from vlprompt.errors import InvalidValue
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path / "cache"))
    write_dataset(str(tmp_path / "data"), "EuroSAT", 4, (3, 2, 2))
    with pytest.raises(InvalidValue) as refused:
        build_dataset(tmp_path / "data", "EuroSAT", shots=5)
    assert str(refused.value).startswith("DATASET.NUM_SHOTS=5 but 4 of 4 classes of EuroSAT have fewer training "
                                         "images (")
    assert "Use DATASET.NUM_SHOTS 3 or less, or set DATASET.ALLOW_FEWER_SHOTS True" in str(refused.value)
    assert not (tmp_path / "data/eurosat/split_fewshot").exists()  # nothing cached under the wrong name

    from helpers import make_cfg
    from dassl.data.datasets import build_dataset as dassl_build_dataset
    cfg = make_cfg(tmp_path / "data", "EuroSAT", shots=5)
    cfg.DATASET.ALLOW_FEWER_SHOTS = True
    dataset = dassl_build_dataset(cfg)
    assert len(dataset.train_x) == 4 * 3
    assert "DATASET.ALLOW_FEWER_SHOTS is True: those classes train on fewer (at least 3 of 5 per class)" in \
        capsys.readouterr().out


def test_fewer_shots_are_said_by_parse_test_res_and_the_report(tmp_path):
    from helpers import eval_log, train_log, write
    from vlprompt.experiments import record
    from vlprompt.experiments.report import build
    import parse_test_res as ptr
    common = "caltech101/shots_16/HiCroPL/c16/seed1"
    write(tmp_path / "base2new/train_base" / common / "log.txt", train_log(80.0))
    write(tmp_path / "base2new/test_new" / common / "log.txt", eval_log(60.0))
    record.write(str(tmp_path / "base2new/train_base" / common),
                 {"trainer": "HiCroPL", "dataset": {"num_shots": 16, "shots_used": 4}, "config": {}})
    note = "4 of 16 shots per class for some classes (DATASET.ALLOW_FEWER_SHOTS)"
    _, _, problems = ptr.base2new_summary(str(tmp_path / "base2new"), out=lambda *_: None)
    assert any(p.endswith(f"seed1: note: {note}") for p in problems)
    report = build("base2new", ["HiCroPL/c16"], str(tmp_path), ["caltech101"], seeds=[1], figures=False)
    assert f"## Notes\n\n- {tmp_path / 'base2new/train_base' / common}: {note}\n" in report.markdown


# ---- item 5: no tracebacks -----------------------------------------------------------------------
@requires_dassl
@pytest.mark.parametrize("where", ["the folder", "a parent"])
def test_an_output_folder_that_is_a_file_is_one_message(workspace, tmp_path, monkeypatch, capsys, where):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    out = a_file if where == "the folder" else a_file / "base2new" / "seed1"
    assert train_cli(monkeypatch, hicropl_argv(workspace, out)) == 2
    err = capsys.readouterr().err
    assert f"error: cannot create the output folder {out}: " in err and "Choose another OUTPUT / --output-dir" in err
    assert a_file.read_text() == "not a folder"


@requires_dassl
def test_an_output_folder_that_is_not_writable_is_one_message(workspace, tmp_path, monkeypatch, capsys):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path / "ro") else
                        real_access(path, mode))  # as root, chmod would not stop a write
    (tmp_path / "ro").mkdir()
    assert train_cli(monkeypatch, hicropl_argv(workspace, tmp_path / "ro")) == 2
    assert f"error: the output folder {tmp_path / 'ro'} is not writable" in capsys.readouterr().err


@requires_dassl
def test_help_config_into_a_closed_pipe_is_quiet(monkeypatch):
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert train_cli(monkeypatch, ["--trainer", "HiCroPL", "--help-config"]) == 0


INTERRUPT_AT_SECOND_EPOCH = """
import os, runpy, signal, sys
import trainers.checkpointed_trainer as base
original = base.CheckpointedTrainer.before_epoch
def before_epoch(self):
    if self.epoch == 1:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
    original(self)
base.CheckpointedTrainer.before_epoch = before_epoch
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@requires_dassl
def test_ctrl_c_says_where_the_run_stopped_and_how_to_resume(workspace, tmp_path):
    from helpers import run, train_command
    cmd = train_command(workspace, tmp_path / "out", epochs=3)
    proc = run([sys.executable, "-c", INTERRUPT_AT_SECOND_EPOCH] + cmd[1:], expect_ok=False)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"Interrupted during epoch 2/3 in {tmp_path / 'out'}: epoch 1 is saved; rerunning the same command resumes "
        f"after epoch 1")


@requires_dassl
def test_a_corrupt_test_image_stops_the_run_before_training(tmp_path):
    from conftest import write_workspace
    from helpers import in_process_trainer
    from trainers.checked_images import BrokenImageError
    root = write_workspace(tmp_path / "ws", {"Caltech101": (4, (2, 1, 1))})
    split = json.loads(next((root / "data").rglob("split_zhou_Caltech101.json")).read_text())
    broken = next((root / "data").rglob(split["test"][0][0]))  # a base class's
    broken.write_bytes(b"\x00" * 100)
    with pytest.raises(BrokenImageError) as refused:
        in_process_trainer(root, tmp_path, "DATASET.NUM_SHOTS", "2")
    assert f"1 image file(s) cannot be read: {broken} (UnidentifiedImageError" in str(refused.value)


# ---- item 6: the newcomer's path ---------------------------------------------------------------
@requires_dassl
def test_a_recipe_that_does_not_fit_the_backbone_names_every_mismatch_and_the_recipe_that_fits():
    import train
    from dassl.engine import TRAINER_REGISTRY
    from vlprompt.clip.loading import backbone_shape, load_clip
    from vlprompt.errors import InvalidValue
    toy = os.path.join(ROOT, "vlprompt", "toyworld", "toy_clip.pt")
    args = train.build_parser().parse_args([
        "--trainer", "HiCroPL", "--config-file", os.path.join(ROOT, "configs/trainers/HiCroPL/vit_b16_c2_ep50_batch32_16ctx.yaml"),
        "--dataset-config-file", os.path.join(ROOT, "configs/datasets/toy_objects.yaml"), "MODEL.BACKBONE.PATH", toy])
    cfg = train.setup_cfg(args)
    trainer = TRAINER_REGISTRY.get("HiCroPL")
    with pytest.raises(InvalidValue) as refused:
        trainer.check_fit(cfg, trainer.settings_from(cfg), backbone_shape(load_clip("ViT-B/16", toy, None)))
    message = str(refused.value)
    assert message.startswith("INPUT.SIZE=(224, 224) does not match the backbone's input resolution 32: set INPUT.SIZE "
                              "(32, 32); TRAINER.HICROPL.PROMPT_DEPTH=12 is invalid: ")
    assert "The recipe does not fit this backbone; demo_toy and demo_tiny_clip fit it: CFG=demo_toy for the scripts" in message


def test_the_eta_comes_from_the_average_epoch_time():
    from trainers.checkpointed_trainer import epoch_eta
    assert epoch_eta([300.0, 10.0, 20.0], epoch=2, max_epoch=10) == \
        "epoch 3/10 took 20.0 s; 0:12:50 left at the average epoch time (110.0 s)"
    assert epoch_eta([5.0], epoch=0, max_epoch=1) == "epoch 1/1 took 5.0 s; 0:00:00 left at the average epoch time (5.0 s)"
