"""A method adds its release fixture from its own files (issue 18): a description
`<method>_release.py` found by pattern makes `<method>.pt` through the generic worker, and the
shared release tests find the fixture by pattern. Here with a tiny CoOp-like "release" written in
tmp_path and a description in another folder, no shared file edited."""
import hashlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, requires_dassl
from helpers import FIXTURE_DIR, clip_fixture_methods, fixture_methods, generator, load_fixture, write

MAKE_FIXTURES = os.path.join(FIXTURE_DIR, "make_fixtures.py")

# The release's own code, as a method's release ships it: train.py with extend_cfg, a trainers
# package registering a Dassl TrainerX. It builds CLIP with the installed `clip` package (a real
# release vendors its own), through the `clip._download` that the generator redirects.
FAKE_TRAIN = '''
from yacs.config import CfgNode as CN

import trainers.fake  # registers the trainer, as the releases' train.py do


def extend_cfg(cfg):
    cfg.TRAINER.FAKE = CN()
    cfg.TRAINER.FAKE.N_CTX = 16
    cfg.TRAINER.FAKE.PREC = "fp16"
'''
FAKE_TRAINER = '''
import torch
import torch.nn as nn
from clip import clip
from dassl.engine import TRAINER_REGISTRY, TrainerX
from dassl.optim import build_lr_scheduler, build_optimizer
from torch.nn import functional as F


def load_clip_to_cpu(cfg):
    path = clip._download(clip._MODELS[cfg.MODEL.BACKBONE.NAME], "unused")
    return clip.build_model(torch.load(path, map_location="cpu"))


class PromptLearner(nn.Module):
    def __init__(self, cfg, classnames, clip_model):
        super().__init__()
        n_ctx = cfg.TRAINER.FAKE.N_CTX
        prompt_prefix = " ".join(["X"] * n_ctx)
        prompts = [prompt_prefix + " " + name.replace("_", " ") + "." for name in classnames]
        tokenized_prompts = torch.cat([clip.tokenize(p) for p in prompts])
        with torch.no_grad():
            embedding = clip_model.token_embedding(tokenized_prompts).type(clip_model.dtype)
        self.ctx = nn.Parameter(0.02 * torch.randn(n_ctx, embedding.shape[-1], dtype=clip_model.dtype))
        self.register_buffer("token_prefix", embedding[:, :1])
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:])
        self.n_ctx, self.tokenized_prompts = n_ctx, tokenized_prompts  # no name_lens: optional

    def forward(self):
        ctx = self.ctx.unsqueeze(0).expand(self.token_prefix.shape[0], -1, -1)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)


class CustomCLIP(nn.Module):
    def __init__(self, cfg, classnames, clip_model):
        super().__init__()
        self.prompt_learner = PromptLearner(cfg, classnames, clip_model)
        self.clip_model = clip_model

    def encode_text(self, prompts, tokenized_prompts):
        c = self.clip_model
        x = prompts + c.positional_embedding.type(c.dtype)
        x = c.ln_final(c.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)).type(c.dtype)
        return x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ c.text_projection

    def forward(self, image):
        image_features = self.clip_model.visual(image.type(self.clip_model.dtype))
        text_features = self.encode_text(self.prompt_learner(), self.prompt_learner.tokenized_prompts)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        logits = self.clip_model.logit_scale.exp() * image_features @ text_features.t()
        return logits


@TRAINER_REGISTRY.register()
class Fake(TrainerX):
    def build_model(self):
        cfg = self.cfg
        clip_model = load_clip_to_cpu(cfg)
        if cfg.TRAINER.FAKE.PREC == "fp32":
            clip_model.float()
        self.model = CustomCLIP(cfg, self.dm.dataset.classnames, clip_model)
        for name, param in self.model.named_parameters():
            param.requires_grad_("prompt_learner" in name)
        self.optim = build_optimizer(self.model.prompt_learner, cfg.OPTIM)
        self.sched = build_lr_scheduler(self.optim, cfg.OPTIM)
        self.register_model("prompt_learner", self.model.prompt_learner, self.optim, self.sched)

    def forward_backward(self, batch):
        logits = self.model(batch["img"])
        loss = F.cross_entropy(logits, batch["label"])
        self.model_backward_and_update(loss)
        return {"loss": loss.item()}
'''
FAKE_CONFIG = '''
OPTIM:
  NAME: "sgd"
  LR: 0.002
  MAX_EPOCH: 2
TRAINER:
  FAKE:
    N_CTX: 16
'''
# The method's description, in its own folder: nothing of the shared generator is edited.
FAKE_DESCRIPTION = '''
from make_fixtures import ReleaseDescription, case

RELEASE = ReleaseDescription(
    method="fake", repository="example/fake-release", commit="0123456789abcdef0123456789abcdef01234567",
    folder="fake", files=["train.py", "trainers/fake.py"], node="FAKE",
    prompt_learner=("trainers.fake", "PromptLearner"), shadowed=("train", "trainers", "trainers.fake"),
    cases=[case("n_ctx4", "Fake", "configs/trainers/Fake/tiny.yaml", ["TRAINER.FAKE.N_CTX", "4"])])
'''


def make_fixtures(*args, expect_ok=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, MAKE_FIXTURES, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert (done.returncode == 0) == expect_ok, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture
def fake_release(tmp_path):
    checkout = tmp_path / "checkout"
    write(checkout / "fake" / "train.py", FAKE_TRAIN)
    write(checkout / "fake" / "trainers" / "__init__.py", "")
    write(checkout / "fake" / "trainers" / "fake.py", FAKE_TRAINER)
    write(checkout / "fake" / "configs" / "trainers" / "Fake" / "tiny.yaml", FAKE_CONFIG)
    descriptions = tmp_path / "descriptions"
    write(descriptions / "fake_release.py", FAKE_DESCRIPTION)
    return checkout, descriptions


@requires_dassl
def test_a_release_fixture_is_made_and_found_from_the_methods_own_files(fake_release, tmp_path):
    checkout, descriptions = fake_release
    out = tmp_path / "out"
    make_fixtures("--descriptions", str(descriptions), "--release", f"fake={checkout}", "--only", "fake",
                  "--out", str(out))

    assert sorted(os.listdir(out)) == ["fake.pt"]
    fixture = torch.load(out / "fake.pt", weights_only=True)
    assert fixture["method"] == "fake" and fixture["release"] == "example/fake-release"
    assert fixture["release_commit"] == "0123456789abcdef0123456789abcdef01234567"
    for name in ("train.py", "trainers/fake.py"):  # hashed relative to the description's folder
        assert fixture["source_sha256"][name] == hashlib.sha256((checkout / "fake" / name).read_bytes()).hexdigest()
    assert fixture["module_origins"] == {"train": "train.py", "trainers": "trainers/__init__.py",
                                         "trainers.fake": "trainers/fake.py"}
    assert torch.equal(fixture["inputs"]["images"], generator().fixture_images())

    case = fixture["cases"]["n_ctx4"]
    assert case["config"]["N_CTX"] == 4 and case["config"]["PREC"] == "fp32"
    assert case["registered_model"] == "prompt_learner"
    assert case["prompts"][2] == "X X X X golden retriever." and case["n_ctx"] == 4
    assert case["tokenized_prompts"].shape == (6, 77) and "name_lens" not in case
    assert torch.equal(case["trainable_state"]["ctx"], generator().seeded_normal("ctx", (4, 512)))
    assert case["unpatched_check"] == "identical to as_shipped" and case["fp32_fixes"] == []
    assert case["checkpoint_fp32"]["folders"] == case["checkpoint_fp16"]["folders"] == ["prompt_learner"]
    result = case["results"]["as_shipped"]
    assert result is case["results"]["no_casts"] and result["cast_sites"] == {}  # it casts nothing
    assert result["eval_logits"].shape == result["train_logits"].shape == (4, 6)
    assert result["image_features"].shape == (4, 512) and result["text_features"].shape == (6, 512)
    expected = F.cross_entropy(result["train_logits"], fixture["inputs"]["labels"])
    assert abs(float(expected) - float(result["loss"])) < 1e-6
    assert result["grads"]["nonzero"] == ["ctx"] and result["grads"]["values"]["ctx"].shape == (4, 512)

    # the shared tests' discovery finds it by pattern, as one whose cases hold numbers
    assert fixture_methods(str(out)) == clip_fixture_methods(str(out)) == ("fake",)
    assert load_fixture("fake", str(out))["cases"]["n_ctx4"]["n_ctx"] == 4
    assert {"coop", "cmpa", "edgecnn"} <= set(fixture_methods()) and "cmpa" not in clip_fixture_methods()


def test_descriptions_are_listed_and_mistakes_say_what_to_pass(fake_release, tmp_path):
    checkout, descriptions = fake_release
    listed = make_fixtures("--list", "--descriptions", str(descriptions)).stdout
    assert "fake: example/fake-release @ 0123456789abcdef" in listed
    assert "coop (group maple): muzairkhattak/multimodal-prompt-learning" in listed
    done = make_fixtures("--release", f"nosuch={checkout}", "--out", str(tmp_path), expect_ok=False)
    assert done.returncode == 2 and "no release description names 'nosuch'" in done.stderr
    assert "nosuch_release.py" in done.stderr
    done = make_fixtures("--descriptions", str(descriptions), "--only", "fake", "--out", str(tmp_path),
                         expect_ok=False)
    assert done.returncode == 2 and "--release fake=PATH" in done.stderr
    write(descriptions / "broken_release.py", "NOTHING = 1\n")
    done = make_fixtures("--list", "--descriptions", str(descriptions), expect_ok=False)
    assert done.returncode == 2 and "broken_release.py defines neither RELEASE" in done.stderr
    assert not any(name.endswith(".pt") for name in os.listdir(tmp_path))  # nothing was made
