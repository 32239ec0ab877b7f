"""One descriptor per method, the single source of truth about it.

A method module calls `register_method(...)` once, next to its model and settings:

    register_method("CoOp", settings=CoOpSettings, model=CoOp, checkpoint_folder="prompt_learner",
                    default_configs={"base2new": "vit_b16_ep10_ctxv1", "fewshot": "vit_b16_ep50"})

From that descriptor the Dassl side makes the trainer (`--trainer CoOp`) and its config node
(TRAINER.COOP.*, generated from the settings' fields); the task scripts, the run entry point,
the sweep and the report read the method's name, default configs and script folder from here.

Every module of this package is imported on first use of the registry, so a new method is a new
file here. Methods kept elsewhere are loaded from VLPROMPT_PLUGINS (module names or .py paths,
separated by ':'), in every process that runs (train.py, vlprompt.run, the sweep, the report).
"""
import importlib
import importlib.util
import os
import pkgutil
import sys
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

from .settings import BackboneShape, closest
from ..errors import UserError

TASKS = ("base2new", "xd", "fewshot", "train")  # task families a default config can be named for
PLUGINS_VARIABLE = "VLPROMPT_PLUGINS"


@dataclass(frozen=True)
class ClassTexts:
    """Where a method's frozen class text features come from: prompt `templates` ("{}" is the
    class name), or the dataset's class descriptions when `descriptions` is set and a
    descriptions file exists (the templates otherwise). `normalize_each` False averages the
    texts' raw features before normalising (PromptSRC's recipe) instead of their normalised ones;
    `keep_each` True keeps every text's normalised feature ([C, T, E], CoPrompt's: it picks one
    text per step) instead of their mean."""
    templates: Tuple[str, ...]
    descriptions: bool = False
    normalize_each: bool = True
    keep_each: bool = False


@dataclass(frozen=True)
class ReleaseCheckpoint:
    """How the method's official release saved its weights: `recognizes(keys)` tells a release
    state dict from ours, `convert(state_dict)` gives our trainable state dict."""
    recognizes: Callable[[Iterable[str]], bool]
    convert: Callable[[Dict[str, Any]], Dict[str, Any]]


def keys_under(*prefixes: str) -> Callable[[Iterable[str]], bool]:
    """A `recognizes` for ReleaseCheckpoint: some key starts with one of `prefixes` (DataParallel's
    "module." in front or not). The releases that save their whole CustomCLIP keep what they learn
    under "prompt_learner."; our checkpoints hold the prompt learner's own names."""
    wanted = tuple(prefixes) + tuple(f"module.{p}" for p in prefixes)
    return lambda keys: any(key.startswith(wanted) for key in keys)


def without_data_parallel(key: str) -> str:
    """A state-dict key without DataParallel's "module." in front."""
    return key[len("module."):] if key.startswith("module.") else key


def entries_under(release_state: Dict[str, Any], prefix: str = "prompt_learner.") -> Iterator[Tuple[str, Any]]:
    """(name below `prefix`, value) of a release's state dict, with or without DataParallel's
    prefix; the other entries (frozen CLIP, logit_scale) are left out."""
    for key, value in release_state.items():
        key = without_data_parallel(key)
        if key.startswith(prefix):
            yield key[len(prefix):], value


@dataclass(frozen=True)
class ConfigLayout:
    """Where a trainer reads its settings in the config, under TRAINER: by default one node named
    after the trainer holding one key per settings field (TRAINER.HICROPL.N_CTX). A release may
    read another node (KgCoOp and TCP read CoOp's TRAINER.COOP), a mixed-case one
    (TRAINER.CoPrompt), keys outside its node (CoPrompt's TRAINER.W), or legacy values (KgCoOp's
    CTX_INIT: True for "the dataset's template"): saying so here lets the release's YAML files
    and command lines run unchanged. Several trainers may share a node; see `shared_defaults`."""
    node: str = ""  # node under TRAINER ("" = the trainer's name upper-cased)
    keys: Mapping[str, str] = field(default_factory=dict)  # field -> path under TRAINER ("COOP.W", "W")
    overrides: Mapping[str, Any] = field(default_factory=dict)  # field -> default replacing the settings'
    # field -> f(value, dataset name): a release's legacy value as ours (applied to set values only)
    legacy: Mapping[str, Callable[[Any, str], Any]] = field(default_factory=dict)
    prec: str = ""  # path of PREC under TRAINER ("" = <node>.PREC)
    # field -> f(dataset name): its default where the key is unset, for defaults that depend on the
    # dataset (TCP's per-dataset class prompt words); such keys are None in the yacs node
    per_dataset: Mapping[str, Callable[[str], Any]] = field(default_factory=dict)
    # Dassl dataset name -> {full config key: value}: a release's per-dataset config (CoPrompt's
    # trainers/constants.py), merged by train.py over the config files, below the command line
    dataset_config: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def named(self, trainer: str) -> "ConfigLayout":
        """This layout with its node filled in for `trainer`."""
        return self if self.node else replace(self, node=trainer.upper())

    def path(self, setting: str) -> str:
        """The path of a settings field (or "prec") under TRAINER, e.g. COOP.N_CTX."""
        if setting == "prec":
            return self.prec or f"{self.node}.PREC"
        return self.keys.get(setting, f"{self.node}.{setting.upper()}")

    def default(self, setting: str, settings_type: type) -> Any:
        if setting in self.overrides:
            return self.overrides[setting]
        return next(f.default for f in fields(settings_type) if f.name == setting)

    def read(self, trainer_node: Mapping[str, Any], settings_type: type, dataset: str = "") -> Dict[str, Any]:
        """{field: value} from the config's TRAINER node: the overrides, then every key that is set
        (None means "this trainer's default", the dataset's for `per_dataset` fields), legacy values
        converted."""
        values = {**self.overrides, **{name: default(dataset) for name, default in self.per_dataset.items()}}
        for f in fields(settings_type):
            value = lookup(trainer_node, self.path(f.name))
            if value is None:
                continue
            values[f.name] = self.legacy[f.name](value, dataset) if f.name in self.legacy else value
        return values


def lookup(node: Mapping[str, Any], path: str, missing: Any = None) -> Any:
    """node["A"]["B"] for path "A.B", or `missing`."""
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return missing
        node = node[part]
    return node


def shared_defaults(claims: Mapping[str, List[Tuple[Any, bool]]]) -> Dict[str, Any]:
    """The value of each config key from the trainers that read it ({path: [(default, has legacy
    converter)]}): their common default, or None (every trainer then applies its own default)
    where they disagree on the value or its type, or where a legacy converter must accept values
    of another type (yacs lets a None key take any type and refuses a bool on a str key)."""
    chosen = {}
    for path, defaults_and_legacy in claims.items():
        first = defaults_and_legacy[0][0]
        agree = all(type(value) is type(first) and value == first and not legacy
                    for value, legacy in defaults_and_legacy)
        chosen[path] = first if agree else None
    return chosen


@dataclass(frozen=True)
class MethodSpec:
    name: str  # trainer name (--trainer, TRAINER.NAME) and configs/trainers/<name>/
    settings: type  # dataclass of hyper-parameters (settings.option fields)
    # model(clip_model, settings, classnames, frozen_text_features) -> a PromptModel
    model: Optional[Callable[..., Any]] = None
    checkpoint_folder: str = "prompt_learner"  # folder of the checkpoints in a run's output
    default_configs: Mapping[str, str] = field(default_factory=dict)  # task -> config name or .yaml path
    node: str = ""  # config node under TRAINER (default: the upper-cased name); or a whole `layout`
    layout: Optional[ConfigLayout] = None  # where its settings are in the config (default: node)
    # release trainer name -> its ConfigLayout, or just the defaults that differ ({field: value})
    release_names: Mapping[str, Any] = field(default_factory=dict)
    # (settings, Dassl dataset name) -> the texts of its frozen class features, or None
    class_texts: Optional[Callable[[Any, str], Optional[ClassTexts]]] = None
    release_checkpoint: Optional[ReleaseCheckpoint] = None
    trains: bool = True  # False: evaluation only (zero-shot CLIP)
    scripts: str = ""  # scripts/<folder>/ (default: the lower-cased name)
    doc: str = ""  # docs/<file> describing the method
    # (settings, backbone shape) -> None, raising settings.ConfigError for a backbone it cannot use
    validate: Optional[Callable[[Any, BackboneShape], None]] = None

    @property
    def scripts_folder(self) -> str:
        return self.scripts or self.name.lower()

    def config_for(self, task: str) -> str:
        """The default config of a task (dg runs use the cross-dataset config)."""
        family = "xd" if task == "dg" else task
        if family not in self.default_configs:
            raise KeyError(f"{self.name} has no {task} task (its tasks: {', '.join(self.default_configs)})")
        return self.default_configs[family]

    def trainer_names(self) -> List[Tuple[str, ConfigLayout]]:
        """(trainer name, its config layout): the method's own name and its release's names."""
        own = (self.layout or ConfigLayout(node=self.node)).named(self.name)
        aliases = [(alias, (layout if isinstance(layout, ConfigLayout) else ConfigLayout(overrides=layout)).named(alias))
                   for alias, layout in self.release_names.items()]
        return [(self.name, own)] + aliases


_METHODS: Dict[str, MethodSpec] = {}
_LISTENERS: List[Callable[[MethodSpec], None]] = []
_DISCOVERED = False


def register_method(name: str, settings: type, **details) -> MethodSpec:
    """Wire a method in: the one call a method module makes. See MethodSpec for the details."""
    unknown = set(details) - set(MethodSpec.__dataclass_fields__)
    if unknown:
        raise TypeError(f"register_method({name!r}): unknown argument(s) {sorted(unknown)}")
    spec = MethodSpec(name=name, settings=settings, **details)
    unknown_tasks = set(spec.default_configs) - set(TASKS)
    if unknown_tasks:
        raise ValueError(f"{name}: default_configs for unknown task(s) {sorted(unknown_tasks)}; tasks: {TASKS}")
    taken = {trainer for other in _METHODS.values() for trainer, _ in other.trainer_names()}
    clash = taken & {trainer for trainer, _ in spec.trainer_names()}
    if clash:
        raise ValueError(f"trainer name(s) {sorted(clash)} already registered")
    _METHODS[name] = spec
    for listener in _LISTENERS:
        listener(spec)
    return spec


def on_register(listener: Callable[[MethodSpec], None]) -> None:
    """Call `listener` for every method registered so far and every one registered later."""
    _LISTENERS.append(listener)
    for spec in methods():
        listener(spec)


def methods() -> List[MethodSpec]:
    _discover()
    return list(_METHODS.values())


def get_method(name: str) -> MethodSpec:
    """The method registered under `name`, or one of its release's trainer names."""
    for spec in methods():
        if name in [trainer for trainer, _ in spec.trainer_names()]:
            return spec
    known = sorted(trainer for spec in methods() for trainer, _ in spec.trainer_names())
    hint = closest(name, known)
    raise KeyError(f"no method {name!r}" + (f" (did you mean {' or '.join(hint)}?)" if hint else "")
                   + f"; registered: {', '.join(known)}")


# The rows of HiCroPL's base-to-new table (ICCV 2025, Table 1), in its order: (label, trainer)
PAPER_METHODS = (("CLIP", "ZeroshotCLIP"), ("CoOp", "CoOp"), ("CoCoOp", "CoCoOp"), ("KgCoOp", "KgCoOp"),
                 ("MaPLe", "MaPLe"), ("PromptSRC", "PromptSRC"), ("TCP", "TCP"), ("MMA", "MMA"),
                 ("CoPrompt", "CoPrompt"), ("HiCroPL", "HiCroPL"))


def prompt_methods(task: str = "base2new") -> List[MethodSpec]:
    """Every registered method with a `task` recipe that adapts CLIP to class names (not EdgeCNN's
    fixed-label classifier): the paper's rows first, in its order, then the others."""
    paper = [trainer for _, trainer in PAPER_METHODS]
    found = [spec for spec in methods() if "train" not in spec.default_configs and
             (task == "dg" and "xd" in spec.default_configs or task in spec.default_configs)]
    return sorted(found, key=lambda spec: paper.index(spec.name) if spec.name in paper else len(paper))


def method_for_scripts(folder: str) -> MethodSpec:
    for spec in methods():
        if spec.scripts_folder == folder:
            return spec
    raise KeyError(f"no method uses scripts/{folder}/")


def _discover() -> None:
    """Import every module of this package (each registers its method) and the plugins."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    package = __name__.rsplit(".", 1)[0]
    for module in pkgutil.iter_modules(sys.modules[package].__path__):
        importlib.import_module(f"{package}.{module.name}")
    load_plugins()


def load_plugins(value: Optional[str] = None) -> None:
    """Import the modules named in VLPROMPT_PLUGINS (or `value`): dotted names or .py files. A
    file already imported under another name (a test module that registers a method, say) is
    not imported twice."""
    value = os.environ.get(PLUGINS_VARIABLE, "") if value is None else value
    for entry in filter(None, value.split(os.pathsep)):
        if not entry.endswith(".py"):
            importlib.import_module(entry)
            continue
        path = os.path.realpath(entry)
        if any(os.path.realpath(getattr(m, "__file__", None) or "") == path for m in list(sys.modules.values())):
            continue
        if not os.path.isfile(path):
            raise UserError(f"{PLUGINS_VARIABLE}: {entry} is not a file")
        if os.path.dirname(path) not in sys.path:  # as `python file.py` does: its neighbours import
            sys.path.append(os.path.dirname(path))
        name = "vlprompt_plugin_" + os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
