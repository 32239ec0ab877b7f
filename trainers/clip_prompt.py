"""What every CLIP prompt-learning trainer needs from Dassl, on current PyTorch.

- precision: fp32, fp16 and bf16 (frozen CLIP in that dtype, trainable state in fp32) and amp
  (autocast + GradScaler), on CPU and GPU;
- optimizer from Dassl with OPTIM.EPS, schedule with Dassl's per-epoch values (schedule.py);
- checkpoints that hold only the trainable module (checkpointed_trainer.py);
- evaluation that encodes the classes once per pass (the model's `evaluation()` context) and
  reuses frozen image features of val/test images across passes, seeds and configs (on disk).

A subclass implements `build_prompt_model()` returning (model, trainable module); the model
provides `loss(images, labels) -> (loss, logits, parts)`, `forward(images, zero_shot=None) ->
logits`, `zero_shot_image_features(images)` and an `evaluation()` context manager.
"""
import PIL
import torch
import torchvision
from dassl.metrics import compute_accuracy
from dassl.optim import build_optimizer

from vlprompt.clip.class_features import ClassFeatureStore, frozen_class_features
from vlprompt.clip.loading import cast_clip, load_clip
from vlprompt.clip.image_features import ImageFeatureCache
from vlprompt.files import cache_root, tensors_fingerprint
from vlprompt.clip.encoders import PromptedTextEncoder
from vlprompt.clip.templates import GENERIC_TEMPLATES

from .checkpointed_trainer import CheckpointedTrainer
from .config import PRECISIONS
from .schedule import build_lr_scheduler

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def check_precision(prec: str, key: str, on_cuda: bool) -> None:
    if prec not in PRECISIONS:
        raise ValueError(f"{key}={prec!r} is invalid: must be one of {PRECISIONS}")
    # is_bf16_supported() counts emulation (pre-Ampere GPUs) as support: bf16 would run, slowly
    if prec == "bf16" and on_cuda and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ValueError(f"{key}=bf16 but this GPU ({torch.cuda.get_device_name()}) has no native bf16 "
                         f"(it would only be emulated, slowly); use fp16 or amp")


def check_input_size(cfg, clip_model) -> None:
    resolution = clip_model.visual.input_resolution
    if tuple(cfg.INPUT.SIZE) != (resolution, resolution):
        raise ValueError(f"INPUT.SIZE={tuple(cfg.INPUT.SIZE)} does not match the backbone's input "
                         f"resolution {resolution}: set INPUT.SIZE ({resolution}, {resolution})")


class ClipPromptTrainer(CheckpointedTrainer):
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
        super().check_cfg(cfg)
        check_precision(cfg.TRAINER[self.METHOD].PREC, f"TRAINER.{self.METHOD}.PREC",
                        on_cuda=cfg.USE_CUDA and torch.cuda.is_available())

    # ---- model -----------------------------------------------------------------------------
    def load_frozen_clip(self):
        """Frozen CLIP in fp32 on the run's device (cast to PREC later, by to_compute_precision)."""
        backbone = self.cfg.MODEL.BACKBONE
        print(f"Loading CLIP (backbone: {backbone.NAME}{', file: ' + backbone.PATH if backbone.PATH else ''})")
        clip_model = load_clip(backbone.NAME, backbone.PATH, backbone.DOWNLOAD_ROOT or None)
        check_input_size(self.cfg, clip_model)
        return clip_model.to(self.device)

    def frozen_class_features(self, clip_model, classnames, descriptions_path=None, templates=GENERIC_TEMPLATES):
        """Frozen CLIP's class text features [C, E] fp32, computed where the run computes (so
        a GPU run does not wait on the CPU) before CLIP is cast to PREC, and cached on disk."""
        store = ClassFeatureStore(cache_root(self.cfg.MODEL.FEATURE_CACHE_DIR), report=print)
        chunk = 1024 if self.device.type == "cuda" else 256
        return frozen_class_features(PromptedTextEncoder(clip_model), classnames, descriptions_path,
                                     templates=templates, store=store, chunk=chunk)

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
            self.scaled_step(loss, self.optim)
        else:
            self.stop_if_not_finite(loss, self.precision)
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
        return ImageFeatureCache(cache_root(self.cfg.MODEL.FEATURE_CACHE_DIR), backbone, transform)

    @torch.no_grad()
    def test(self, split=None):
        if (self.feature_cache is None and self.cfg.TEST.CACHE_FROZEN_FEATURES
                and getattr(self.model, "uses_frozen_image_features", False)):
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
