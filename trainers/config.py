"""Config keys this toolkit adds to Dassl's defaults (yacs), with the release's defaults."""
from yacs.config import CfgNode as CN

PRECISIONS = ("fp32", "fp16", "bf16", "amp")


def extend_cfg(cfg: CN) -> CN:
    # Bitwise-reproducible GPU runs (train.py --deterministic): deterministic algorithms only and
    # no cuDNN autotuning, slower. Off: cuDNN autotunes (as in CoOp) and GPU results vary in the
    # last digits between runs; CPU runs are reproducible either way.
    cfg.DETERMINISTIC = False

    # Adam's epsilon: the release's configs set it (1e-3); upstream Dassl has no such key.
    cfg.OPTIM.EPS = 1e-8

    # CLIP weights: by name (downloaded by the clip package) or a local file (offline nodes).
    cfg.MODEL.BACKBONE.PATH = ""
    cfg.MODEL.BACKBONE.DOWNLOAD_ROOT = ""  # "" = ~/.cache/clip
    # On-disk cache of frozen features (class text features); "" = $VLPROMPT_CACHE or ~/.cache/vlprompt
    cfg.MODEL.FEATURE_CACHE_DIR = ""

    # Unreadable images stop the run with their path; True leaves them out with a warning
    # (every image is then decoded once when the loaders are built).
    cfg.DATALOADER.SKIP_BROKEN_IMAGES = False

    # Reuse frozen CLIP features of val/test images across evaluations, seeds and configs
    # (cached in FEATURE_CACHE_DIR, keyed by backbone weights, test transform and image file).
    cfg.TEST.CACHE_FROZEN_FEATURES = True

    # CoOp's base-to-new protocol: all, base (first half of the labels) or new (second half).
    cfg.DATASET.SUBSAMPLE_CLASSES = "all"
    # Per-class descriptions for frozen class features, the release's gpt_file format:
    # DESCRIPTIONS_FILE if set, else DESCRIPTIONS_DIR/<dataset key>_prompt.json if it exists,
    # else prompt templates.
    cfg.DATASET.DESCRIPTIONS_DIR = "gpt_file"
    cfg.DATASET.DESCRIPTIONS_FILE = ""
    # RAF-DB's labels: "raf" (its own order) or "fer" (FER-2013's, for cross-dataset tests)
    cfg.DATASET.RAF_LABEL_ORDER = "raf"

    cfg.TRAINER.HICROPL = CN()
    cfg.TRAINER.HICROPL.N_CTX = 16  # prompt tokens per layer and modality
    cfg.TRAINER.HICROPL.CTX_INIT = "a photo of a"  # used when it has >= N_CTX tokens
    cfg.TRAINER.HICROPL.PROMPT_DEPTH = 12  # layers 0..PROMPT_DEPTH-1 carry prompts
    cfg.TRAINER.HICROPL.CROSS_LAYER = 6  # layers < CROSS_LAYER: text->image; the rest image->text
    cfg.TRAINER.HICROPL.LAMBD = 12.0  # weight of the distillation toward frozen CLIP
    cfg.TRAINER.HICROPL.PREC = "fp16"  # fp32 | fp16 | bf16 | amp
    cfg.TRAINER.HICROPL.MAPPER_MODE = "learned"  # learned | release (in-place, no gradient)
    cfg.TRAINER.HICROPL.N_HEADS = 8  # heads of the proxies and mappers
    # Exact shortcuts in the text encoder (cut at EOT, shared prefix); False = the release's way.
    cfg.TRAINER.HICROPL.EXACT_SHORTCUTS = True
    # Release checkpoints pickle a scheduler object: reading one needs full unpickling.
    cfg.TRAINER.HICROPL.TRUST_RELEASE_CHECKPOINT = False

    # DCP (Findings ACL 2023); TRAINER.CMPA: the same keys under the release's trainer name, with
    # the release's behaviour as defaults.
    for node, fusing, text_update in (("DCP", "none", True), ("CMPA", "mean", False)):
        cfg.TRAINER[node] = CN()
        cfg.TRAINER[node].N_CTX = 16
        cfg.TRAINER[node].CTX_INIT = "a photo of a"  # used when it has >= N_CTX tokens
        cfg.TRAINER[node].PROMPT_DEPTH = 9  # CMPA updates enter layers 1..PROMPT_DEPTH
        cfg.TRAINER[node].PS = True  # one CMPA module for all layers (False: one per layer)
        cfg.TRAINER[node].FUSING = fusing  # none (per image, batch-independent) | mean | first | max
        cfg.TRAINER[node].TEXT_UPDATE = text_update  # splice the text update in (the release does not)
        cfg.TRAINER[node].PREC = "fp16"

    cfg.TRAINER.EDGECNN = CN()
    cfg.TRAINER.EDGECNN.IMAGE_SIZE = 48  # faces are resized to this, then cropped to INPUT.SIZE
    cfg.TRAINER.EDGECNN.TEN_CROP = True  # test on the ten crops, logits averaged
    cfg.TRAINER.EDGECNN.GRAD_CLAMP = 0.1  # element-wise gradient clamp (0 = off)
    cfg.TRAINER.EDGECNN.DECAY_START = 80  # lr constant up to this epoch,
    cfg.TRAINER.EDGECNN.DECAY_EVERY = 5  # then multiplied by DECAY_RATE every DECAY_EVERY epochs
    cfg.TRAINER.EDGECNN.DECAY_RATE = 0.9

    cfg.TRAINER.ZSCLIP = CN()
    cfg.TRAINER.ZSCLIP.PREC = "fp16"
    cfg.TRAINER.ZSCLIP.TEMPLATES = "dataset"  # dataset: one hand-written prompt | ensemble
    return cfg
