"""Dassl backbone `edgecnn` and trainer `EdgeCNN`: the release's recipe for facial expressions.

Cross-entropy; SGD (OPTIM.*); lr constant up to epoch DECAY_START, then x DECAY_RATE every
DECAY_EVERY epochs; element-wise gradient clamp; random 44 crop of the 48 px face + flip for
training, and the ten-crop test (corners, centre and their flips) with averaged logits.
"""
import os.path as osp

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from dassl.engine import TRAINER_REGISTRY
from dassl.engine.trainer import SimpleNet
from dassl.metrics import compute_accuracy
from dassl.modeling import BACKBONE_REGISTRY, Backbone
from dassl.optim import build_optimizer
from torch.optim.lr_scheduler import LambdaLR

from vlprompt.methods import settings as method_settings
from vlprompt.errors import InvalidValue
from vlprompt.files import CheckpointError, load_strict, read_checkpoint
from vlprompt.methods.edgecnn import (RELEASE_FILE, EdgeCNN as EdgeCNNNet, EdgeCNNSettings, convert_release_state_dict,
                                      is_release_state_dict, ten_crop_logits)

from .checkpointed_trainer import CheckpointedTrainer
from .schedule import EpochTable


class EdgeCNNBackbone(Backbone):
    def __init__(self, init: str = "he"):
        super().__init__()
        self.net = EdgeCNNNet(num_classes=0, init=init)
        self._out_features = self.net.out_features

    def forward(self, x):
        return self.net(x)


@BACKBONE_REGISTRY.register()
def edgecnn(pretrained=False, init="he", **kwargs):
    if pretrained:
        print("edgecnn: no pretrained weights exist; training from scratch (set MODEL.BACKBONE.PRETRAINED False)")
    return EdgeCNNBackbone(init)


class StackCrops:
    """TenCrop's tuple of PIL crops -> [10, 3, h, w] tensor."""

    def __call__(self, crops):
        return torch.stack([T.functional.to_tensor(crop) for crop in crops])

    def __repr__(self):
        return f"{type(self).__name__}()"


def train_transform(cfg):
    """Resize to IMAGE_SIZE (a no-op on FER's 48 px faces), random INPUT.SIZE crop, flip; [0, 1] pixels."""
    return T.Compose([T.Resize(cfg.TRAINER.EDGECNN.IMAGE_SIZE), T.RandomCrop(cfg.INPUT.SIZE),
                      T.RandomHorizontalFlip(), T.ToTensor()])


def test_transform(cfg):
    resize = T.Resize(cfg.TRAINER.EDGECNN.IMAGE_SIZE)
    if cfg.TRAINER.EDGECNN.TEN_CROP:
        return T.Compose([resize, T.TenCrop(cfg.INPUT.SIZE), StackCrops()])
    return T.Compose([resize, T.CenterCrop(cfg.INPUT.SIZE), T.ToTensor()])


def step_decay_factors(max_epoch: int, start: int, every: int, rate: float):
    """The release's schedule: factor 1 up to epoch `start`, then rate ** ((epoch - start) // every)."""
    return [rate ** ((epoch - start) // every) if epoch > start else 1.0 for epoch in range(max_epoch)]


def edgecnn_settings(cfg) -> EdgeCNNSettings:
    try:
        settings = method_settings.from_values(EdgeCNNSettings, dict(cfg.TRAINER.EDGECNN))
    except method_settings.ConfigError as err:
        raise InvalidValue(err.key_message(lambda name: f"TRAINER.EDGECNN.{name.upper()}")) from err
    if settings.image_size < max(cfg.INPUT.SIZE):
        raise InvalidValue(f"TRAINER.EDGECNN.IMAGE_SIZE={settings.image_size!r} is invalid: must be at least the "
                         f"crop INPUT.SIZE {max(cfg.INPUT.SIZE)}")
    return settings


@TRAINER_REGISTRY.register()
class EdgeCNN(CheckpointedTrainer):
    @classmethod
    def check_cfg(cls, cfg):
        super().check_cfg(cfg)
        edgecnn_settings(cfg)

    def build_data_loader(self):
        super().build_data_loader(custom_tfm_train=train_transform(self.cfg),
                                  custom_tfm_test=test_transform(self.cfg))

    def build_model(self):
        cfg = self.cfg
        settings = edgecnn_settings(cfg)
        self.model = SimpleNet(cfg, cfg.MODEL, self.num_classes, init=settings.init)
        if settings.init == "he":
            torch.nn.init.zeros_(self.model.classifier.bias)  # as the backbone's own linear layers
        if cfg.MODEL.INIT_WEIGHTS:
            load_strict(self.model, self.load_state_for("model", cfg.MODEL.INIT_WEIGHTS)["state_dict"],
                        cfg.MODEL.INIT_WEIGHTS)
        self.model.to(self.device)
        print(f"EdgeCNN parameters: {sum(p.numel() for p in self.model.parameters()):,}, {settings}")
        self.optim = build_optimizer(self.model, cfg.OPTIM)
        factors = step_decay_factors(cfg.OPTIM.MAX_EPOCH, settings.decay_start, settings.decay_every,
                                     settings.decay_rate)
        self.sched = LambdaLR(self.optim, lr_lambda=[EpochTable(factors) for _ in self.optim.param_groups])
        self.register_model("model", self.model, self.optim, self.sched)

    def checkpoint_path(self, directory, name, epoch=None):
        """Ours, or the release's PrivateTest_model.t7 when --model-dir is its output folder."""
        release = osp.join(directory, RELEASE_FILE)
        if epoch is None and osp.isfile(release) and not osp.isdir(osp.join(directory, name)):
            return release
        return super().checkpoint_path(directory, name, epoch)

    def load_state_for(self, name, path):
        """Our checkpoints, or the release's .t7 (its layer names mapped by position; a pickled
        module only with MODEL.TRUST_RELEASE_CHECKPOINT True)."""
        state = read_checkpoint(path, trust_pickle=self.cfg.MODEL.TRUST_RELEASE_CHECKPOINT,
                                trust_key="MODEL.TRUST_RELEASE_CHECKPOINT")
        if "net" not in state:
            return state
        net = state["net"]
        net = net.state_dict() if isinstance(net, torch.nn.Module) else net
        if not is_release_state_dict(net):
            raise CheckpointError(f"{path} holds no EdgeCNN release weights")
        if self.cfg.DATASET.NAME == "RAFDB" and self.cfg.DATASET.RAF_LABEL_ORDER != "fer":
            raise InvalidValue(f"{path} is a release model, whose classes are in FER-2013's order (its RAF-DB "
                               f"models too): set DATASET.RAF_LABEL_ORDER fer")
        weights = convert_release_state_dict(net, self.num_classes)
        print(f"{path} is a checkpoint of the official release (best PrivateTest accuracy "
              f"{state.get('best_PrivateTest_acc')} at epoch {state.get('best_PrivateTest_acc_epoch')}): "
              f"its layer names mapped by position")
        # SimpleNet holds the network's features under backbone.net, its classifier beside it
        ours = {(k if k.startswith("classifier.") else f"backbone.net.{k}"): v for k, v in weights.items()}
        return {"state_dict": ours, "epoch": state.get("best_PrivateTest_acc_epoch")}

    def forward_backward(self, batch):
        images, labels = self.parse_batch_train(batch)
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels)
        self.optim.zero_grad()
        clamp = self.cfg.TRAINER.EDGECNN.GRAD_CLAMP

        def clamp_gradients():  # element-wise, as the release
            for param in self.model.parameters():
                if param.grad is not None:
                    param.grad.clamp_(-clamp, clamp)
        # the loss only is checked, as before: the release clamps large gradients by design
        self.checked_step(loss, self.optim, check_grads=False, before_step=clamp_gradients if clamp > 0 else None)
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        return {"loss": loss.detach(), "acc": compute_accuracy(logits.detach(), labels)[0]}

    def parse_batch_train(self, batch):
        return batch["img"].to(self.device, non_blocking=True), batch["label"].to(self.device, non_blocking=True)

    def model_inference(self, images):
        return ten_crop_logits(self.model, images) if images.dim() == 5 else self.model(images)
