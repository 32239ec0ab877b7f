"""Dassl trainers `DCP` and `CMPA` (the release's name and config keys): thin adapters over vlprompt.methods.dcp."""
from dassl.engine import TRAINER_REGISTRY

from vlprompt.methods.dcp import DCP as DCPModel, DCPConfig

from .clip_prompt import ClipPromptTrainer


def dcp_config(node, node_name: str) -> DCPConfig:
    return DCPConfig(n_ctx=node.N_CTX, ctx_init=node.CTX_INIT, prompt_depth=node.PROMPT_DEPTH, ps=node.PS,
                     fusing=node.FUSING, text_update=node.TEXT_UPDATE, node=node_name)


@TRAINER_REGISTRY.register()
class DCP(ClipPromptTrainer):
    METHOD = "DCP"
    CHECKPOINT_NAME = "MultiModalPromptLearner"  # the release's folder name

    def build_prompt_model(self):
        clip_model = self.load_frozen_clip()
        self.to_compute_precision(clip_model)
        settings = dcp_config(self.method_cfg, f"TRAINER.{self.METHOD}")
        model = DCPModel(clip_model, settings, self.dm.dataset.classnames)
        print(f"DCP: fusing {settings.fusing}, text update {'on' if settings.text_update else 'off'}, "
              f"{'one CMPA module shared by' if settings.ps else 'one CMPA module per'} layers "
              f"1..{settings.prompt_depth}, prompt prefix '{model.prompt_prefix}'")
        return model, model.prompt_learner


@TRAINER_REGISTRY.register()
class CMPA(DCP):
    """The release's trainer name: reads TRAINER.CMPA.*, whose defaults are the release's behaviour
    (visual states fused over the batch by their mean, text update not spliced in)."""
    METHOD = "CMPA"
