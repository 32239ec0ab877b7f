"""Train or evaluate a prompt learner with Dassl: the CoOp / MaPLe command line."""
import argparse
import os
import sys
import warnings

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # clip / wilds imports
# Dassl imports wilds, which starts a PyPI version check through `outdated` in a thread that
# holds every run for seconds on an offline node; without `outdated` importable, wilds skips it.
sys.modules.setdefault("outdated", None)

import torch  # noqa: E402
from dassl.config import get_cfg_default
from dassl.engine import TRAINER_REGISTRY, build_trainer
from dassl.utils import collect_env_info, set_random_seed, setup_logger

import datasets  # noqa: F401  registers the CoOp datasets
import trainers  # noqa: F401  registers the trainers
from trainers.config import extend_cfg


def print_args(args, cfg):
    print("***************\n** Arguments **\n***************")
    for key in sorted(vars(args)):
        print(f"{key}: {getattr(args, key)}")
    print("************\n** Config **\n************")
    print(cfg)


def reset_cfg(cfg, args):
    if args.root:
        cfg.DATASET.ROOT = args.root
    if args.output_dir:
        cfg.OUTPUT_DIR = args.output_dir
    if args.resume:
        cfg.RESUME = args.resume
    if args.seed is not None:  # 0 is a seed too
        cfg.SEED = args.seed
    if args.source_domains:
        cfg.DATASET.SOURCE_DOMAINS = args.source_domains
    if args.target_domains:
        cfg.DATASET.TARGET_DOMAINS = args.target_domains
    if args.transforms:
        cfg.INPUT.TRANSFORMS = args.transforms
    if args.trainer:
        cfg.TRAINER.NAME = args.trainer
    if args.backbone:
        cfg.MODEL.BACKBONE.NAME = args.backbone
    if args.head:
        cfg.MODEL.HEAD.NAME = args.head
    if args.deterministic:
        cfg.DETERMINISTIC = True


def setup_cfg(args):
    cfg = extend_cfg(get_cfg_default())
    if args.dataset_config_file:
        cfg.merge_from_file(args.dataset_config_file)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    reset_cfg(cfg, args)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def configure_determinism(deterministic: bool, on_cuda: bool) -> str:
    """Bitwise-reproducible GPU runs on request (same seed, same result; resume equals an
    uninterrupted run), at some cost in speed; by default cuDNN autotunes, as in CoOp."""
    if deterministic:
        # cuBLAS is deterministic only with a fixed workspace, read when CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        return "Deterministic mode: deterministic algorithms only, cuDNN autotuning off (bitwise reproducible)"
    torch.backends.cudnn.benchmark = on_cuda
    return ("cuDNN autotuning on: GPU results vary in the last digits between runs (--deterministic to avoid it)"
            if on_cuda else "")


def main(args):
    cfg = setup_cfg(args)
    determinism = configure_determinism(cfg.DETERMINISTIC, on_cuda=torch.cuda.is_available() and cfg.USE_CUDA)
    if cfg.SEED >= 0:
        print(f"Setting fixed seed: {cfg.SEED}")
        set_random_seed(cfg.SEED)
    setup_logger(cfg.OUTPUT_DIR)
    if determinism:
        print(determinism)
    print_args(args, cfg)
    print("Collecting env info ...")
    print(f"** System info **\n{collect_env_info()}\n")

    if cfg.TRAINER.NAME not in TRAINER_REGISTRY.registered_names():
        raise SystemExit(f"--trainer / TRAINER.NAME={cfg.TRAINER.NAME!r} is not a registered trainer: use one of "
                         f"{sorted(TRAINER_REGISTRY.registered_names())}")
    trainer = build_trainer(cfg)
    if args.eval_only:
        trainer.load_model(args.model_dir, epoch=args.load_epoch)
        trainer.test()
        return
    if not args.no_train:
        trainer.train()


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=str, default="", help="path to dataset")
    parser.add_argument("--output-dir", type=str, default="", help="output directory")
    parser.add_argument("--resume", type=str, default="", help="checkpoint directory to resume from")
    parser.add_argument("--seed", type=int, default=None, help="random seed (>= 0 fixes it)")
    parser.add_argument("--source-domains", type=str, nargs="+", help="source domains for DA/DG")
    parser.add_argument("--target-domains", type=str, nargs="+", help="target domains for DA/DG")
    parser.add_argument("--transforms", type=str, nargs="+", help="data augmentation methods")
    parser.add_argument("--config-file", type=str, default="", help="path to config file")
    parser.add_argument("--dataset-config-file", type=str, default="", help="path to dataset config file")
    parser.add_argument("--trainer", type=str, default="", help="name of trainer")
    parser.add_argument("--backbone", type=str, default="", help="name of CNN backbone")
    parser.add_argument("--head", type=str, default="", help="name of head")
    parser.add_argument("--eval-only", action="store_true", help="evaluation only")
    parser.add_argument("--model-dir", type=str, default="", help="load model from this directory for eval-only mode")
    parser.add_argument("--load-epoch", type=int, help="load model weights at this epoch for evaluation")
    parser.add_argument("--no-train", action="store_true", help="do not call trainer.train()")
    parser.add_argument("--deterministic", action="store_true",
                        help="bitwise-reproducible GPU runs (deterministic algorithms, no cuDNN autotuning; "
                             "slower); the same as the config option DETERMINISTIC True")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER, help="modify config options from the command line")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
