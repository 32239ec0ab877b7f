"""What every CLIP prompt-learning trainer needs from Dassl, on current PyTorch.

- precision: fp32, fp16 and bf16 (frozen CLIP in that dtype, trainable state in fp32) and amp
  (autocast + GradScaler), on CPU and GPU;
- optimizer from Dassl with OPTIM.EPS, schedule with Dassl's per-epoch values (schedule.py);
- checkpoints that hold only the trainable module, written atomically, readable with
  torch.load(weights_only=True); the optimizer state lives in a separate resume file;
- evaluation that encodes the classes once per pass (the model's `evaluation()` context) and
  reuses frozen image features of val/test images across passes, seeds and configs (on disk).

A subclass implements `build_prompt_model()` returning (model, trainable module); the model
provides `loss(images, labels) -> (loss, logits, parts)`, `forward(images, zero_shot=None) ->
logits`, `zero_shot_image_features(images)` and an `evaluation()` context manager.
"""
import os
import os.path as osp
import random

import numpy as np
import PIL
import torch
import torchvision
from dassl.engine import TrainerX
from dassl.metrics import compute_accuracy
from dassl.optim import build_optimizer

from vlprompt.clip_loading import cast_clip, load_clip
from vlprompt.feature_cache import ImageFeatureCache
from vlprompt.io import atomic_torch_save, atomic_write_text, load_strict, tensors_fingerprint

from .config import PRECISIONS
from .schedule import build_lr_scheduler

CHECKPOINT_FORMAT = "vlprompt-trainable-1"
RESUME_FILE = "resume.pth.tar"
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def feature_cache_dir(cfg) -> str:
    return cfg.MODEL.FEATURE_CACHE_DIR or os.environ.get("VLPROMPT_CACHE") or "~/.cache/vlprompt"


class ClipPromptTrainer(TrainerX):
    """Dassl TrainerX for a prompt model over frozen CLIP; subclasses set METHOD and NAME."""

    METHOD = ""  # config node under TRAINER, e.g. "HICROPL"
    CHECKPOINT_NAME = "prompt_learner"  # folder of the checkpoints in OUTPUT_DIR

    # ---- config ----------------------------------------------------------------------------
    @property
    def method_cfg(self):
        return self.cfg.TRAINER[self.METHOD]

    @property
    def precision(self) -> str:
        return self.method_cfg.PREC

    def check_cfg(self, cfg):
        prec = cfg.TRAINER[self.METHOD].PREC
        if prec not in PRECISIONS:
            raise ValueError(f"TRAINER.{self.METHOD}.PREC={prec!r} is invalid: must be one of {PRECISIONS}")
        if prec == "bf16" and torch.cuda.is_available() and cfg.USE_CUDA and not torch.cuda.is_bf16_supported():
            raise ValueError(f"TRAINER.{self.METHOD}.PREC=bf16 but this GPU has no bf16; use fp16 or amp")
        if cfg.DATASET.SUBSAMPLE_CLASSES not in ("all", "base", "new"):
            raise ValueError(f"DATASET.SUBSAMPLE_CLASSES={cfg.DATASET.SUBSAMPLE_CLASSES!r} is invalid: "
                             f"must be all, base or new")

    # ---- model -----------------------------------------------------------------------------
    def load_frozen_clip(self):
        backbone = self.cfg.MODEL.BACKBONE
        print(f"Loading CLIP (backbone: {backbone.NAME}{', file: ' + backbone.PATH if backbone.PATH else ''})")
        return load_clip(backbone.NAME, backbone.PATH, backbone.DOWNLOAD_ROOT or None)

    def to_compute_precision(self, clip_model):
        """fp16/bf16: cast frozen CLIP's matmul weights; fp32 and amp keep fp32 weights."""
        if self.precision in HALF_DTYPES:
            cast_clip(clip_model, HALF_DTYPES[self.precision])
        return clip_model

    def build_prompt_model(self):
        raise NotImplementedError

    def build_model(self):
        self.model, trainable = self.build_prompt_model()
        self.model.to(self.device)
        n_params = sum(p.numel() for p in trainable.parameters() if p.requires_grad)
        print(f"Trainable parameters: {n_params:,} (frozen CLIP excluded from checkpoints)")
        self.optim = build_optimizer(trainable, self.cfg.OPTIM)
        if self.cfg.OPTIM.NAME in ("adam", "amsgrad", "adamw", "radam"):
            for group in self.optim.param_groups:
                group["eps"] = self.cfg.OPTIM.EPS
            self.optim.defaults["eps"] = self.cfg.OPTIM.EPS
        self.sched = build_lr_scheduler(self.optim, self.cfg.OPTIM)
        self.register_model(self.CHECKPOINT_NAME, trainable, self.optim, self.sched)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "amp" else None

    # ---- train -----------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.precision == "amp")

    def forward_backward(self, batch):
        images, labels = self.parse_batch_train(batch)
        with self.autocast():
            loss, logits, parts = self.model.loss(images, labels)
        self.optim.zero_grad()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optim)
            self.scaler.update()
        else:
            self.detect_anomaly(loss)
            loss.backward()
            self.optim.step()
        summary = {"loss": loss.item(), "acc": compute_accuracy(logits, labels)[0].item(), **parts}
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        return summary

    def parse_batch_train(self, batch):
        return batch["img"].to(self.device), batch["label"].to(self.device)

    # ---- evaluate --------------------------------------------------------------------------
    feature_cache = None

    def build_feature_cache(self):
        """Frozen features of eval images, keyed by backbone weights + precision and transform."""
        encoder = self.model.image_encoder
        backbone = f"{tensors_fingerprint(encoder.state_dict().items())}|{self.precision}"
        transform = (f"{self.test_loader.dataset.transform!r}|torchvision {torchvision.__version__}"
                     f"|PIL {PIL.__version__}")
        return ImageFeatureCache(feature_cache_dir(self.cfg), backbone, transform)

    @torch.no_grad()
    def test(self, split=None):
        if self.feature_cache is None and self.cfg.TEST.CACHE_FROZEN_FEATURES:
            self.feature_cache = self.build_feature_cache()
        self.set_model_mode("eval")
        self.model.eval()
        try:
            with self.autocast(), self.model.evaluation():
                return super().test(split)
        finally:
            if self.feature_cache is not None:
                self.feature_cache.save()

    def parse_batch_test(self, batch):
        self._batch_impaths = batch["impath"]
        return super().parse_batch_test(batch)

    def model_inference(self, images):
        if self.feature_cache is None:
            return self.model(images)
        zero_shot = self.feature_cache.features(self._batch_impaths, images, self.model.zero_shot_image_features)
        return self.model(images, zero_shot=zero_shot)

    def after_epoch(self):
        super().after_epoch()
        self.save_resume_state(self.epoch)

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
            }
            file_name = model_name or f"model.pth.tar-{epoch + 1}"
            path = osp.join(directory, name, file_name)
            atomic_torch_save(state, path)
            atomic_write_text(osp.join(directory, name, "checkpoint"), file_name + "\n")
            print(f"Checkpoint saved to {path}")

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
                "rng": rng_state(),
            }
            atomic_torch_save(state, osp.join(self.output_dir, name, RESUME_FILE))

    def resume_model_if_exist(self, directory):
        names = self.get_model_names()
        resume_files = [osp.join(directory, n, RESUME_FILE) for n in names]
        if all(osp.isfile(p) for p in resume_files):
            for name, path in zip(names, resume_files):
                state = torch.load(path, map_location=self.device, weights_only=True)
                self._models[name].load_state_dict(state["state_dict"])
                self._optims[name].load_state_dict(state["optimizer"])
                self._scheds[name].load_state_dict(state["scheduler"])
                if self.scaler is not None and state["scaler"]:
                    self.scaler.load_state_dict(state["scaler"])
                self.best_result = state["best_result"]
                set_rng_state(state["rng"])
            print(f"Resuming from {resume_files[0]} after epoch {state['epoch']}")
            return state["epoch"]
        pointers = [osp.join(directory, n, "checkpoint") for n in names]
        if not all(osp.isfile(p) for p in pointers):
            print("No checkpoint found, train from scratch")
            return 0
        epoch = 0
        for name, pointer in zip(names, pointers):
            with open(pointer) as handle:
                path = osp.join(directory, name, handle.readline().strip())
            state = self._read_checkpoint(path)
            self._models[name].load_state_dict(state["state_dict"])
            if state.get("scheduler"):
                self._scheds[name].load_state_dict(state["scheduler"])
            epoch = state["epoch"]
        print(f"Found checkpoint {path} (epoch {epoch}) without optimizer state: continuing from it")
        return epoch

    def _read_checkpoint(self, path):
        try:
            return torch.load(path, map_location=self.device, weights_only=True)
        except Exception as err:
            raise RuntimeError(f"could not read checkpoint {path} with torch.load(weights_only=True): "
                               f"{type(err).__name__}: {err}") from err

    def checkpoint_path(self, directory, name, epoch=None):
        folder = osp.join(directory, name)
        if epoch is not None:
            path = osp.join(folder, f"model.pth.tar-{epoch}")
        else:
            path = osp.join(folder, "model-best.pth.tar")
            pointer = osp.join(folder, "checkpoint")
            if not osp.exists(path) and osp.isfile(pointer):
                with open(pointer) as handle:  # no best_val selection: the latest checkpoint
                    path = osp.join(folder, handle.readline().strip())
        if not osp.isfile(path):
            raise FileNotFoundError(f"No checkpoint at {path} (--model-dir {directory}, --load-epoch {epoch}). "
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


def rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
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


def set_rng_state(state):
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
