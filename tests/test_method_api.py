"""Adding a method is one registration call: a toy prompt method defined in this file runs
base-to-new training and new-class testing through vlprompt.run (train.py loads this file as a
plugin), appears in a sweep dry run and is read back by the report, with no file of the repo
changed."""
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import pytest
import torch
from torch import Tensor, nn

from conftest import ROOT, requires_dassl
from vlprompt.methods.base import PromptedCLIPClassifier
from vlprompt.methods.common import MAX_CONTEXT_TOKENS
from vlprompt.methods.registry import ConfigLayout, register_method
from vlprompt.methods.settings import option

DEMO_RECIPE = os.path.join(ROOT, "configs", "trainers", "HiCroPL", "demo_tiny_clip.yaml")  # any YAML will do


@dataclass(frozen=True)
class ToyPromptSettings:
    n_ctx: int = option(4, "learned context tokens before the class name", low=1, high=MAX_CONTEXT_TOKENS)
    ctx_init: str = option("", "words the context starts from")


class ToyPrompt(PromptedCLIPClassifier):
    """CoOp in a dozen lines: a learned first-layer text context; frozen image features."""

    uses_frozen_image_features = True

    def __init__(self, clip_model: nn.Module, settings: ToyPromptSettings, classnames: Sequence[str],
                 frozen_text_features: Optional[Tensor] = None):
        super().__init__(clip_model, settings.n_ctx, settings.ctx_init, classnames)
        start = self.first_context if self.first_context is not None else \
            torch.randn(settings.n_ctx, self.text_encoder.width) * 0.02
        self.prompt_learner = nn.ParameterDict({"context": nn.Parameter(start)})

    def encode_classes(self) -> Tensor:
        return self.text_encoder(self.token_ids, [self.prompt_learner["context"]])

    def classify(self, images, text_features, frozen_image_features=None):
        image = self.frozen_image_features(images) if frozen_image_features is None else frozen_image_features
        return self.logits(image, text_features)


register_method("ToyPrompt", settings=ToyPromptSettings, model=ToyPrompt, default_configs={"base2new": DEMO_RECIPE})


# A release that reads another method's node, as KgCoOp reads CoOp's TRAINER.COOP: ToyPrompt's
# TRAINER.TOYPROMPT with a key of its own (W), a key outside the node (TRAINER.TOYDISTILL), another
# default for N_CTX, and a legacy value (CTX_INIT: True = "the dataset's template words").
@dataclass(frozen=True)
class ToyRegularisedSettings:
    n_ctx: int = option(8, "learned context tokens", low=1, high=MAX_CONTEXT_TOKENS)
    ctx_init: str = option("", "words the context starts from")
    w: float = option(8.0, "weight of the regulariser", low=0)
    distill: str = option("cosine", "distance", choices=("cosine", "l1"))


def legacy_ctx_init(value, dataset: str) -> str:
    return {True: f"a photo of {dataset}", False: ""}.get(value, value) if isinstance(value, bool) else value


class ToyRegularised(ToyPrompt):
    pass


register_method("ToyRegularised", settings=ToyRegularisedSettings, model=ToyRegularised,
                layout=ConfigLayout(node="TOYPROMPT", keys={"distill": "TOYDISTILL"},
                                    legacy={"ctx_init": legacy_ctx_init}),
                default_configs={"base2new": DEMO_RECIPE})


def repo_state():
    proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                          capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def vlprompt_run(env, *args):
    proc = subprocess.run([sys.executable, "-m", "vlprompt.run", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@requires_dassl
def test_a_method_registered_in_a_test_file_runs_sweeps_and_reports(workspace, tmp_path, capsys):
    from vlprompt.experiments import sweep
    from vlprompt.experiments.report import report
    before = repo_state()
    output = tmp_path / "output"
    env = dict(os.environ, DATA=str(workspace / "data"), OUTPUT=str(output), VLPROMPT_PLUGINS=os.path.abspath(__file__),
               VLPROMPT_CACHE=str(tmp_path / "cache"), PYTHONWARNINGS="ignore")
    options = ["MODEL.BACKBONE.PATH", str(workspace / "tiny_clip.pt"), "OPTIM.MAX_EPOCH", "2",
               "TRAINER.TOYPROMPT.PREC", "fp32"]
    trained = vlprompt_run(env, "base2new_train", "ToyPrompt", "caltech101", "1", *options)
    assert "ToyPrompt: ToyPromptSettings(n_ctx=4, ctx_init='')" in trained and "Finish training" in trained
    tested = vlprompt_run(env, "base2new_test", "ToyPrompt", "caltech101", "1", *options)
    assert "* accuracy:" in tested and "SUBSAMPLE_CLASSES: new" in tested
    run_dir = output / "base2new/train_base/caltech101/shots_16/ToyPrompt/demo_tiny_clip/seed1"
    checkpoint = torch.load(run_dir / "prompt_learner" / "model.pth.tar-2", weights_only=True)
    assert list(checkpoint["state_dict"]) == ["context"]

    assert sweep.main(["--task", "base2new", "--trainer", "ToyPrompt", "--datasets", "caltech101", "--seeds", "1", "2",
                       "--data", str(workspace / "data"), "--output", str(output), "--dry-run"]) == 0
    listed = capsys.readouterr().out  # without the options the runs were made with: not finished for the sweep
    assert "4 runs, 0 finished already, 4 to run" in listed and "finished with other options" in listed
    assert sweep.main(["--task", "base2new", "--trainer", "ToyPrompt", "--datasets", "caltech101", "--seeds", "1", "2",
                       "--data", str(workspace / "data"), "--output", str(output), "--dry-run", "--", *options]) == 0
    listed = capsys.readouterr().out
    assert "4 runs, 2 finished already, 2 to run" in listed
    assert "-m vlprompt.run base2new_train ToyPrompt caltech101 2" in listed

    result = report("base2new", ["ToyPrompt"], str(output), ["caltech101"], seeds=[1], out=str(tmp_path / "report"),
                    echo=lambda *_: None)
    assert result.rows[0].datasets["caltech101"].complete
    assert (tmp_path / "report" / "base2new.md").read_text().count("ToyPrompt") >= 2
    assert repo_state() == before  # nothing in the repository was written or changed


def test_the_config_node_is_generated_from_the_settings():
    pytest.importorskip("dassl")
    from dassl.config import get_cfg_default
    import trainers  # noqa: F401  (the trainers of every registered method, ToyPrompt's included)
    from dassl.engine import TRAINER_REGISTRY
    from trainers.config import extend_cfg
    node = extend_cfg(get_cfg_default()).TRAINER.TOYPROMPT
    # N_CTX: the two methods sharing the node disagree (4, 8); CTX_INIT has a legacy converter:
    # None in the node, each trainer applies its own default
    assert dict(node) == {"N_CTX": None, "CTX_INIT": None, "W": 8.0, "PREC": "fp16"}
    assert "ToyPrompt" in TRAINER_REGISTRY.registered_names()


def settings_for(trainer, *options, config_text=None, tmp_path=None):
    """The settings `trainer` reads from a config built as train.py builds it."""
    pytest.importorskip("dassl")
    import train
    from dassl.engine import TRAINER_REGISTRY
    argv = ["--trainer", trainer, "--dataset-config-file", os.path.join(ROOT, "configs/datasets/caltech101.yaml")]
    if config_text is not None:
        (tmp_path / "release.yaml").write_text(config_text)
        argv += ["--config-file", str(tmp_path / "release.yaml")]
    cfg = train.setup_cfg(train.build_parser().parse_args(argv + list(options)))
    return TRAINER_REGISTRY.get(trainer).settings_from(cfg)


def test_a_release_node_shared_with_another_method_serves_both(tmp_path):
    """The second method's release YAML (legacy bool CTX_INIT) and release-style command line run
    unchanged; the first method's keys and defaults are untouched by the sharing."""
    assert settings_for("ToyPrompt") == ToyPromptSettings(n_ctx=4, ctx_init="")
    assert settings_for("ToyRegularised") == ToyRegularisedSettings(n_ctx=8, ctx_init="", w=8.0, distill="cosine")
    release_yaml = "TRAINER:\n  TOYPROMPT:\n    CTX_INIT: True\n  TOYDISTILL: l1\n"
    assert settings_for("ToyRegularised", "TRAINER.TOYPROMPT.W", "1.0", "TRAINER.TOYPROMPT.N_CTX", "4",
                        config_text=release_yaml, tmp_path=tmp_path) == ToyRegularisedSettings(
        n_ctx=4, ctx_init="a photo of Caltech101", w=1.0, distill="l1")
    assert settings_for("ToyPrompt", "TRAINER.TOYPROMPT.CTX_INIT", "a photo of a") == ToyPromptSettings(
        n_ctx=4, ctx_init="a photo of a")


def test_a_shared_key_is_checked_and_named_by_its_real_path(tmp_path):
    from vlprompt.errors import UserError
    with pytest.raises(UserError, match=r"TRAINER\.TOYDISTILL='euclid' is invalid: must be one of"):
        settings_for("ToyRegularised", "TRAINER.TOYDISTILL", "euclid")
    with pytest.raises(UserError, match=r"TRAINER\.TOYPROMPT\.CTX_INIT=True is invalid: expected str"):
        settings_for("ToyPrompt", "TRAINER.TOYPROMPT.CTX_INIT", "True")  # no legacy converter for ToyPrompt


def test_a_second_registration_under_a_taken_name_is_refused():
    with pytest.raises(ValueError, match=r"trainer name\(s\) \['ToyPrompt'\] already registered"):
        register_method("ToyPrompt", settings=ToyPromptSettings, model=ToyPrompt)


def documented_example(monkeypatch):
    """The worked example of docs/adding_a_method.md, run as written; its registration is recorded
    here instead of changing this process's registry."""
    import re
    import vlprompt.methods.registry as registry
    text = open(os.path.join(ROOT, "docs", "adding_a_method.md")).read()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "class AnchoredCoOp" in b)
    registered = {}
    monkeypatch.setattr(registry, "register_method", lambda name, **details: registered.update(name=name, **details))
    namespace = {}
    exec(compile(block, "docs/adding_a_method.md", "exec"), namespace)
    return namespace, registered


def test_the_documented_regulariser_example_works(monkeypatch, tiny_clip):
    from vlprompt.methods.common import normalize
    namespace, registered = documented_example(monkeypatch)
    assert registered["name"] == "AnchoredCoOp" and registered["class_texts"](None, "Caltech101").templates
    classes = ["dog", "cat", "violin"]
    frozen = normalize(torch.randn(3, tiny_clip.text_projection.shape[1], generator=torch.Generator().manual_seed(0)))
    settings = namespace["AnchoredCoOpSettings"](n_ctx=4, w=2.0)
    torch.manual_seed(0)
    model = registered["model"](tiny_clip, settings, classes, frozen)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    loss, logits, parts = model.loss(images, labels)
    text = model.encode_classes().float()
    expected_pull = 1 - torch.nn.functional.cosine_similarity(text, frozen, dim=-1).mean()
    # the terms stay detached tensors: the trainer reads them at print steps, not at every step
    assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in parts.values())
    assert float(parts["pull"]) == pytest.approx(expected_pull.item(), abs=1e-6) and logits.shape == (2, 3)
    assert loss.item() == pytest.approx(float(parts["ce"]) + 2.0 * float(parts["pull"]), abs=1e-5)
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["prompt_learner.ctx"]
    # frozen features equal to the learned ones: no pull
    model.set_classes(classes, text.detach())
    assert float(model.loss(images, labels).parts["pull"]) == pytest.approx(0.0, abs=1e-6)
