"""The base of our Dassl trainers: runs that survive faults and stop clearly.

- checkpoints: atomic, trainable state only, readable with torch.load(weights_only=True), and
  an exact resume after a kill;
- data: an unreadable image stops the run with its path, or is left out on request
  (checked_images.py);
- a non-finite loss stops the run with the step, the precision and what to try, instead of
  training on garbage; amp's skipped steps are counted in the log;
- no host read inside a training step (each would make the CPU wait for the GPU): the log values
  and the non-finite check stay on the device and are read once per print step (TRAIN.PRINT_FREQ)
  and at the end of the epoch; a non-finite update is refused on the device meanwhile.

A checkpoint also carries `info`, what rebuilds the model from it alone (the method and its
settings, backbone, input transform and class names: vlprompt.load_classifier reads it).

Dassl's own save/load pickle whole models and scheduler objects and write in place; here the
registered modules' state goes to Dassl's usual file names (`<name>/model-best.pth.tar`,
`<name>/model.pth.tar-N`, `<name>/checkpoint`), and `<name>/resume.pth.tar` keeps the optimizer,
schedule, scaler, best validation result, random states and the trainer's `run_state()` (state
across epochs, such as a running average of weights) of the last finished epoch until training ends.
"""
import datetime
import math
import os
import os.path as osp
import random
import time
from typing import Dict, List, Optional

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


class DeviceMeters:
    """Dassl's MetricMeter without a host read per step: each step's values stay on the device,
    summed in float64 as MetricMeter sums Python floats (so the log shows the same digits), and
    the host reads them all at once, with anything else to read then (`read(extra)`)."""

    def __init__(self):
        self.last: Dict[str, torch.Tensor] = {}
        self.sums: Dict[str, torch.Tensor] = {}
        self.count = 0

    def update(self, values: Dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            value = torch.as_tensor(value).detach().reshape(()).to(torch.float64)
            self.last[name] = value
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += 1

    def read(self, extra: Optional[torch.Tensor] = None):
        """(MetricMeter-like text "name last (average) ...", {name: average}, extra as a list): one
        host read."""
        names = list(self.last)
        parts = [torch.stack([self.last[n] for n in names] + [self.sums[n] for n in names])] if names else []
        if extra is not None:
            parts.append(extra.to(torch.float64).reshape(-1).to(parts[0].device if parts else extra.device))
        values = torch.cat(parts).tolist() if parts else []
        last, sums, rest = values[:len(names)], values[len(names):2 * len(names)], values[2 * len(names):]
        averages = {n: s / self.count for n, s in zip(names, sums)}
        text = " ".join(f"{n} {v:.4f} ({averages[n]:.4f})" for n, v in zip(names, last))
        return text, averages, rest


class FiniteGuard:
    """Non-finite training steps, recorded on the device: [batch index of the first one this
    epoch (-1: none), its loss]. The host reads it only at print steps and at the end of an epoch."""

    def __init__(self):
        self.first: Optional[torch.Tensor] = None

    def record(self, finite: torch.Tensor, loss: torch.Tensor, batch_idx: int) -> None:
        entry = torch.stack([torch.full_like(loss, batch_idx, dtype=torch.float64), loss.detach().to(torch.float64)])
        if self.first is None:
            self.first = torch.tensor([-1.0, 0.0], dtype=torch.float64, device=loss.device)
        self.first = torch.where(~finite & (self.first[0] < 0), entry, self.first)

    def tensor(self) -> torch.Tensor:
        return self.first if self.first is not None else torch.tensor([-1.0, 0.0], dtype=torch.float64)


def all_finite(loss: torch.Tensor, params=()) -> torch.Tensor:
    """0-d bool tensor on the device: the loss and every gradient of `params` are finite (no read)."""
    flags = [torch.isfinite(loss).all()] + [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    return torch.stack(flags).all()


def guarded_step(optimizer, finite: torch.Tensor) -> None:
    """optimizer.step(), undone on the device where `finite` is False: parameters and the
    optimizer's per-parameter tensors (moments, momentum) keep their values, decided without a
    host read. (The optimizer's CPU step counters still count the refused step: the run stops at
    the next read of the flag, so they are never used afterwards.) The copies are of the trainable
    state only, small beside a forward through CLIP."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    kept = [p.detach().clone() for p in params]
    kept_state = [{k: v.clone() for k, v in optimizer.state[p].items() if _per_parameter(v, p)} for p in params]
    optimizer.step()
    with torch.no_grad():
        for p, old, old_state in zip(params, kept, kept_state):
            p.copy_(torch.where(finite, p, old))
            for key, value in optimizer.state[p].items():
                if _per_parameter(value, p):  # new state (a first step) goes back to zeros
                    value.copy_(torch.where(finite, value, old_state.get(key, torch.zeros_like(value))))


def _per_parameter(value, param) -> bool:
    return torch.is_tensor(value) and value.shape == param.shape and value.device == param.device


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
        if not (math.isfinite(cfg.OPTIM.LR) and cfg.OPTIM.LR > 0):  # the schedule is relative to it
            raise InvalidValue(f"OPTIM.LR={cfg.OPTIM.LR!r} is invalid: must be a positive number (the recipes "
                               f"use 0.002 to 0.0035)")
        if cfg.OPTIM.MAX_EPOCH < 1:
            raise InvalidValue(f"OPTIM.MAX_EPOCH={cfg.OPTIM.MAX_EPOCH!r} is invalid: must be at least 1")
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

    finite_guard: FiniteGuard = None
    precision = "fp32"  # what the non-finite message names (subclasses: their PREC)

    def checked_step(self, loss, optimizer, check_grads: bool = True, before_step=None) -> None:
        """backward and optimizer step without a host read. A non-finite loss (or, with
        `check_grads`, gradient: fp16's overflows) is recorded on the device and its update
        refused; the run stops when the record is read (the next print step, or the end of the
        epoch). amp: through the scaler, which skips steps with inf/NaN gradients itself (normal,
        not fatal: counted); a non-finite loss stops an amp run too (lowering the scale cannot
        cure a forward that overflows). `before_step()`: between backward and step (clipping)."""
        if self.finite_guard is None:  # a step outside run_epoch (tests, fixtures)
            self.finite_guard = FiniteGuard()
        if self.scaler is not None:
            self.finite_guard.record(all_finite(loss), loss, self.batch_idx)
            self.scaler.scale(loss).backward()
            if before_step is not None:
                before_step()
            # the scale as a device tensor: get_scale() would read it on the host
            scale = self.scaler._get_scale_async().clone()
            self.scaler.step(optimizer)  # reads found_inf on the host: the one read of an amp step
            self.scaler.update()
            self.amp_skipped = self.amp_skipped + (self.scaler._get_scale_async() < scale).to(torch.int64)
            return
        loss.backward()
        params = [p for group in optimizer.param_groups for p in group["params"]] if check_grads else ()
        finite = all_finite(loss, params)
        self.finite_guard.record(finite, loss, self.batch_idx)
        if before_step is not None:
            before_step()
        guarded_step(optimizer, finite)

    def stop_if_not_finite(self, extra_read: Optional[List[float]] = None) -> None:
        """Stop the run if a step of this epoch was not finite (reads the device record unless
        `extra_read`, the record already read along with the log values, is given)."""
        first, value = extra_read if extra_read is not None else self.finite_guard.tensor().tolist()
        if first < 0:
            return
        what = f"non-finite loss ({value})" if value != value or abs(value) == float("inf") else \
            f"non-finite gradient (loss {value})"
        raise NonFiniteLossError(
            f"{what} at epoch {self.epoch + 1}, batch {int(first) + 1} with precision {self.precision}: "
            f"{PRECISION_ADVICE.get(self.precision, 'try fp32')}. The run stopped instead of training on it "
            f"(that update was not applied); rerunning the same command resumes after the last finished epoch.")

    def before_epoch(self):
        super().before_epoch()
        self.amp_skipped = 0
        self.finite_guard = FiniteGuard()
        self.epoch_started = time.time()

    def run_epoch(self):
        """Dassl's TrainerX.run_epoch (same progress lines, same numbers) with one host read per
        print step instead of several per step; tensorboard gets the averages at print steps. Ends
        with the time spent waiting for data against computing."""
        self.set_model_mode("train")
        meters = DeviceMeters()
        self.num_batches = len(self.train_loader_x)
        print_freq = self.cfg.TRAIN.PRINT_FREQ
        data_wait = step_time = 0.0
        start = end = time.time()
        for self.batch_idx, batch in enumerate(self.train_loader_x):
            waited = time.time() - end
            data_wait += waited
            meters.update(self.forward_backward(batch))
            took = time.time() - end
            step_time += took
            if (self.batch_idx + 1) % print_freq == 0 or self.num_batches < print_freq:
                text, averages, record = meters.read(self.finite_guard.tensor())
                self.stop_if_not_finite(record)
                remaining = self.num_batches - self.batch_idx - 1 + (self.max_epoch - self.epoch - 1) * self.num_batches
                eta = datetime.timedelta(seconds=int(step_time / (self.batch_idx + 1) * remaining))
                print(f"epoch [{self.epoch + 1}/{self.max_epoch}] batch [{self.batch_idx + 1}/{self.num_batches}] "
                      f"time {took:.3f} ({step_time / (self.batch_idx + 1):.3f}) "
                      f"data {waited:.3f} ({data_wait / (self.batch_idx + 1):.3f}) {text} "
                      f"lr {self.get_current_lr():.4e} eta {eta}")
                n_iter = self.epoch * self.num_batches + self.batch_idx
                for name, average in averages.items():
                    self.write_scalar("train/" + name, average, n_iter)
                self.write_scalar("train/lr", self.get_current_lr(), n_iter)
            end = time.time()
        self.stop_if_not_finite()  # steps after the last print step
        total = time.time() - start
        # not "epoch [": parsers of Dassl's progress lines read those
        print(f"time of epoch {self.epoch + 1}/{self.max_epoch}: {total:.1f} s, {data_wait:.1f} s waiting for data, "
              f"{total - data_wait:.1f} s computing ({100 * data_wait / max(total, 1e-9):.0f}% waiting"
              f"{'; the data loader is the bottleneck: raise DATALOADER.NUM_WORKERS' if data_wait > total / 2 else ''})")

    def after_epoch(self):
        skipped = int(self.amp_skipped)  # one read per epoch
        if skipped:
            print(f"amp: the gradient scaler skipped {skipped} optimizer step(s) this epoch "
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
