"""Train or evaluate a prompt learner with Dassl: the CoOp / MaPLe command line."""
import argparse
import io
import os
import re
import sys
import warnings

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # clip / wilds imports
# Dassl imports wilds, which starts a PyPI version check through `outdated` in a thread that
# holds every run for seconds on an offline node; without `outdated` importable, wilds skips it.
sys.modules.setdefault("outdated", None)

import torch  # noqa: E402
import yaml  # noqa: E402
from dassl.config import get_cfg_default
from dassl.engine import TRAINER_REGISTRY, build_trainer
from dassl.utils import collect_env_info, set_random_seed, setup_logger

import datasets  # noqa: F401  registers the CoOp datasets
import trainers  # noqa: F401  registers the trainers
from trainers.clip_prompt import ClipPromptTrainer
from trainers.config import extend_cfg
from vlprompt import device
from vlprompt.errors import InvalidValue, report_user_errors
from vlprompt.files import exclusive_folder
from vlprompt.methods.registry import get_method
from vlprompt.methods.settings import closest, describe


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


class ConfigFileError(InvalidValue):
    """A config file or option that yacs cannot merge; the message names it and the fix."""


def config_keys(node, prefix=""):
    """Every full key of a yacs config, e.g. TRAINER.HICROPL.N_CTX."""
    keys = []
    for name, value in node.items():
        full = f"{prefix}{name}"
        keys += config_keys(value, full + ".") if isinstance(value, dict) else [full]
    return keys


def explained(err: Exception, cfg, source: str) -> ConfigFileError:
    """yacs's AssertionError/ValueError/KeyError for `source` as one message with the fix."""
    text = str(err).strip("'\"")
    unknown = re.match(r"Non-existent (?:config )?key: (\S+)", text)
    if unknown:
        key = unknown.group(1)
        hint = closest(key, config_keys(cfg))
        return ConfigFileError(f"{source}: unknown config key {key}" + (f" (did you mean {' or '.join(hint)}?)" if hint
                               else "") + ". `python train.py --trainer NAME --help-config` lists a method's keys.")
    mismatch = re.match(r"Type mismatch \((.+?) vs\. (.+?)\) with values \((.*) vs\. (.*)\) for config key: (\S+)",
                        text, re.S)
    if mismatch:
        expected, _, default, value, key = mismatch.groups()
        kind = re.sub(r"<class '(\w+)'>", r"\1", expected)
        return ConfigFileError(f"{source}: {key}={value} is invalid: expected {kind} (like its default {default})")
    if "odd length" in text:
        return ConfigFileError(f"{source}: config options come in KEY VALUE pairs, e.g. OPTIM.MAX_EPOCH 10; "
                               f"one of the options has no value")
    return ConfigFileError(f"{source}: {text}")


def merge_file(cfg, path: str, flag: str) -> None:
    if not os.path.isfile(path):
        raise ConfigFileError(f"{flag} {path}: no such file")
    try:
        cfg.merge_from_file(path)
    except (AssertionError, ValueError, KeyError) as err:
        raise explained(err, cfg, f"{flag} {path}") from err
    except yaml.YAMLError as err:
        raise ConfigFileError(f"{flag} {path} is not valid YAML: {err}") from err


def setup_cfg(args):
    cfg = extend_cfg(get_cfg_default())
    if args.dataset_config_file:
        merge_file(cfg, args.dataset_config_file, "--dataset-config-file")
    if args.config_file:
        merge_file(cfg, args.config_file, "--config-file")
    reset_cfg(cfg, args)
    try:
        cfg.merge_from_list(args.opts)
    except (AssertionError, ValueError, KeyError) as err:
        raise explained(err, cfg, "config options") from err
    device.apply_to_cfg(cfg)  # VLPROMPT_DEVICE pins the device (cpu: CUDA is never initialised)
    cfg.freeze()
    return cfg


def trainer_class(cfg):
    """The registered trainer TRAINER.NAME names, checked with everything knowable without
    weights or data (its settings, and for OpenAI's named backbones their depths and widths)."""
    names = sorted(TRAINER_REGISTRY.registered_names())
    if cfg.TRAINER.NAME not in names:
        hint = closest(cfg.TRAINER.NAME, names)
        raise InvalidValue(f"--trainer / TRAINER.NAME={cfg.TRAINER.NAME!r} is not a registered trainer"
                           + (f" (did you mean {' or '.join(hint)}?)" if hint else "") + f": use one of {names}")
    trainer = TRAINER_REGISTRY.get(cfg.TRAINER.NAME)
    trainer.check_cfg(cfg)
    return trainer


def configure_determinism(deterministic: bool, on_cuda: bool) -> str:
    """Bitwise-reproducible GPU runs on request (same seed, same result; resume equals an
    uninterrupted run), at some cost in speed; by default cuDNN autotunes, as in CoOp."""
    if deterministic:
        # cuBLAS is deterministic only with a fixed workspace, read when CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        set_tf32(False)
        return ("Deterministic mode: deterministic algorithms only, cuDNN autotuning off, TF32 off "
                "(bitwise reproducible, full fp32 matmuls)")
    torch.backends.cudnn.benchmark = on_cuda
    # TF32 (Ampere and later): fp32 matmuls and convolutions on tensor cores, several times faster
    # for a 10-bit mantissa in the products (sums stay fp32); PREC fp32 runs then use it, as
    # cuDNN convolutions already do by default. Only PREC fp32 is concerned: fp16/bf16/amp matmuls
    # are half precision anyway.
    set_tf32(on_cuda)
    return ("cuDNN autotuning on, TF32 on for fp32 matmuls and convolutions: GPU results vary in the last "
            "digits between runs (--deterministic for bitwise-reproducible full-fp32 runs)" if on_cuda else "")


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def close_log() -> None:
    """After a failed start: stop logging to the run folder and remove the log this attempt
    opened, so the next command does not take the folder for an unfinished run."""
    logger = sys.stdout
    if getattr(logger, "file", None) is not None:
        sys.stdout, logger.console = logger.console, io.StringIO()  # Dassl's Logger closes its console
        logger.file.close()
        os.remove(logger.file.name)


def main(args):
    cfg = setup_cfg(args)
    trainer_class(cfg)  # fail fast: before the run folder, the logger, the data and the weights
    device.select_gpu(device.requested_device())
    determinism = configure_determinism(cfg.DETERMINISTIC, on_cuda=cfg.USE_CUDA and torch.cuda.is_available())
    folder_existed = os.path.isdir(cfg.OUTPUT_DIR)
    try:
        with exclusive_folder(cfg.OUTPUT_DIR):
            try:
                if cfg.SEED >= 0:
                    print(f"Setting fixed seed: {cfg.SEED}")
                    set_random_seed(cfg.SEED)
                setup_logger(cfg.OUTPUT_DIR)
                if determinism:
                    print(determinism)
                print_args(args, cfg)
                print("Collecting env info ...")
                print(f"** System info **\n{collect_env_info()}\n")
                trainer = build_trainer(cfg)
            except BaseException:
                close_log()
                raise
            if args.eval_only:
                trainer.load_model(args.model_dir, epoch=args.load_epoch)
                trainer.test()
            elif not args.no_train:
                trainer.train()
    finally:
        if not folder_existed and os.path.isdir(cfg.OUTPUT_DIR) and not os.listdir(cfg.OUTPUT_DIR):
            os.rmdir(cfg.OUTPUT_DIR)  # a failed start leaves no folder behind


def print_config_help(trainer_name: str) -> None:
    """The keys of a method's config node with their defaults and help."""
    try:
        spec = get_method(trainer_name)
    except KeyError as err:
        raise InvalidValue(f"--trainer {trainer_name!r}: {err.args[0]}") from err
    for name, layout in spec.trainer_names():
        if name == trainer_name:
            print(f"{name} ({spec.doc or 'docs/'}):")
            for line in describe(spec.settings, lambda field: f"TRAINER.{layout.path(field)}", layout.overrides):
                print(f"  {line}")
            if issubclass(TRAINER_REGISTRY.get(name), ClipPromptTrainer):
                print(f"  TRAINER.{layout.path('prec')} = 'fp16': fp32, fp16, bf16 (native on the GPU) or amp")


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
    parser.add_argument("--help-config", action="store_true",
                        help="list the config keys of --trainer's method, with their defaults and help, and exit")
    parser.add_argument("--deterministic", action="store_true",
                        help="bitwise-reproducible GPU runs (deterministic algorithms, no cuDNN autotuning; "
                             "slower); the same as the config option DETERMINISTIC True")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER, help="modify config options from the command line")
    return parser


@report_user_errors
def cli():
    args = build_parser().parse_args()
    if args.help_config:
        return print_config_help(args.trainer)
    return main(args)


if __name__ == "__main__":
    cli()
