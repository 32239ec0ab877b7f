"""The base of our Dassl trainers: runs that survive faults and stop clearly.

- checkpoints: atomic, trainable state only, readable with torch.load(weights_only=True), and
  an exact resume after a kill;
- data: an unreadable image stops the run with its path, or is left out on request
  (checked_images.py);
- a non-finite loss stops the run with the step, the precision and what to try, instead of
  training on garbage; amp's skipped steps are counted in the log.

A checkpoint also carries `info`, what rebuilds the model from it alone (the method and its
settings, backbone, input transform and class names: vlprompt.load_classifier reads it).

Dassl's own save/load pickle whole models and scheduler objects and write in place; here the
registered modules' state goes to Dassl's usual file names (`<name>/model-best.pth.tar`,
`<name>/model.pth.tar-N`, `<name>/checkpoint`), and `<name>/resume.pth.tar` keeps the optimizer,
schedule, scaler, best validation result, random states and the trainer's `run_state()` (state
across epochs, such as a running average of weights) of the last finished epoch until training ends.
"""
import datetime
import os
import os.path as osp
import random
import time
from typing import List

import numpy as np
import torch
from dassl.data.datasets import DATASET_REGISTRY
from dassl.engine import TrainerX

from vlprompt.errors import InvalidValue, UserError
from vlprompt.files import CheckpointError, atomic_torch_save, atomic_write_text, load_strict

from .checked_images import build_data_manager

CHECKPOINT_FORMAT = "vlprompt-trainable-1"
RESUME_FILE = "resume.pth.tar"


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or infinite."""


PRECISION_ADVICE = {
    "fp16": "fp16 overflows easily: use PREC amp (loss scaling) or fp32",
    "bf16": "try PREC fp32 or amp",
    "fp32": "lower OPTIM.LR, or check the data and the loss weights",
}


def run_device(requested: torch.device) -> torch.device:
    """The one device a run uses, index included (Dassl asks for plain "cuda")."""
    if requested.type == "cuda" and requested.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return requested


def device_report(device: torch.device, visible_gpus: int) -> List[str]:
    """What the log says about the device: which one, and a warning when GPUs sit idle."""
    if device.type != "cuda":
        return [f"Device: {device}"]
    lines = [f"Device: {device} ({torch.cuda.get_device_name(device)})"]
    if visible_gpus > 1:
        lines.append(
            f"warning: {visible_gpus} GPUs are visible but a run uses one ({device}); the others stay idle "
            f"(Dassl's DataParallel is not used). Run one job per GPU instead: python -m vlprompt.sweep ... "
            f"--gpus 0 1 2 3 (or --executor slurm --gpus-per-node N), or CUDA_VISIBLE_DEVICES=<id> per run.")
    return lines


class CheckpointedTrainer(TrainerX):
    scaler = None  # a torch.amp.GradScaler when the trainer uses one
    # Evaluation logits of one image do not depend on the others in its batch (eval mode: no batch
    # statistics), so the run record lets DATALOADER.TEST.BATCH_SIZE differ on resume.
    batch_independent_eval = True
    amp_skipped = 0  # optimizer steps the scaler skipped this epoch

    @property
    def device(self) -> torch.device:
        return self._device

    @device.setter
    def device(self, requested) -> None:
        # Dassl assigns torch.device("cuda"); resolving the index once keeps the RNG state, the
        # report and every .to() on the same GPU.
        self._device = run_device(torch.device(requested))

    @classmethod
    def check_cfg(cls, cfg):
        """A classmethod, so train.py checks a config before building anything (Dassl's own
        check_cfg, an instance method, does nothing)."""
        names = DATASET_REGISTRY.registered_names()
        if cfg.DATASET.NAME not in names:
            raise InvalidValue(f"DATASET.NAME={cfg.DATASET.NAME!r} is not a registered dataset: use one of "
                             f"{sorted(names)} (or a configs/datasets/*.yaml file)")
        if cfg.DATASET.SUBSAMPLE_CLASSES not in ("all", "base", "new"):
            raise InvalidValue(f"DATASET.SUBSAMPLE_CLASSES={cfg.DATASET.SUBSAMPLE_CLASSES!r} is invalid: "
                             f"must be all, base or new")
        check_data = getattr(DATASET_REGISTRY.get(cfg.DATASET.NAME), "check_cfg", None)
        if check_data is not None:  # a dataset of the user's own images: bad data stops the run here
            check_data(cfg)

    def build_data_loader(self, **custom_transforms):
        for line in device_report(self.device, torch.cuda.device_count() if torch.cuda.is_available() else 0):
            print(line)
        dm = build_data_manager(self.cfg, **custom_transforms)
        self.train_loader_x, self.train_loader_u = dm.train_loader_x, dm.train_loader_u
        self.val_loader, self.test_loader = dm.val_loader, dm.test_loader
        self.num_classes, self.num_source_domains = dm.num_classes, dm.num_source_domains
        self.lab2cname, self.dm = dm.lab2cname, dm

    def stop_if_not_finite(self, loss, precision: str) -> None:
        if torch.isfinite(loss).all():
            return
        raise NonFiniteLossError(
            f"non-finite loss ({loss.item()}) at epoch {self.epoch + 1}, batch {self.batch_idx + 1} "
            f"with precision {precision}: {PRECISION_ADVICE.get(precision, 'try fp32')}. The run stopped "
            f"instead of training on it; rerunning the same command resumes after the last finished epoch.")

    def scaled_step(self, loss, optimizer) -> None:
        """amp: backward and step through the scaler, counting the steps it skips (inf/NaN
        gradients make it skip the step and lower its scale, which is normal, not fatal)."""
        scale = self.scaler.get_scale()
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
        if self.scaler.get_scale() < scale:
            self.amp_skipped += 1

    def before_epoch(self):
        super().before_epoch()
        self.amp_skipped = 0
        self.epoch_started = time.time()

    def after_epoch(self):
        if self.amp_skipped:
            print(f"amp: the gradient scaler skipped {self.amp_skipped} optimizer step(s) this epoch "
                  f"(inf/NaN gradients); scale now {self.scaler.get_scale():g}")
        super().after_epoch()
        self.save_resume_state(self.epoch)
        # Dassl's per-batch "eta" extrapolates this epoch's batches, the slow first one included (5
        # minutes shown for a one-minute demo); this one is from whole epochs, evaluation included.
        self.epoch_times = getattr(self, "epoch_times", []) + [time.time() - self.epoch_started]
        print(epoch_eta(self.epoch_times, self.epoch, self.max_epoch))

    def after_train(self):
        super().after_train()
        # Training is complete: the optimizer moments are no longer needed.
        for name in self.get_model_names():
            path = osp.join(self.output_dir, name, RESUME_FILE)
            if osp.exists(path):
                os.remove(path)

    # ---- checkpoints -------------------------------------------------------------------------
    def save_model(self, epoch, directory, is_best=False, val_result=None, model_name=""):
        """Trainable state only (Dassl's file names and keys), atomically."""
        for name in self.get_model_names():
            state = {
                "format": CHECKPOINT_FORMAT,
                "state_dict": self._models[name].state_dict(),
                "epoch": epoch + 1,
                "val_result": val_result,
                "scheduler": self._scheds[name].state_dict() if self._scheds[name] else None,
                "info": self.checkpoint_info(),
            }
            file_name = model_name or f"model.pth.tar-{epoch + 1}"
            path = osp.join(directory, name, file_name)
            atomic_torch_save(state, path)
            atomic_write_text(osp.join(directory, name, "checkpoint"), file_name + "\n")
            print(f"Checkpoint saved to {path}")

    def checkpoint_info(self) -> dict:
        """What rebuilds the model without the run's config or data (plain values: weights_only
        loading reads them); subclasses say it (ClipPromptTrainer). Default: nothing."""
        return {}

    def save_resume_state(self, epoch):
        """Everything needed to continue after `epoch` exactly: weights, optimizer, schedule,
        scaler, best validation result and random states."""
        for name in self.get_model_names():
            state = {
                "format": CHECKPOINT_FORMAT,
                "state_dict": self._models[name].state_dict(),
                "epoch": epoch + 1,
                "optimizer": self._optims[name].state_dict(),
                "scheduler": self._scheds[name].state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "best_result": float(self.best_result),
                "rng": rng_state(self.device),
                "run_state": self.run_state(),
            }
            atomic_torch_save(state, osp.join(self.output_dir, name, RESUME_FILE))

    def run_state(self) -> dict:
        """State of the run across epochs, beyond modules, optimizers and schedules, that a
        resumed run needs to end as an uninterrupted one would (weights_only-loadable). Default: none."""
        return {}

    def load_run_state(self, state: dict) -> None:
        """Restore what `run_state` returned."""

    def resume_model_if_exist(self, directory):
        names = self.get_model_names()
        resume_files = [osp.join(directory, n, RESUME_FILE) for n in names]
        if all(osp.isfile(p) for p in resume_files):
            for name, path in zip(names, resume_files):
                state = self._read_checkpoint(path)
                self.restore_training_state(name, state)
            print(f"Resuming from {resume_files[0]} after epoch {state['epoch']}")
            return state["epoch"]
        pointers = [osp.join(directory, n, "checkpoint") for n in names]
        if not all(osp.isfile(p) for p in pointers):
            print("No checkpoint found, train from scratch")
            return 0
        epoch = 0
        for name in names:
            path = latest_checkpoint(osp.join(directory, name))
            state = self._read_checkpoint(path)
            self._models[name].load_state_dict(state["state_dict"])
            if state.get("scheduler"):
                self._scheds[name].load_state_dict(state["scheduler"])
            epoch = state["epoch"]
        print(f"Found checkpoint {path} (epoch {epoch}) without optimizer state: continuing from it")
        return epoch

    def restore_training_state(self, name, state):
        """Continue from a resume file read on the CPU: weights are copied into the parameters
        wherever they live, and Optimizer.load_state_dict moves the moments to the parameters'
        device while keeping Adam's `step` counters on the CPU (on the GPU every step would sync
        the host once per tensor)."""
        self._models[name].load_state_dict(state["state_dict"])
        self._optims[name].load_state_dict(state["optimizer"])
        self._scheds[name].load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.best_result = state["best_result"]
        set_rng_state(state["rng"], self.device)
        self.load_run_state(state.get("run_state") or {})  # resume files written before have none

    def _read_checkpoint(self, path):
        """On the CPU whatever the run's device: RNG states must stay CPU tensors, and every
        consumer (load_state_dict) copies to where its parameters are."""
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"could not read checkpoint {path} with torch.load(weights_only=True): "
                               f"{type(err).__name__}: {err}") from err

    def checkpoint_path(self, directory, name, epoch=None):
        folder = osp.join(directory, name)
        if epoch is not None:
            path = osp.join(folder, f"model.pth.tar-{epoch}")
        else:
            path = osp.join(folder, "model-best.pth.tar")
            if not osp.exists(path) and osp.isfile(osp.join(folder, "checkpoint")):
                path = latest_checkpoint(folder)  # no best_val selection: the latest checkpoint
        if not osp.isfile(path):
            raise CheckpointError(f"No checkpoint at {path} (--model-dir {directory}, --load-epoch {epoch}). "
                                  f"Train first, or point --model-dir at the training output folder.")
        return path

    def load_model(self, directory, epoch=None):
        if not directory:
            print("Note that load_model() is skipped as no pretrained model is given")
            return
        for name in self.get_model_names():
            path = self.checkpoint_path(directory, name, epoch)
            state = self.load_state_for(name, path)
            load_strict(self._models[name], state["state_dict"], path)
            val = state.get("val_result")
            print(f"Load {path} to {name} (epoch={state.get('epoch')}"
                  f"{f', val_result={val:.1f}' if isinstance(val, float) else ''})")

    def load_state_for(self, name, path):
        """Read a checkpoint of ours; subclasses may also accept other formats."""
        return self._read_checkpoint(path)


def epoch_eta(epoch_times: List[float], epoch: int, max_epoch: int) -> str:
    """The time left at the average time of the epochs run so far (in this process)."""
    average = sum(epoch_times) / len(epoch_times)
    left = datetime.timedelta(seconds=round(average * (max_epoch - epoch - 1)))
    return (f"epoch {epoch + 1}/{max_epoch} took {epoch_times[-1]:.1f} s; {left} left at the average epoch time "
            f"({average:.1f} s)")


def latest_checkpoint(folder: str) -> str:
    """The file Dassl's `checkpoint` pointer in `folder` names."""
    with open(osp.join(folder, "checkpoint")) as handle:
        return osp.join(folder, handle.readline().strip())


def rng_state(device: torch.device):
    """Random states to save: CPU generators, and the CUDA generator of the run's own device only
    (a run may resume with fewer GPUs visible than it started with)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return _plain(state)


def _plain(obj):
    """numpy/python RNG states as tensors and lists, so weights_only loading accepts them."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.astype(np.int64))
    return obj


def set_rng_state(state, device: torch.device):
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda_state = state.get("cuda")
    if isinstance(cuda_state, list):  # resume files written before: one state per visible GPU
        cuda_state = cuda_state[device.index or 0] if len(cuda_state) > (device.index or 0) else None
    if cuda_state is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_state.cpu(), device)
