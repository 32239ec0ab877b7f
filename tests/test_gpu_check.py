"""benchmarks/gpu_check.sh on the CPU at its smallest size, so the GPU check cannot rot."""
import os
import subprocess

from conftest import ROOT, requires_dassl


@requires_dassl
def test_gpu_check_passes_on_the_cpu(tmp_path):
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks/gpu_check.sh"), "--device", "cpu",
                           "--size", "smallest", "--keep", str(tmp_path)],
                          capture_output=True, text=True, timeout=1800, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    summary = proc.stdout.split("== summary\n")[-1].splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert [line.split(":")[0] for line in summary] == [
        "PASS train fp16", "PASS train bf16", "PASS train amp",
        "PASS kill after epoch 1 + resume (amp, --deterministic)", "PASS evaluate new classes twice", "PASS benchmark"]
    assert "weights after 2 epochs bitwise equal" in summary[3] and "frozen image features reused" in summary[4]
    assert summary[5].startswith("PASS benchmark: train_step_speedup=")
    assert "on cpu" in summary[0]


def test_gpu_check_refuses_a_bad_device():
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks/gpu_check.sh"), "--device", "gpu0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--device 'gpu0': use cuda, cuda:N or cpu" in proc.stderr
