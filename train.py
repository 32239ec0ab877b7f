"""Train or evaluate a prompt learner with Dassl: the CoOp / MaPLe command line."""
import argparse
import glob
import io
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import asdict, fields

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
from trainers.config import dataset_config_options, extend_cfg
from vlprompt import device
from vlprompt.errors import InvalidValue, report_user_errors
from vlprompt.experiments import record
from vlprompt.experiments.results import finished
from vlprompt.files import OutputWriteError, exclusive_folder
from vlprompt.methods.registry import get_method, methods
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
    # a release's per-dataset values (CoPrompt's) replace the config file's; the command line wins
    cfg.merge_from_list(dataset_config_options(cfg))
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


def trainer_reads(cfg):
    """The keys under TRAINER the running trainer reads (its layout's paths), e.g. HICROPL.N_CTX."""
    for spec in methods():
        for name, layout in spec.trainer_names():
            if name == cfg.TRAINER.NAME:
                reads = [layout.path(f.name) for f in fields(spec.settings)]
                if issubclass(TRAINER_REGISTRY.get(name), ClipPromptTrainer):
                    reads.append(layout.path("prec"))
                return sorted(reads)
    return []


def compared_config(cfg, args) -> dict:
    """What a run's numbers may depend on: the resolved config, flattened, and the train.py flags
    that are not config keys (which checkpoint an evaluation loads)."""
    flat = record.flatten(cfg)
    flat.update({"--eval-only": bool(args.eval_only), "--model-dir": args.model_dir or "",
                 "--load-epoch": args.load_epoch, "--no-train": bool(args.no_train)})
    return flat


def resolved_config(argv) -> dict:
    """compared_config of a train.py command line (vlprompt.run compares a finished run with it)."""
    args = build_parser().parse_args(list(argv))
    return compared_config(setup_cfg(args), args)


def check_record(cfg, args):
    """The record of the run already in the output folder (None if there is none, or --restart
    discards it); a run made with other options is refused, naming the keys that differ."""
    folder, previous = cfg.OUTPUT_DIR, record.read(cfg.OUTPUT_DIR)
    kind = "test" if args.eval_only else "train"
    if args.restart or previous is None or not record.has_progress(folder, kind):
        return None, None  # nothing a run with these options would be mixed with
    changes = record.compare(previous, compared_config(cfg, args))
    if changes.relevant:
        raise record.refusal(folder, changes, finished(folder, kind))
    return previous, changes


def discard_run(folder: str) -> None:
    """--restart: the earlier run's files go (the lock this process holds stays)."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name != ".lock":
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def write_record(cfg, args, trainer) -> None:
    """The run's record (vlprompt/experiments/record.py), written when it starts."""
    settings_from = getattr(type(trainer), "settings_from", None)
    dm = trainer.dm
    train = dm.dataset.train_x or []
    per_class = {}
    for item in train:
        per_class[item.label] = per_class.get(item.label, 0) + 1
    record.write(cfg.OUTPUT_DIR, {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "request": record.request(sys.argv[1:]),
        "trainer": cfg.TRAINER.NAME,
        "reads": trainer_reads(cfg),
        "batch_independent_eval": bool(getattr(trainer, "batch_independent_eval", False)),
        "settings": asdict(settings_from(cfg)) if settings_from else None,
        "backbone": {"name": cfg.MODEL.BACKBONE.NAME, "path": cfg.MODEL.BACKBONE.PATH,
                     "fingerprint": getattr(trainer, "backbone_fingerprint", None)},
        "dataset": {"name": cfg.DATASET.NAME, "subsample_classes": cfg.DATASET.SUBSAMPLE_CLASSES,
                    "num_shots": cfg.DATASET.NUM_SHOTS, "seed": cfg.SEED, "classes": dm.num_classes,
                    "train_x": len(train), "val": len(dm.dataset.val or []), "test": len(dm.dataset.test or []),
                    "shots_used": min(per_class.values()) if per_class else None},
        "config": compared_config(cfg, args),
    })


def method_of(trainer_name: str):
    """The registered method a trainer name belongs to (its own name or a release alias), or None."""
    return next((spec for spec in methods() for name, _ in spec.trainer_names() if name == trainer_name), None)


def check_flags(args, cfg) -> None:
    """Flags that would otherwise succeed doing something else than asked."""
    spec = method_of(cfg.TRAINER.NAME)
    if args.eval_only and not args.model_dir and not cfg.MODEL.INIT_WEIGHTS and (spec is None or spec.trains):
        raise InvalidValue(f"--eval-only without --model-dir: {cfg.TRAINER.NAME} trains, so this would evaluate its "
                           f"untrained prompts. Give --model-dir <the training's output folder> (and --load-epoch N "
                           f"for another epoch than the last), or MODEL.INIT_WEIGHTS <checkpoint file>")
    if args.resume:
        saved = (glob.glob(os.path.join(args.resume, "*", "resume.pth.tar"))
                 + glob.glob(os.path.join(args.resume, "*", "checkpoint")))
        if not os.path.isdir(args.resume) or not saved:
            what = "no such folder" if not os.path.isdir(args.resume) else "no checkpoint in it (<name>/checkpoint)"
            raise InvalidValue(f"--resume {args.resume}: {what}, so training would start from scratch. Give the "
                               f"output folder of the run to continue, or leave --resume out (a rerun of the same "
                               f"command resumes its own --output-dir)")


def unread_trainer_keys(cfg):
    """TRAINER keys set to something else than their default that the running trainer does not
    read (another method's node, e.g. TRAINER.MAPLE.N_CTX on a HiCroPL run): they change nothing."""
    reads = set(trainer_reads(cfg)) | {"NAME"}
    defaults = record.flatten(extend_cfg(get_cfg_default()).TRAINER)
    return [key for key, value in record.flatten(cfg.TRAINER).items()
            if key not in reads and value != defaults.get(key)]


def unread_keys_warning(cfg) -> str:
    unread = unread_trainer_keys(cfg)
    if not unread:
        return ""
    own = sorted({key.split(".")[0] for key in trainer_reads(cfg) if "." in key})
    nodes = " and ".join(f"TRAINER.{node}" for node in own) or "its own node"
    return (f"warning: {', '.join('TRAINER.' + key for key in unread)} "
            f"{'is' if len(unread) == 1 else 'are'} not read by {cfg.TRAINER.NAME} and "
            f"{'changes' if len(unread) == 1 else 'change'} nothing: its options "
            f"are under {nodes} (python train.py --trainer {cfg.TRAINER.NAME} --help-config lists them)")


def check_output_folder(folder: str) -> None:
    """The run folder can be made and written (a part of the path that is a file, no permission)."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise OutputWriteError(f"cannot create the output folder {folder}: {err.strerror or err} (is a part of "
                               f"that path a file?). Choose another OUTPUT / --output-dir") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputWriteError(f"the output folder {folder} is not writable: choose another OUTPUT / --output-dir, "
                               f"or make it writable")


def interrupted_message(trainer, folder: str, eval_only: bool) -> str:
    """Ctrl-C: where the run stopped and how to go on, in one line."""
    if trainer is None:
        return f"Interrupted before the run in {folder} started; nothing to resume: rerun the same command"
    if eval_only:
        return f"Interrupted while evaluating into {folder}; rerunning the same command evaluates again"
    # the epoch running (0-based) = the epochs finished; before the loop, the epoch resumed after
    done = max(getattr(trainer, "epoch", 0) or 0, getattr(trainer, "start_epoch", 0) or 0)
    saved = (f"{'epoch 1 is' if done == 1 else f'epochs 1-{done} are'} saved; rerunning the same command "
             f"resumes after epoch {done}" if done else "no epoch finished; rerunning the same command starts over")
    return f"Interrupted during epoch {done + 1}/{trainer.max_epoch} in {folder}: {saved}"


def main(args):
    cfg = setup_cfg(args)
    trainer_class(cfg)  # fail fast: before the run folder, the logger, the data and the weights
    device.select_gpu(device.requested_device())
    check_flags(args, cfg)
    unread_warning = unread_keys_warning(cfg)
    previous, changes = check_record(cfg, args)  # before anything is written to the folder
    determinism = configure_determinism(cfg.DETERMINISTIC, on_cuda=cfg.USE_CUDA and torch.cuda.is_available())
    folder_existed = os.path.isdir(cfg.OUTPUT_DIR)
    RUNNING.clear()
    try:
        check_output_folder(cfg.OUTPUT_DIR)
        start_and_run(cfg, args, previous, changes, unread_warning, determinism)
    except KeyboardInterrupt:
        print(interrupted_message(RUNNING.get("trainer"), cfg.OUTPUT_DIR, args.eval_only), file=sys.stderr)
        sys.exit(130)
    finally:
        if not folder_existed and os.path.isdir(cfg.OUTPUT_DIR) and not os.listdir(cfg.OUTPUT_DIR):
            os.rmdir(cfg.OUTPUT_DIR)  # a failed start leaves no folder behind


RUNNING = {}  # the trainer of this process's run, for the Ctrl-C message


def start_and_run(cfg, args, previous, changes, unread_warning, determinism):
    """The run in its locked folder: the log, the record, the trainer, then training or evaluation."""
    with exclusive_folder(cfg.OUTPUT_DIR):
        try:
            restarted = args.restart and record.has_run(cfg.OUTPUT_DIR)
            if restarted:
                discard_run(cfg.OUTPUT_DIR)
            # a run with results or saved epochs but no record: started before runs were recorded
            unrecorded = (not restarted and record.read(cfg.OUTPUT_DIR) is None
                          and record.has_progress(cfg.OUTPUT_DIR, "test" if args.eval_only else "train"))
            if cfg.SEED >= 0:
                print(f"Setting fixed seed: {cfg.SEED}")
                set_random_seed(cfg.SEED)
            setup_logger(cfg.OUTPUT_DIR)
            if restarted:
                print(f"--restart: the earlier run in {cfg.OUTPUT_DIR} was discarded")
            if changes is not None and changes.harmless:
                print(changes.harmless_note())
            if unrecorded:
                print(f"note: {cfg.OUTPUT_DIR} holds a run started before runs were recorded (no "
                      f"{record.RECORD_FILE}): its options cannot be compared with these")
            if unread_warning:
                print(unread_warning)
            if determinism:
                print(determinism)
            print_args(args, cfg)
            print("Collecting env info ...")
            print(f"** System info **\n{collect_env_info()}\n")
            trainer = build_trainer(cfg)
            RUNNING["trainer"] = trainer
            if previous is not None:
                record.check_backbone(cfg.OUTPUT_DIR, previous, getattr(trainer, "backbone_fingerprint", None))
            elif not unrecorded:  # a new run, a restart, or a retry of a start that failed early
                write_record(cfg, args, trainer)
        except BaseException:
            close_log()
            raise
        if args.eval_only:
            trainer.load_model(args.model_dir, epoch=args.load_epoch)
            trainer.test()
        elif not args.no_train:
            trainer.train()


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
    parser.add_argument("--restart", action="store_true",
                        help="discard the run already in --output-dir (its logs, checkpoints and record) and "
                             "start over, instead of resuming it or refusing other options")
    parser.add_argument("--deterministic", action="store_true",
                        help="bitwise-reproducible GPU runs (deterministic algorithms, no cuDNN autotuning; "
                             "slower); the same as the config option DETERMINISTIC True")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER, help="modify config options from the command line")
    return parser


def quiet_when_the_reader_leaves(command):
    """A reader that stops early (`--help-config | head`) is not an error: no BrokenPipeError
    traceback, at once or when Python flushes stdout at exit."""
    def guarded(*args):
        try:
            result = command(*args)
            sys.stdout.flush()
            return result
        except BrokenPipeError:
            try:  # stdout is gone: point it at /dev/null so the flush at exit has nowhere to fail
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
                pass
            sys.exit(0)
    return guarded


@report_user_errors
def cli():
    args = build_parser().parse_args()
    if args.help_config:
        return quiet_when_the_reader_leaves(print_config_help)(args.trainer)
    return main(args)


if __name__ == "__main__":
    cli()
