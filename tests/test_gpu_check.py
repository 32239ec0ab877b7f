"""benchmarks/gpu_check.sh on the CPU at its smallest size, so the GPU check cannot rot, and runs
that must make it FAIL: one that cannot learn, a benchmark slower than the reference, mixed
precision slower than fp32 on a GPU."""
import os
import subprocess
import sys

from conftest import ROOT, requires_dassl

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402


def gpu_check_sh(*args, timeout=1800):
    return subprocess.run(["bash", os.path.join(ROOT, "benchmarks/gpu_check.sh"), *args],
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ, PYTHONWARNINGS="ignore"))


def summary_of(proc):
    return proc.stdout.split("== summary\n")[-1].splitlines()


@requires_dassl
def test_gpu_check_passes_on_the_cpu(tmp_path):
    proc = gpu_check_sh("--device", "cpu", "--size", "smallest", "--keep", str(tmp_path))
    summary = summary_of(proc)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert [line.split(":")[0] for line in summary] == [
        "PASS zero-shot base accuracy", "PASS train fp32", "PASS train fp16", "PASS train bf16", "PASS train amp",
        "PASS speed vs fp32", "PASS kill after epoch 1 + resume (amp, --deterministic)",
        "PASS evaluate new classes twice", "PASS one epoch of every method", "PASS benchmark"]
    assert "on cpu" in summary[1] and "base accuracy" in summary[1] and "vs zero-shot" in summary[1]
    assert "weights after 3 epochs bitwise equal" in summary[6] and "frozen image features reused" in summary[7]
    from helpers import shipped_prompt_methods
    for spec in shipped_prompt_methods():
        if spec.trains and spec.name != "HiCroPL":
            assert f"{spec.name} " in summary[8]
    assert "EdgeCNN " in summary[8] and summary[9].startswith("PASS benchmark: train_step_speedup=")


@requires_dassl
def test_a_run_that_cannot_learn_fails(tmp_path):
    proc = gpu_check_sh("--device", "cpu", "--size", "smallest", "--only", "train", "--precisions", "fp32",
                        "--train-options", "OPTIM.LR", "1e-9")
    summary = summary_of(proc)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert summary[1].startswith("FAIL train fp32") and "the loss did not fall" in summary[1]


def test_a_benchmark_slower_than_the_reference_fails():
    slow = gpu_check.benchmark_verdict("train_step_speedup=0.71 train_step_speedup_500=1.30 eval_speedup=2.00")
    assert slow.status == "FAIL" and "train_step_speedup=0.71 < 1" in slow.figures
    assert gpu_check.benchmark_verdict("train_step_speedup=1.02 train_step_speedup_500=3.1 "
                                       "eval_speedup=2.00 peak_memory_ratio=0.40").status == "PASS"
    assert gpu_check.benchmark_verdict("").status == "FAIL"
    on_cpu = gpu_check.benchmark_verdict("train_step_speedup=0.71 eval_speedup=2.00", on_cuda=False)
    assert on_cpu.status == "PASS" and "below the floor on the CPU: train_step_speedup=0.71 < 1" in on_cpu.figures


def test_mixed_precision_slower_than_fp32_fails_on_a_gpu_only():
    times = {"fp32": 10.0, "fp16": 6.0, "bf16": 6.5, "amp": 12.0}
    on_gpu = gpu_check.speed_verdict(times, on_cuda=True)
    assert on_gpu.status == "FAIL" and "amp SLOWER than fp32" in on_gpu.figures and "fp16 6.00 s (x1.67)" in on_gpu.figures
    assert gpu_check.speed_verdict(times, on_cuda=False).status == "PASS"
    assert gpu_check.speed_verdict({"fp32": 10.0, "amp": 5.0}, on_cuda=True).status == "PASS"


def test_learning_means_a_falling_loss_and_more_than_zero_shot():
    run = lambda losses, accuracy: gpu_check.Training(losses, 1.0, accuracy, "cpu")
    assert gpu_check.learned(run([0.9, 0.7], 76.4), 73.6) == []
    assert "did not fall" in gpu_check.learned(run([0.9, 0.895], 76.4), 73.6)[0]
    assert "not above zero-shot" in gpu_check.learned(run([0.9, 0.7], 73.6), 73.6)[0]
    assert "not finite" in gpu_check.learned(run([0.9, float("nan")], 80.0), 73.6)[0]


def test_the_log_is_read_per_epoch():
    log = ("Device: cuda:0 (Fake)\n"
           "epoch [1/2] batch [1/2] time 0.1 (0.1) data 0.0 (0.0) loss 1.0000 (1.0000) acc 50.0 (50.0) lr 1e-3 eta 0:00:01\n"
           "epoch [1/2] batch [2/2] time 0.1 (0.1) data 0.0 (0.0) loss 0.8000 (0.9000) acc 50.0 (50.0) lr 1e-3 eta 0:00:01\n"
           "time of epoch 1/2: 0.5 s, 0.1 s waiting for data, 0.4 s computing (20% waiting)\n"
           "epoch [2/2] batch [2/2] time 0.1 (0.1) data 0.0 (0.0) loss 0.5000 (0.6000) acc 50.0 (50.0) lr 1e-3 eta 0:00:00\n"
           "time of epoch 2/2: 0.25 s, 0.1 s waiting for data, 0.15 s computing (40% waiting)\n"
           "* accuracy: 80.5%\n")
    run = gpu_check.read_training(log)
    assert run.epoch_losses == [0.9, 0.6] and run.seconds == 0.75 and run.accuracy == 80.5 and run.device == "cuda:0 (Fake)"


def test_gpu_check_refuses_a_bad_device():
    proc = gpu_check_sh("--device", "gpu0", timeout=300)
    assert proc.returncode == 2 and "--device 'gpu0': use cuda, cuda:N or cpu" in proc.stderr
