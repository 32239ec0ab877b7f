"""What only shows on a GPU, checked on any machine: resume reads on the CPU and restores the
run's own CUDA generator, class features are computed on the run's device, emulated bf16 is
refused, and a run says which device it uses."""
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, requires_dassl
from helpers import in_process_trainer


class FakeCuda:
    """torch.cuda's RNG and device functions for `visible` GPUs, as a CPU-only machine cannot
    provide them: each GPU's generator state is a distinct byte tensor."""

    def __init__(self, monkeypatch, visible, native_bf16=True):
        self.visible, self.native_bf16, self.restored = visible, native_bf16, []
        for name in ("get_rng_state", "set_rng_state", "device_count", "current_device", "get_device_name",
                     "is_bf16_supported"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def _index(self, device):
        index = torch.device(device).index or 0
        if index >= self.visible:
            raise IndexError(f"cuda:{index} with {self.visible} visible GPU(s)")
        return index

    def get_rng_state(self, device="cuda"):
        return torch.full((16,), 10 + self._index(device), dtype=torch.uint8)

    def set_rng_state(self, state, device="cuda"):
        self.restored.append((self._index(device), state.clone()))

    def device_count(self):
        return self.visible

    def current_device(self):
        return 0

    def get_device_name(self, device=None):
        return "Fake GPU"

    def is_bf16_supported(self, including_emulation=True):
        return self.native_bf16 or including_emulation


@requires_dassl
def test_a_run_started_on_four_gpus_resumes_on_one(monkeypatch):
    """Only the run's own CUDA generator is saved, and restored on the run's device."""
    from trainers.checkpointed_trainer import rng_state, set_rng_state
    FakeCuda(monkeypatch, visible=4)
    saved = rng_state(torch.device("cuda", 0))
    assert torch.equal(saved["cuda"], torch.full((16,), 10, dtype=torch.uint8))
    one_gpu = FakeCuda(monkeypatch, visible=1)
    set_rng_state(saved, torch.device("cuda", 0))
    assert [(index, state.tolist()) for index, state in one_gpu.restored] == [(0, [10] * 16)]


@requires_dassl
def test_resume_reads_on_the_cpu_and_optimizer_state_follows_the_parameters(workspace, tmp_path):
    """The resume file is read on the CPU whatever the run's device, so numpy's RNG key becomes a
    numpy array again; the optimizer moments move to the parameters' device while Adam's step
    counters stay on the CPU. A CPU-only machine stands in for the GPU with the meta device."""
    from dassl.optim import build_optimizer
    trainer = in_process_trainer(workspace, tmp_path)
    trainer.batch_idx, trainer.num_batches = 0, 2
    trainer.forward_backward(next(iter(trainer.train_loader_x)))  # Adam now has moments
    trainer.save_resume_state(0)
    saved_keys = np.random.get_state()[1].copy()
    np.random.seed(12345)

    name = trainer.get_model_names()[0]
    trainer._models[name].to("meta")  # the parameters now live elsewhere than the CPU
    trainer._optims[name] = build_optimizer(trainer._models[name], trainer.cfg.OPTIM)
    trainer._scheds[name].optimizer = trainer._optims[name]
    trainer.device = torch.device("meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load_state_dict into meta parameters is a no-op copy
        assert trainer.resume_model_if_exist(trainer.output_dir) == 1
    assert np.array_equal(np.random.get_state()[1], saved_keys)
    states = list(trainer._optims[name].state.values())
    assert states and all(s["exp_avg"].device.type == "meta" and s["step"].device.type == "cpu" for s in states)


@requires_dassl
@pytest.mark.parametrize("trainer_name", ["HiCroPL", "ZeroshotCLIP"])
def test_class_features_are_computed_on_the_runs_device(workspace, tmp_path, monkeypatch, trainer_name):
    """Frozen class text features are encoded where the run computes (a GPU run does not wait on
    its CPU); the meta device stands in for the GPU."""
    import trainers.checkpointed_trainer as base
    from vlprompt.clip.class_features import ClassFeatureStore
    devices = []

    def spy(store, text_encoder, classnames, texts, chunk=256, normalize_each=False, keep_each=False):
        devices.append(text_encoder.text_projection.device)
        return torch.randn(len(classnames), text_encoder.text_projection.shape[1])

    monkeypatch.setattr(ClassFeatureStore, "features", spy)
    monkeypatch.setattr(base, "run_device", lambda requested: torch.device("meta"), raising=False)
    trainer = in_process_trainer(workspace, tmp_path, trainer=trainer_name)
    assert devices == [torch.device("meta")] and trainer.device == torch.device("meta")


@requires_dassl
def test_emulated_bf16_is_refused_on_a_gpu(monkeypatch):
    from trainers.clip_prompt import check_precision
    FakeCuda(monkeypatch, visible=1, native_bf16=False)
    with pytest.raises(ValueError, match=r"TRAINER.HICROPL.PREC=bf16 but this GPU \(Fake GPU\) has no native bf16"):
        check_precision("bf16", "TRAINER.HICROPL.PREC", on_cuda=True)
    check_precision("fp16", "TRAINER.HICROPL.PREC", on_cuda=True)
    FakeCuda(monkeypatch, visible=1, native_bf16=True)
    check_precision("bf16", "TRAINER.HICROPL.PREC", on_cuda=True)


@requires_dassl
def test_a_run_names_its_device_and_warns_when_gpus_sit_idle(monkeypatch):
    from trainers.checkpointed_trainer import device_report, run_device
    FakeCuda(monkeypatch, visible=4)
    device = run_device(torch.device("cuda"))
    assert device == torch.device("cuda", 0)
    lines = device_report(device, visible_gpus=4)
    assert lines[0] == "Device: cuda:0 (Fake GPU)"
    assert "4 GPUs are visible but a run uses one (cuda:0)" in lines[1] and "vlprompt.sweep" in lines[1]
    assert device_report(device, visible_gpus=1) == ["Device: cuda:0 (Fake GPU)"]
    assert device_report(torch.device("cpu"), visible_gpus=0) == ["Device: cpu"]


# ---- VLPROMPT_DEVICE: on the CPU unless asked --------------------------------------------------
def fake_visible_gpu(monkeypatch):
    """torch.cuda says a GPU is there unless CUDA_VISIBLE_DEVICES hides it (as the real one
    does before CUDA starts); initialising CUDA (what any CUDA tensor, RNG state, stream or
    device query does) is recorded and fails, as it would leave a context on GPU 0."""
    initialised = []

    def lazy_init():
        initialised.append(1)
        raise AssertionError("CUDA was initialised")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    visible = lambda: os.environ.get("CUDA_VISIBLE_DEVICES") != ""
    monkeypatch.setattr(torch.cuda, "is_available", visible)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(visible()))
    monkeypatch.setattr(torch.cuda, "_lazy_init", lazy_init)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: lazy_init())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: lazy_init())
    return initialised


def test_the_suite_and_its_runs_are_pinned_to_the_cpu():
    from helpers import script_env
    assert os.environ["VLPROMPT_DEVICE"] == "cpu"  # conftest.py; the runs the tests start inherit it
    assert script_env(Path("/w"), Path("/o"))["VLPROMPT_DEVICE"] == "cpu"
    demo = open(os.path.join(ROOT, "scripts", "demo.sh")).read()
    assert "export VLPROMPT_DEVICE=${VLPROMPT_DEVICE:-cpu}" in demo


@requires_dassl
@pytest.mark.parametrize("switch", ["cpu", None])
def test_with_a_gpu_visible_the_cpu_switch_never_initialises_cuda(switch, workspace, tmp_path, monkeypatch):
    """A training step and an evaluation with a (fake) GPU visible: VLPROMPT_DEVICE=cpu keeps
    the run on the CPU without initialising CUDA; unset, the run takes the GPU (Dassl's rule),
    which shows the fake is seen."""
    initialised = fake_visible_gpu(monkeypatch)
    if switch is None:
        monkeypatch.delenv("VLPROMPT_DEVICE", raising=False)
        with pytest.raises(AssertionError, match="CUDA was initialised"):
            in_process_trainer(workspace, tmp_path)
        assert initialised
        return
    monkeypatch.setenv("VLPROMPT_DEVICE", switch)
    trainer = in_process_trainer(workspace, tmp_path, "OPTIM.MAX_EPOCH", "1", "TRAINER.HICROPL.PREC", "amp")
    assert trainer.device == torch.device("cpu") and not trainer.cfg.USE_CUDA
    trainer.train()
    assert not initialised and not torch.cuda.is_initialized()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""  # train.py's data workers and children too


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "CPU "])
def test_a_wrong_device_switch_is_a_clear_error(value):
    from vlprompt.device import requested_device
    from vlprompt.errors import InvalidValue
    with pytest.raises(InvalidValue, match=r"VLPROMPT_DEVICE=.* is invalid: use cpu, cuda or cuda:N"):
        requested_device({"VLPROMPT_DEVICE": value})


def test_a_gpu_asked_for_where_none_is_visible_is_a_clear_error(monkeypatch):
    from types import SimpleNamespace
    from vlprompt.device import apply_to_cfg
    from vlprompt.errors import InvalidValue
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidValue, match=r"VLPROMPT_DEVICE=cuda:1 but no GPU is visible"):
        apply_to_cfg(SimpleNamespace(USE_CUDA=False), {"VLPROMPT_DEVICE": "cuda:1"})


def test_fp32_gpu_runs_use_tf32_unless_deterministic():
    import train
    try:
        assert "TF32 on" in train.configure_determinism(False, on_cuda=True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert "TF32 off" in train.configure_determinism(True, on_cuda=True)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert train.configure_determinism(False, on_cuda=False) == ""
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        train.set_tf32(False)
