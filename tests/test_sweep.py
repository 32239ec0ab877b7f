"""The sweep: grid expansion, dry run, submitit's local executor on a tiny grid (skip, resume),
and the Slurm submission it generates (checked without a cluster)."""
import os
import re
import stat
import subprocess
import sys
import time

import pytest

from conftest import ROOT, requires_dassl
from vlprompt.experiments import sweep
from vlprompt.experiments.results import TEST_END, TRAIN_END, read_run


def test_grid_orders_tests_after_their_training():
    grid = sweep.Grid("xd", "HiCroPL", "cfg", "out", ["dtd", "eurosat"], [1, 2])
    runs = grid.expand()
    assert [r.key for r in runs][:3] == ["xd_train/imagenet/seed1", "xd_test/dtd/seed1", "xd_test/eurosat/seed1"]
    assert runs[1].after == ("xd_train/imagenet/seed1",)
    assert runs[1].outputs == (("out/evaluation/HiCroPL/cfg_16shots/dtd/seed1", "test"),)
    groups = sweep.stages(runs)
    assert [len(g) for g in groups] == [2, 4]  # both trainings, then the four tests
    fewshot = sweep.Grid("fewshot", "DCP", "c", "o", ["dtd"], [1], shots=[1, 16]).expand()
    assert [(r.args, r.outputs[0][0]) for r in fewshot] == [(("dtd", "1", "1"), "o/dtd/DCP/c_1shots/seed1"),
                                                            (("dtd", "16", "1"), "o/dtd/DCP/c_16shots/seed1")]
    zero_shot = sweep.Grid("base2new", "ZeroshotCLIP", "vit_b16", "o", ["dtd"], [1, 2, 3]).expand()
    assert len(zero_shot) == 1 and [kind for _, kind in zero_shot[0].outputs] == ["test", "test"]


def test_dry_run_lists_the_expected_commands(capsys):
    assert sweep.main(["--task", "base2new", "--trainer", "HiCroPL", "--datasets", "dtd", "--seeds", "1", "2",
                       "--data", "/data", "--output", "/nowhere", "--dry-run", "--", "TRAINER.HICROPL.PREC", "amp"]) == 0
    out = capsys.readouterr().out
    env = "DATA=/data OUTPUT=/nowhere CFG=vit_b16_c2_ep50_batch32_16ctx"  # no SOURCE: base-to-new has none
    run = f"{sys.executable} -m vlprompt.run"
    for seed in (1, 2):
        assert (f"base2new_train/dtd/seed{seed}: {env} {run} base2new_train HiCroPL dtd {seed} "
                f"TRAINER.HICROPL.PREC amp") in out
        assert (f"base2new_test/dtd/seed{seed}: {env} {run} base2new_test HiCroPL dtd {seed} "
                f"TRAINER.HICROPL.PREC amp   [after base2new_train/dtd/seed{seed}]") in out
    assert "4 runs, 0 finished already, 4 to run" in out
    assert "SOURCE=" not in out


def test_toy_keyword_selects_the_toy_worlds_datasets_and_source(capsys, monkeypatch):
    monkeypatch.delenv("DATA", raising=False)
    assert sweep.main(["--task", "xd", "--trainer", "HiCroPL", "--datasets", "toy", "--seeds", "1",
                       "--output", "/nowhere", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "SOURCE=toy_objects" in captured.out
    assert "xd_train HiCroPL toy_objects 1" in captured.out
    assert [line.split(":")[0] for line in captured.out.splitlines() if line.startswith("xd_test/")] == \
        ["xd_test/toy_patterns/seed1", "xd_test/toy_textiles/seed1"]
    assert "warning: DATA is not set" in captured.err  # a dry run still shows the commands
    assert sweep.main(["--task", "dg", "--trainer", "HiCroPL", "--datasets", "toy", "--seeds", "1",
                       "--data", "/d", "--dry-run"]) == 0
    assert "xd_test HiCroPL toy_objects_shifted 1" in capsys.readouterr().out


def test_unknown_dataset_is_refused_with_the_known_names():
    with pytest.raises(sweep.SweepError, match=r"unknown dataset\(s\) caltech: .*Known: .*caltech101.*toy_objects"):
        sweep.main(["--task", "base2new", "--trainer", "HiCroPL", "--datasets", "caltech", "--dry-run"])
    with pytest.raises(sweep.SweepError, match=r"unknown dataset\(s\) imagenet1k"):
        sweep.main(["--task", "xd", "--trainer", "HiCroPL", "--datasets", "dtd", "--source", "imagenet1k",
                    "--dry-run"])
    proc = subprocess.run([sys.executable, "-m", "vlprompt.sweep", "--task", "base2new", "--trainer", "HiCroPL",
                           "--datasets", "caltech", "--dry-run"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown dataset(s) caltech: "), proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


KILLER = """#!{python}
# Stands in for python: kills training runs of seed 1 after their first epoch, like a preempted job.
import os, runpy, signal, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))  # the toolkit, as for train.py itself
if "seed1" in " ".join(sys.argv) and "--eval-only" not in sys.argv:
    import trainers.checkpointed_trainer as base
    original = base.CheckpointedTrainer.after_epoch
    def after_epoch(self):
        original(self)
        os.kill(os.getpid(), signal.SIGKILL)
    base.CheckpointedTrainer.after_epoch = after_epoch
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@requires_dassl
def test_local_executor_runs_skips_and_resumes_a_tiny_grid(workspace, tmp_path, capsys, monkeypatch):
    output, logs = tmp_path / "output", tmp_path / "logs"
    argv = ["--task", "base2new", "--trainer", "HiCroPL", "--datasets", "caltech101", "--seeds", "1", "2",
            "--cfg", "demo_tiny_clip", "--data", str(workspace / "data"), "--output", str(output),
            "--folder", str(logs), "--parallel", "2", "--", "MODEL.BACKBONE.PATH", str(workspace / "tiny_clip.pt"),
            "OPTIM.MAX_EPOCH", "3", "MODEL.FEATURE_CACHE_DIR", str(tmp_path / "cache")]
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    killer = tmp_path / "python_that_kills"
    killer.write_text(KILLER.format(python=sys.executable))
    killer.chmod(killer.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PYTHON", str(killer))
    assert sweep.main(argv) == 1  # seed 1's training was killed; its test could not start
    out = capsys.readouterr().out
    assert "base2new_train/caltech101/seed1: failed" in out and "base2new_test/caltech101/seed1: blocked" in out
    assert "done: 2 ok, 2 not" in out
    monkeypatch.delenv("PYTHON")
    assert sweep.main(argv) == 0  # the killed run resumes, its test follows, seed 2 is skipped
    out = capsys.readouterr().out
    assert "4 runs, 2 finished already, 2 to run" in out and "done: 2 ok, 0 not" in out
    train_dir = output / "base2new/train_base/caltech101/shots_16/HiCroPL/demo_tiny_clip/seed1"
    resumed_logs = sorted(p.name for p in train_dir.iterdir() if p.name.startswith("log.txt"))
    assert len(resumed_logs) == 2 and "after epoch 1" in (train_dir / resumed_logs[1]).read_text()
    for seed in (1, 2):
        common = f"caltech101/shots_16/HiCroPL/demo_tiny_clip/seed{seed}"
        assert read_run(str(output / "base2new/train_base" / common), TRAIN_END).value is not None
        assert read_run(str(output / "base2new/test_new" / common), TEST_END).value is not None
    assert sweep.main(argv) == 0  # everything finished: nothing is started
    assert "4 runs, 4 finished already, 0 to run" in capsys.readouterr().out

    from vlprompt.experiments.report import report  # the report on this grid
    result = report("base2new", ["HiCroPL/demo_tiny_clip"], str(output), ["caltech101"], seeds=[1, 2],
                    out=str(tmp_path / "report"), echo=lambda *_: None)
    assert result.rows[0].datasets["caltech101"].complete and result.rows[0].average.complete
    assert (tmp_path / "report" / "base2new.png").stat().st_size > 10_000


def test_slurm_submission_is_generated_without_a_cluster(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(
        f"#!/bin/sh\nn=$(ls {tmp_path}/sent 2>/dev/null | wc -l)\nmkdir -p {tmp_path}/sent\n"
        f"cp \"$1\" {tmp_path}/sent/$((n + 1)).sh\necho \"Submitted batch job $((700 + n + 1))\"\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    profile = tmp_path / "cluster.yaml"
    profile.write_text("partition: a100\ntime: 600\nmem: 48GB\ncpus_per_task: 6\n")
    assert sweep.main(["--task", "base2new", "--trainer", "DCP", "--datasets", "dtd", "eurosat", "food101",
                       "--seeds", "1", "--data", "/data", "--output", str(tmp_path / "out"), "--executor", "slurm",
                       "--folder", str(tmp_path / "logs"), "--profile", str(profile), "--time", "120",
                       "--array-parallelism", "2"]) == 0
    assert "submitted 3 run(s) as Slurm array 702 of 3 job(s), 1 GPU(s) and up to 1 run(s) each, after 701" in \
        capsys.readouterr().out
    trains, tests = ((tmp_path / "sent" / f"{i}.sh").read_text() for i in (1, 2))
    for flag in ("--array=0-2%2", "--partition=a100", "--time=120", "--mem=48GB", "--cpus-per-task=6",
                 "--gpus-per-node=1", f"--output={tmp_path / 'logs'}/%A_%a_0_log.out"):
        assert f"#SBATCH {flag}" in trains and f"#SBATCH {flag}" in tests
    assert "--dependency" not in trains and "#SBATCH --dependency=afterok:701" in tests
    assert (tmp_path / "logs" / "701_submission.sh").exists()


def test_bad_profile_key_is_named(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("partitoin: gpu\n")
    with pytest.raises(sweep.SweepError, match="unknown key.*partitoin"):
        sweep.slurm_params(sweep.parse_args(["--task", "xd", "--trainer", "HiCroPL", "--profile", str(profile)]))


def test_slurm_jobs_with_several_gpus_run_one_run_per_gpu(tmp_path, monkeypatch, capsys):
    """--gpus-per-node 2: each job asks for 2 GPUs (and twice the per-run CPUs and memory) and
    runs 2 runs of its stage at once, so no requested GPU idles."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path}/sent.sh\necho \"Submitted batch job 900\"\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert sweep.main(["--task", "fewshot", "--trainer", "DCP", "--datasets", "dtd", "--shots", "1", "2", "4",
                       "--seeds", "1", "--data", "/data", "--output", str(tmp_path / "out"), "--executor", "slurm",
                       "--folder", str(tmp_path / "logs"), "--gpus-per-node", "2", "--cpus-per-task", "6",
                       "--mem", "40GB"]) == 0
    assert "submitted 3 run(s) as Slurm array 900 of 2 job(s), 2 GPU(s) and up to 2 run(s) each" in capsys.readouterr().out
    script = (tmp_path / "sent.sh").read_text()
    for flag in ("--array=0-1%2", "--gpus-per-node=2", "--cpus-per-task=12", "--mem=80GB"):
        assert f"#SBATCH {flag}" in script


def test_a_job_gives_each_of_its_runs_its_own_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    show = [sys.executable, "-c", "import os; print('gpu', os.environ['CUDA_VISIBLE_DEVICES'])"]
    out = sweep.execute_runs([show, show], {})
    assert sorted(out.split()) == ["3", "5", "gpu", "gpu"]
    with pytest.raises(RuntimeError, match="3 runs packed into a job that sees 2 GPU"):
        sweep.execute_runs([show] * 3, {})
    fail = [sys.executable, "-c", "import sys; sys.exit('broken run')"]
    with pytest.raises(RuntimeError, match="exited with 1:\nbroken run"):
        sweep.execute_runs([show, fail], {})


def test_packed_runs_with_long_outputs_run_at_the_same_time(monkeypatch, tmp_path, capsys):
    """Four runs of one job, each printing 1 MiB and then working for 3 s: all finish printing
    within the first seconds (read through pipes one after another, run k waited for runs 1..k-1:
    at least 3 s apart each), and each run's output is in its own log."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    stamp = tmp_path / "stamps"
    stamp.mkdir()
    code = ("import os, sys, time; sys.stdout.write('x' * 2**20 + '\\n'); sys.stdout.flush(); "
            f"open(os.path.join({str(stamp)!r}, os.environ['CUDA_VISIBLE_DEVICES']), 'w').write(repr(time.time())); "
            "time.sleep(3); print('done')")
    started = time.time()
    out = sweep.execute_runs([[sys.executable, "-c", code]] * 4, {})
    printed = [float((stamp / gpu).read_text()) for gpu in "0123"]
    assert max(printed) - started < 2.5, [round(t - started, 2) for t in printed]
    assert time.time() - started < 8  # one run's 3 s, not four
    assert out.count("done") == 4
    logs = re.findall(r"^== .* \(log (.+)\)$", capsys.readouterr().out, re.M)
    assert len(set(logs)) == 4 and all(os.path.getsize(log) > 2**20 for log in logs)
