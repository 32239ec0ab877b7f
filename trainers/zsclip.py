"""Dassl trainer `ZeroshotCLIP`: the zero-shot row of a comparison, from the same data and outputs."""
from dassl.engine import TRAINER_REGISTRY

from vlprompt.clip.templates import GENERIC_TEMPLATES, dataset_template
from vlprompt.methods.zero_shot import ZeroShotCLIP

from .clip_prompt import ClipPromptTrainer

TEMPLATE_SETS = ("dataset", "ensemble")


@TRAINER_REGISTRY.register()
class ZeroshotCLIP(ClipPromptTrainer):
    """Hand-written prompt per dataset (as CoOp's ZeroshotCLIP) or a template ensemble; no training."""

    METHOD = "ZSCLIP"

    def check_cfg(self, cfg):
        super().check_cfg(cfg)
        if cfg.TRAINER.ZSCLIP.TEMPLATES not in TEMPLATE_SETS:
            raise ValueError(f"TRAINER.ZSCLIP.TEMPLATES={cfg.TRAINER.ZSCLIP.TEMPLATES!r} is invalid: "
                             f"must be one of {TEMPLATE_SETS}")

    def build_model(self):
        cfg = self.cfg
        clip_model = self.load_frozen_clip()
        templates = ([dataset_template(cfg.DATASET.NAME)] if cfg.TRAINER.ZSCLIP.TEMPLATES == "dataset"
                     else list(GENERIC_TEMPLATES))
        print(f"Zero-shot prompts: {templates}")
        features = self.frozen_class_features(clip_model, self.dm.dataset.classnames, templates=templates)
        self.to_compute_precision(clip_model)
        self.model = ZeroShotCLIP(clip_model, features).to(self.device)
        self.scaler = None

    def train(self):
        raise RuntimeError("ZeroshotCLIP has nothing to train: run train.py with --eval-only")
