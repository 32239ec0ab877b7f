"""The Dassl trainer of every prompt method over frozen CLIP, made from the method's descriptor
(vlprompt.methods.registry): `make_trainer(spec)` gives the class registered as `--trainer NAME`.

- settings: TRAINER.<NODE>.* (generated from the method's settings dataclass, trainers/config.py)
  become the dataclass; invalid values stop the run naming the key;
- precision: fp32, fp16 and bf16 (frozen CLIP in that dtype, trainable state in fp32) and amp
  (autocast + GradScaler), on CPU and GPU;
- optimizer from Dassl with OPTIM.EPS, schedule with Dassl's per-epoch values (schedule.py);
- checkpoints that hold only the trainable module (checkpointed_trainer.py); release checkpoints
  converted by the method's descriptor;
- evaluation that encodes the classes once per pass (the model's `evaluation()` context) and
  reuses frozen image features of val/test images across passes, seeds and configs (on disk).
The model contract is vlprompt.methods.base.PromptModel.
"""
import dataclasses
import os
import os.path as osp

import PIL
import torch
import torchvision
from dassl.metrics import compute_accuracy
from dassl.optim import build_optimizer
from tqdm import tqdm

from vlprompt.clip.class_features import ClassFeatureStore, DescriptionsError, frozen_class_features
from vlprompt.clip.encoders import PromptedImageEncoder, PromptedTextEncoder
from vlprompt.clip.image_features import ImageFeatureCache
from vlprompt.clip.loading import architecture_shape, backbone_shape, cast_clip, load_clip, weights_fingerprint
from vlprompt.errors import InvalidValue, UserError
from vlprompt.files import (CheckpointError, atomic_torch_save, cache_root, load_strict, read_checkpoint,
                            tensors_fingerprint, written_by)
from vlprompt.model_card import INFO_FORMAT, input_info, plain
from vlprompt.methods import settings as method_settings
from vlprompt.methods.registry import ConfigLayout, MethodSpec, lookup

from .checkpointed_trainer import CheckpointedTrainer
from .schedule import build_lr_scheduler

PRECISIONS = ("fp32", "fp16", "bf16", "amp")
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# Dassl dataset name -> the release's descriptions file stem (gpt_file/<stem>_prompt.json)
DESCRIPTION_FILE_STEMS = {
    "Caltech101": "caltech", "DescribableTextures": "dtd", "EuroSAT": "eurosat",
    "FGVCAircraft": "fgvc", "Food101": "food101", "ImageNet": "imagenet",
    "ImageNetA": "imagenet_a", "ImageNetR": "imagenet_r", "ImageNetSketch": "imagenet_sketch",
    "ImageNetV2": "imagenetv2", "OxfordFlowers": "oxford_flowers", "OxfordPets": "oxford_pets",
    "StanfordCars": "stanford_cars", "SUN397": "sun397", "UCF101": "ucf101",
}


def descriptions_path(cfg) -> str:
    if cfg.DATASET.DESCRIPTIONS_FILE:
        return cfg.DATASET.DESCRIPTIONS_FILE
    stem = DESCRIPTION_FILE_STEMS.get(cfg.DATASET.NAME, cfg.DATASET.NAME.lower())
    return osp.join(cfg.DATASET.DESCRIPTIONS_DIR, f"{stem}_prompt.json")


def check_precision(prec: str, key: str, on_cuda: bool) -> None:
    if prec not in PRECISIONS:
        raise InvalidValue(f"{key}={prec!r} is invalid: must be one of {PRECISIONS}")
    # is_bf16_supported() counts emulation (pre-Ampere GPUs) as support: bf16 would run, slowly
    if prec == "bf16" and on_cuda and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise InvalidValue(f"{key}=bf16 but this GPU ({torch.cuda.get_device_name()}) has no native bf16 "
                         f"(it would only be emulated, slowly); use fp16 or amp")


def check_input_size(cfg, resolution: int) -> None:
    if tuple(cfg.INPUT.SIZE) != (resolution, resolution):
        raise InvalidValue(f"INPUT.SIZE={tuple(cfg.INPUT.SIZE)} does not match the backbone's input "
                         f"resolution {resolution}: set INPUT.SIZE ({resolution}, {resolution})")


RECIPES = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), "configs", "trainers")


class ClipPromptTrainer(CheckpointedTrainer):
    """Dassl TrainerX for a prompt model over frozen CLIP; `make_trainer` sets the class fields."""

    spec: MethodSpec = None
    layout: ConfigLayout = None  # where its settings are under TRAINER, e.g. node "HICROPL"

    # ---- config ----------------------------------------------------------------------------
    @classmethod
    def key(cls, setting: str) -> str:
        """The full config key of a settings field (or "prec"), e.g. TRAINER.COOP.W."""
        return f"TRAINER.{cls.layout.path(setting)}"

    @classmethod
    def settings_from(cls, cfg):
        """The method's settings from its config layout; an invalid one stops the run naming its key."""
        try:
            values = cls.layout.read(cfg.TRAINER, cls.spec.settings, cfg.DATASET.NAME)
            return method_settings.checked_values(cls.spec.settings, values)
        except method_settings.ConfigError as err:
            raise InvalidValue(err.key_message(cls.key)) from err

    @classmethod
    def precision_of(cls, cfg) -> str:
        return lookup(cfg.TRAINER, cls.layout.path("prec"))

    @classmethod
    def validate_for(cls, settings, shape) -> None:
        try:
            method_settings.checked(settings, shape)
        except method_settings.ConfigError as err:
            raise InvalidValue(err.key_message(cls.key)) from err

    @property
    def precision(self) -> str:
        return self.precision_of(self.cfg)

    @classmethod
    def check_cfg(cls, cfg):
        """Everything checkable without weights or data, before either is loaded."""
        super().check_cfg(cfg)
        check_precision(cls.precision_of(cfg), cls.key("prec"), on_cuda=cfg.USE_CUDA and torch.cuda.is_available())
        settings = cls.settings_from(cfg)
        if cfg.DATALOADER.K_TRANSFORMS > 1 and not getattr(cls.spec.model, "takes_views", False):
            raise InvalidValue(f"DATALOADER.K_TRANSFORMS={cfg.DATALOADER.K_TRANSFORMS} is invalid for "
                               f"{cls.spec.name}: it trains on one view of each image; set DATALOADER.K_TRANSFORMS 1")
        texts = cls.spec.class_texts(settings, cfg.DATASET.NAME) if cls.spec.class_texts else None
        chosen = cfg.DATASET.DESCRIPTIONS_FILE
        if texts is not None and texts.descriptions and chosen and not osp.isfile(chosen):
            raise DescriptionsError(f"DATASET.DESCRIPTIONS_FILE={chosen!r} does not exist: correct the path, or "
                                    f"set it to '' to use DATASET.DESCRIPTIONS_DIR or the prompt templates")
        if texts is not None and texts.descriptions and cfg.DATASET.REQUIRE_DESCRIPTIONS:
            path = descriptions_path(cfg)
            if not osp.isfile(path):
                raise DescriptionsError(
                    f"DATASET.REQUIRE_DESCRIPTIONS is True and there is no class descriptions file {path}: copy the "
                    f"release's gpt_file/ folder there (or set DATASET.DESCRIPTIONS_DIR / DESCRIPTIONS_FILE), or set "
                    f"DATASET.REQUIRE_DESCRIPTIONS False to use the prompt templates")
        backbone = cfg.MODEL.BACKBONE
        shape = None if backbone.PATH else architecture_shape(backbone.NAME)
        if shape is not None:  # OpenAI's named backbones: their shapes are known without weights
            cls.check_fit(cfg, settings, shape)

    @classmethod
    def misfits(cls, cfg, settings, shape) -> list:
        """What in the config does not fit the backbone's shape: every mismatch, not the first only."""
        problems = []
        try:
            check_input_size(cfg, shape.image_resolution)
        except InvalidValue as err:
            problems.append(str(err))
        try:
            cls.validate_for(settings, shape)
        except InvalidValue as err:
            problems.append(str(err))
        return problems

    @classmethod
    def check_fit(cls, cfg, settings, shape) -> None:
        """The config fits the backbone, or one message with all mismatches and the shipped recipes
        of this trainer that do fit it (the toy CLIP needs CFG=demo_toy, not the papers' recipes)."""
        problems = cls.misfits(cfg, settings, shape)
        if problems:
            fitting = cls.fitting_recipes(shape)
            hint = (f". The recipe does not fit this backbone; {' and '.join(fitting)} "
                    f"{'fits' if len(fitting) == 1 else 'fit'} it: CFG={fitting[0]} for the scripts, --config-file "
                    f"{osp.join(RECIPES, cls.spec.name, fitting[0] + '.yaml')} for train.py" if fitting else "")
            raise InvalidValue("; ".join(problems) + hint)

    @classmethod
    def fitting_recipes(cls, shape) -> list:
        """The names of configs/trainers/<method>/*.yaml whose input size and settings fit `shape`."""
        from dassl.config import get_cfg_default

        from .config import extend_cfg  # trainers.config imports this module
        folder = osp.join(RECIPES, cls.spec.name)
        names = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml")) if osp.isdir(folder) else []
        fitting = []
        for name in names:
            cfg = extend_cfg(get_cfg_default())
            try:
                cfg.merge_from_file(osp.join(folder, name + ".yaml"))
                if not cls.misfits(cfg, cls.settings_from(cfg), shape):
                    fitting.append(name)
            except Exception:  # noqa: BLE001  a recipe that does not even load does not fit
                continue
        return sorted(fitting, key=lambda name: name != "demo_toy")  # the demo's recipe (toy world) first

    # ---- model -----------------------------------------------------------------------------
    def load_frozen_clip(self):
        """Frozen CLIP in fp32 on the run's device (cast to PREC later, by to_compute_precision)."""
        backbone = self.cfg.MODEL.BACKBONE
        print(f"Loading CLIP (backbone: {backbone.NAME}{', file: ' + backbone.PATH if backbone.PATH else ''})")
        clip_model = load_clip(backbone.NAME, backbone.PATH, backbone.DOWNLOAD_ROOT or None)
        # of the fp32 weights on the CPU (as predict loads them): the run record and the checkpoints
        # keep it, so a resumed run must use the weights it started with and predict can check them
        self.backbone_fingerprint = weights_fingerprint(clip_model)
        return clip_model.to(self.device)

    def frozen_class_features(self, clip_model, settings):
        """Frozen CLIP's class text features [C, E] fp32 from the texts the method asks for,
        computed where the run computes (a GPU run does not wait on the CPU) before CLIP is cast
        to PREC, and cached on disk; None for methods that use none."""
        texts = self.spec.class_texts(settings, self.cfg.DATASET.NAME) if self.spec.class_texts else None
        if texts is None:
            return None
        print(f"Class text templates: {list(texts.templates)}")
        store = ClassFeatureStore(cache_root(self.cfg.MODEL.FEATURE_CACHE_DIR), report=print)
        chunk = 1024 if self.device.type == "cuda" else 256
        path = descriptions_path(self.cfg) if texts.descriptions else None
        try:
            return frozen_class_features(PromptedTextEncoder(clip_model), self.dm.dataset.classnames, path,
                                         templates=texts.templates, store=store, chunk=chunk,
                                         normalize_each=texts.normalize_each, keep_each=texts.keep_each)
        except DescriptionsError as err:
            raise DescriptionsError(f"{err} (set by DATASET.DESCRIPTIONS_FILE / DATASET.DESCRIPTIONS_DIR)") from err

    def to_compute_precision(self, clip_model):
        """fp16/bf16: cast frozen CLIP's matmul weights; fp32 and amp keep fp32 weights."""
        if self.precision in HALF_DTYPES:
            cast_clip(clip_model, HALF_DTYPES[self.precision])
        return clip_model

    def build_model(self):
        cfg = self.cfg
        settings = self.settings_from(cfg)
        clip_model = self.load_frozen_clip()
        self.check_fit(cfg, settings, backbone_shape(clip_model))  # a local file's shape is known now
        frozen_text_features = self.frozen_class_features(clip_model, settings)
        self.to_compute_precision(clip_model)
        self.model = self.spec.model(clip_model, settings, self.dm.dataset.classnames, frozen_text_features)
        if cfg.MODEL.GRADIENT_CHECKPOINTING:
            print("Gradient checkpointing: frozen encoder blocks recompute their activations in backward")
            for module in self.model.modules():
                if isinstance(module, (PromptedTextEncoder, PromptedImageEncoder)):
                    module.gradient_checkpointing = True
        trainable = self.model.prompt_learner
        if cfg.MODEL.INIT_WEIGHTS:
            state = self.load_state_for(self.spec.checkpoint_folder, cfg.MODEL.INIT_WEIGHTS)
            load_strict(trainable, state["state_dict"], cfg.MODEL.INIT_WEIGHTS)
        chosen = self.layout.dataset_config.get(cfg.DATASET.NAME)
        if chosen:
            print(f"The release's values for {cfg.DATASET.NAME} (over the config file; command-line options win): "
                  + ", ".join(f"{key} {value}" for key, value in chosen.items()))
        print(f"{type(self).__name__}: {settings}")
        print(f"{len(self.dm.dataset.classnames)} classes, prompt prefix '{getattr(self.model, 'prompt_prefix', '')}'")
        self.model.to(self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "amp" else None
        if not self.spec.trains:
            self.save_description()
            return
        n_params = sum(p.numel() for p in trainable.parameters() if p.requires_grad)
        print(f"Trainable parameters: {n_params:,} (frozen CLIP excluded from checkpoints)")
        self.optim = build_optimizer(trainable, cfg.OPTIM)
        if cfg.OPTIM.NAME in ("adam", "amsgrad", "adamw", "radam"):
            for group in self.optim.param_groups:
                group["eps"] = cfg.OPTIM.EPS
            self.optim.defaults["eps"] = cfg.OPTIM.EPS
        self.sched = build_lr_scheduler(self.optim, cfg.OPTIM)
        self.register_model(self.spec.checkpoint_folder, trainable, self.optim, self.sched)

    def checkpoint_info(self) -> dict:
        """The method, its settings and precision, the backbone (name, file, fingerprint of its
        weights), the test transform, the class names and texts: vlprompt.load_classifier
        rebuilds the model from a checkpoint with this and nothing else."""
        cfg, settings = self.cfg, self.settings_from(self.cfg)
        texts = self.spec.class_texts(settings, cfg.DATASET.NAME) if self.spec.class_texts else None
        descriptions = descriptions_path(cfg) if texts is not None and texts.descriptions else ""
        backbone = cfg.MODEL.BACKBONE
        return plain({
            "format": INFO_FORMAT, "method": self.spec.name, "trainer": cfg.TRAINER.NAME,
            "settings": dataclasses.asdict(settings),
            "precision": self.precision,
            "backbone": {"name": backbone.NAME, "path": osp.abspath(backbone.PATH) if backbone.PATH else "",
                         "download_root": backbone.DOWNLOAD_ROOT, "fingerprint": self.backbone_fingerprint},
            "input": input_info(cfg.INPUT),
            "classnames": list(self.dm.dataset.classnames),
            "dataset": cfg.DATASET.NAME,
            "descriptions": osp.abspath(descriptions) if descriptions and osp.isfile(descriptions) else "",
        })

    def save_description(self):
        """An evaluation-only method (zero-shot CLIP) saves no weights; its run folder still gets
        a checkpoint holding `info` alone, so that load_classifier and predict take the run too."""
        path = osp.join(self.output_dir, self.spec.checkpoint_folder, "model-best.pth.tar")
        atomic_torch_save({"format": "vlprompt-trainable-1", "state_dict": {}, "epoch": 0,
                           "info": self.checkpoint_info()}, path)

    def load_state_for(self, name, path):
        """Our checkpoints, or the release's (key names converted by the method's descriptor; a
        pickled one only with MODEL.TRUST_RELEASE_CHECKPOINT True)."""
        release = self.spec.release_checkpoint
        state = read_checkpoint(path, trust_pickle=self.cfg.MODEL.TRUST_RELEASE_CHECKPOINT,
                                trust_key="MODEL.TRUST_RELEASE_CHECKPOINT")
        weights = state.get("state_dict", state)
        if release is not None and release.recognizes(weights):
            print(f"{path} is a checkpoint of the official release: converting its key names")
            try:
                converted = release.convert(weights)
            except (KeyError, ValueError) as err:  # a release file of another method (same folder name)
                raise CheckpointError(f"{path} is not a {self.spec.name} release checkpoint ({err.args[0]}). "
                                      f"{written_by(weights, path)}") from err
            return {**state, "state_dict": converted, "epoch": state.get("epoch")}
        return state

    def train(self):
        if not self.spec.trains:
            raise UserError(f"{self.spec.name} has nothing to train: run train.py with --eval-only")
        super().train()

    # ---- train -----------------------------------------------------------------------------
    def after_epoch(self):
        # The model's end-of-epoch work (PromptSRC's prompt aggregation) comes before Dassl's
        # after_epoch, which evaluates and checkpoints the epoch: the last checkpoint holds its result.
        end_epoch = getattr(self.model, "end_epoch", None)
        if end_epoch is not None:
            end_epoch(self.epoch, self.max_epoch)
        super().after_epoch()

    def run_state(self) -> dict:
        model_state = getattr(self.model, "run_state", None)
        return {"model": model_state()} if model_state is not None else {}

    def load_run_state(self, state: dict) -> None:
        if "model" in state:
            self.model.load_run_state(state["model"])

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.precision == "amp")

    def forward_backward(self, batch):
        images, labels = self.parse_batch_train(batch)
        with self.autocast():
            loss, logits, parts = self.model.loss(images, labels)
        self.optim.zero_grad()
        self.checked_step(loss, self.optim)
        # tensors on the device: run_epoch reads them at its print steps, not here
        summary = {"loss": loss.detach(), "acc": compute_accuracy(logits.detach(), labels)[0], **parts}
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        return summary

    def parse_batch_train(self, batch):
        """(images, labels); with DATALOADER.K_TRANSFORMS > 1 Dassl gives a list of augmented views
        of each image, passed on as a list [K x [B, 3, H, W]] (only models with `takes_views`)."""
        images = batch["img"]
        # asynchronous from the loader's pinned memory (a GPU run): the copy overlaps compute
        if isinstance(images, (list, tuple)):
            return [view.to(self.device, non_blocking=True) for view in images], batch["label"].to(self.device, non_blocking=True)
        return images.to(self.device, non_blocking=True), batch["label"].to(self.device, non_blocking=True)

    # ---- evaluate --------------------------------------------------------------------------
    feature_cache = None

    def build_feature_cache(self):
        """Frozen features of eval images, keyed by what changes their numbers: backbone weights,
        precision, where and how they are computed (device type, TF32, torch version) and the
        transform."""
        encoder = self.model.image_encoder
        backbone = f"{tensors_fingerprint(encoder.state_dict().items())}|{self.precision}|{compute_key(self.device)}"
        transform = (f"{self.test_loader.dataset.transform!r}|torchvision {torchvision.__version__}"
                     f"|PIL {PIL.__version__}")
        return ImageFeatureCache(cache_root(self.cfg.MODEL.FEATURE_CACHE_DIR), backbone, transform)

    @torch.no_grad()
    def test(self, split=None):
        """Dassl's evaluation loop, with each batch's image files passed to the inference (the
        frozen-feature cache is keyed by them) and the classes encoded once per pass."""
        if (self.feature_cache is None and self.cfg.TEST.CACHE_FROZEN_FEATURES
                and self.model.uses_frozen_image_features):
            self.feature_cache = self.build_feature_cache()
        self.set_model_mode("eval")
        self.model.eval()
        self.evaluator.reset()
        split = split or self.cfg.TEST.SPLIT
        if split != "val" or self.val_loader is None:
            split = "test"
        loader = self.val_loader if split == "val" else self.test_loader
        print(f"Evaluate on the *{split}* set")
        try:
            with self.autocast(), self.model.evaluation():
                for batch in tqdm(loader):
                    images = batch["img"].to(self.device, non_blocking=True)
                    labels = batch["label"].to(self.device, non_blocking=True)
                    self.evaluator.process(self.infer(images, batch["impath"]), labels)
        finally:
            if self.feature_cache is not None:
                self.feature_cache.save()
        results = self.evaluator.evaluate()
        for name, value in results.items():
            self.write_scalar(f"{split}/{name}", value, self.epoch)
        return list(results.values())[0]

    def infer(self, images, impaths):
        """Logits of one evaluation batch; frozen image features come from the cache if kept."""
        if self.feature_cache is None:
            return self.model(images)
        frozen = self.feature_cache.features(impaths, images, self.model.frozen_image_features)
        return self.model(images, frozen_image_features=frozen)


def compute_key(device: torch.device) -> str:
    """What, beside weights and precision, changes a feature's last digits: the device type's
    kernels, TF32 on a GPU (train.py turns it on for fp32 runs) and the torch version."""
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return f"{device.type}|tf32={tf32}|torch {torch.__version__}"


def make_trainer(spec: MethodSpec, name: str, layout: ConfigLayout) -> type:
    """The Dassl trainer class `name` of a method, reading its settings where `layout` says."""
    return type(name, (ClipPromptTrainer,), {
        "spec": spec, "layout": layout, "__module__": __name__,
        "__doc__": f"Dassl trainer of {spec.name} (TRAINER.{layout.node}.*), made from its descriptor."})
