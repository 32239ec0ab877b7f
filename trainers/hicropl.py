"""Dassl trainer `HiCroPL`: a thin adapter over vlprompt.methods.hicropl."""
import os.path as osp

from dassl.engine import TRAINER_REGISTRY

from vlprompt.clip.class_features import DescriptionsError
from vlprompt.methods.hicropl import (HiCroPL as HiCroPLModel, HiCroPLConfig, convert_release_state_dict,
                              load_release_checkpoint)
from vlprompt.files import load_strict

from .clip_prompt import ClipPromptTrainer

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


def hicropl_config(cfg) -> HiCroPLConfig:
    node = cfg.TRAINER.HICROPL
    return HiCroPLConfig(n_ctx=node.N_CTX, ctx_init=node.CTX_INIT, prompt_depth=node.PROMPT_DEPTH,
                         cross_layer=node.CROSS_LAYER, lambd=node.LAMBD, mapper_mode=node.MAPPER_MODE,
                         n_heads=node.N_HEADS)


@TRAINER_REGISTRY.register()
class HiCroPL(ClipPromptTrainer):
    METHOD = "HICROPL"
    CHECKPOINT_NAME = "VLPromptLearner"  # the release's folder name

    def build_prompt_model(self):
        cfg = self.cfg
        clip_model = self.load_frozen_clip()
        classnames = self.dm.dataset.classnames
        try:
            fixed = self.frozen_class_features(clip_model, classnames, descriptions_path(cfg))
        except DescriptionsError as err:
            raise DescriptionsError(f"{err} (set by DATASET.DESCRIPTIONS_FILE / DATASET.DESCRIPTIONS_DIR)") from err
        self.to_compute_precision(clip_model)
        model = HiCroPLModel(clip_model, hicropl_config(cfg), classnames, fixed,
                             exact_shortcuts=cfg.TRAINER.HICROPL.EXACT_SHORTCUTS)
        if cfg.MODEL.INIT_WEIGHTS:
            state = self.load_state_for(self.CHECKPOINT_NAME, cfg.MODEL.INIT_WEIGHTS)
            load_strict(model.prompt_learner, state["state_dict"], cfg.MODEL.INIT_WEIGHTS)
        print(f"HiCroPL: {cfg.TRAINER.HICROPL.MAPPER_MODE} mappers, prompt prefix "
              f"'{model.prompt_prefix}', {len(classnames)} classes")
        return model, model.prompt_learner

    def load_state_for(self, name, path):
        """Our checkpoints, or the release's (converted; frozen CLIP and class buffers dropped)."""
        trust = self.cfg.TRAINER.HICROPL.TRUST_RELEASE_CHECKPOINT
        try:
            state = self._read_checkpoint(path)
        except RuntimeError:
            # the release pickles its scheduler object: only readable with explicit trust
            return {"state_dict": load_release_checkpoint(path, trust_pickle=trust), "epoch": None}
        weights = state.get("state_dict", {})
        if any(k.startswith(("prompt_learner.", "module.prompt_learner.")) for k in weights):
            print(f"{path} is a checkpoint of the official release: converting its key names")
            state = dict(state, state_dict=convert_release_state_dict(weights))
        return state
