"""Checkpoints of the CMPA release (DCP's release) load through --model-dir (issue 18, item 3).

The release's save_model writes its whole CustomCLIP (about 170 MB on the fixtures' 3-layer CLIP),
so tests/fixtures/cmpa_checkpoint/cmpa_checkpoint.pt keeps how to rebuild the file: the layout the
release wrote (keys, shapes, dtypes, optimizer and scheduler states), the seeded rule of its
trainable values and the release's eval logits for them (make_fixture.py and README.md there).
"""
import functools
import os
import sys

import pytest
import torch

from conftest import requires_dassl
from helpers import accuracies, generator, run

from vlprompt.files import CheckpointError, load_strict, read_checkpoint
from vlprompt.methods.dcp import DCP, DCPSettings, convert_release_state_dict, is_release_state_dict

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "cmpa_checkpoint",
                       "cmpa_checkpoint.pt")
PRECISIONS = ("checkpoint_fp32", "checkpoint_fp16")


def fixture() -> dict:
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


FIX = fixture()
CASES = sorted(FIX["cases"])


def seeded(case: dict) -> dict:
    return _seeded(next(name for name, c in FIX["cases"].items() if c is case))


@functools.lru_cache(maxsize=None)
def _seeded(name: str) -> dict:
    """The case's seeded trainable tensors (about 11M values: built once per test session)."""
    case = FIX["cases"][name]
    values = {}
    for key in case["seeded_keys"]:
        shape = next(s for k, s, _ in case["checkpoint_fp32"]["layout"]["state_dict"] if k == key)
        values[key] = generator().seeded_normal(key, shape)
        assert generator().sha256_of(values[key]) == case["seeded_sha256"][key], key
    return values


def stand_in(key: str, shape, dtype):
    """A module of a block the release never runs (PS False, beyond PROMPT_DEPTH or block 0): its
    initial values where PyTorch's initialisation is constant (LayerNorm 1 and 0, attention biases
    0), seeded values in place of its random initial weights (never used by the release)."""
    if ".ln_pa_" in key and key.endswith(".weight"):
        return torch.ones(shape, dtype=dtype)
    if ".ln_pa_" in key or key.endswith(("in_proj_bias", "out_proj.bias")):
        return torch.zeros(shape, dtype=dtype)
    return generator().seeded_normal(key, shape).to(dtype)


def release_state(case: dict, precision: str = "checkpoint_fp32") -> dict:
    """The state dict the release's save_model wrote, from its recorded layout: trainable tensors
    from the seeded rule in the recorded dtype (the fp16 run's are fp16), the tensors that shared
    a storage sharing one here, frozen CLIP and the class-bound buffers as zeros broadcast to
    their shape (never read: the frozen CLIP comes from MODEL.BACKBONE, the buffers from the
    class names) so the rebuilt file stays small."""
    layout = case[precision]["layout"]
    values = seeded(case)
    first = {key: group[0] for group in layout["shared_storage"] for key in group}
    initial = {block for block, at_init in layout["initial_values"].items() if at_init}
    state = {}
    for key, shape, dtype in layout["state_dict"]:
        dtype = getattr(torch, dtype)
        if first.get(key, key) in state:
            state[key] = state[first[key]]
        elif key in values:
            state[key] = values[key].to(dtype)
        elif ".prompt_attn." in key and key.split(".")[2] in initial:
            state[key] = stand_in(key, shape, dtype)
        else:
            state[key] = torch.zeros((), dtype=dtype).expand(shape)
    return state


def write_release_file(case: dict, run_dir, precision: str = "checkpoint_fp32") -> str:
    """The file as Dassl's save_model wrote it for the release: the state dict, the epoch, the
    optimizer state, the scheduler state with its pickled successor object (a CosineAnnealingLR,
    here over a one-tensor optimizer; the release's references the model's), the val_result, and
    the `checkpoint` pointer."""
    entry = case[precision]
    layout = entry["layout"]
    scheduler = dict(layout["scheduler"])
    successor = scheduler["successor"]
    assert successor["pickled_object"] == "torch.optim.lr_scheduler.CosineAnnealingLR"
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=case["optim"]["LR"])
    scheduler["successor"] = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(case["optim"]["MAX_EPOCH"]))
    scheduler["successor"].load_state_dict(successor["state"])
    checkpoint = {"state_dict": release_state(case, precision), "epoch": layout["epoch"],
                  "optimizer": layout["optimizer"], "scheduler": scheduler, "val_result": layout["val_result"]}
    assert list(checkpoint) == layout["top_level_keys"]
    folder = os.path.join(run_dir, entry["folder"])
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"model.pth.tar-{FIX['epoch']}")
    torch.save(checkpoint, path)
    with open(os.path.join(folder, "checkpoint"), "w") as handle:
        handle.write(f"model.pth.tar-{FIX['epoch']}\n")
    return path


def cmpa_settings(case: dict) -> DCPSettings:
    """Our settings for the release's TRAINER.CMPA node: its fusing, its text update that is never
    spliced in (the CMPA trainer name's defaults)."""
    config = case["config"]
    return DCPSettings(n_ctx=config["N_CTX"], ctx_init=config["CTX_INIT"], prompt_depth=config["PROMPT_DEPTH"],
                       ps=config["PS"], fusing=config["FUSING"], text_update=False)


# ---- the converter --------------------------------------------------------------------------
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", CASES)
def test_every_trainable_tensor_of_the_release_maps_onto_ours(release_clip, name, precision):
    case = FIX["cases"][name]
    state = release_state(case, precision)
    assert is_release_state_dict(state) and not is_release_state_dict({"cmpa.0.visual.proj.weight": 0})
    converted = convert_release_state_dict(state)
    parallel = convert_release_state_dict({f"module.{k}": v for k, v in state.items()})  # DataParallel's names
    assert set(parallel) == set(converted) and all(torch.equal(parallel[k], v) for k, v in converted.items())
    model = DCP(release_clip, cmpa_settings(case), FIX["inputs"]["classnames"])
    load_strict(model.prompt_learner, converted, name)  # exactly our keys and shapes, or it raises
    assert all(v.dtype == torch.float32 for v in converted.values())
    ours = {"prompt_learner.prompts_text": "text_context", "prompt_learner.prompts_visual": "visual_context"}
    modules = len(model.prompt_learner.cmpa)
    assert modules == (1 if case["config"]["PS"] else case["config"]["PROMPT_DEPTH"])
    for key, value in seeded(case).items():  # the release's trainable tensors, at their (rounded) values
        if key in ours:
            torch.testing.assert_close(converted[ours[key]], value.to(state[key].dtype).float(), rtol=0, atol=0)
            continue
        block = int(key.split(".")[2])
        assert block in (case["used_blocks"] if not case["config"]["PS"] else [0]), key
        index = 0 if case["config"]["PS"] else block - 1
        matches = [n for n in converted if n.startswith(f"cmpa.{index}.") and torch.equal(
            converted[n], value.to(state[key].dtype).float())]
        assert len(matches) == 1, key


def test_the_release_names_its_prompt_attention_as_the_converter_reads_it():
    """Every prompt_attn module name the release wrote has one of ours; the text and visual
    directions have the widths of their towers (the projections in particular)."""
    from vlprompt.methods.dcp import RELEASE_PARTS
    shapes = {k: s for k, s, _ in FIX["cases"]["shared"]["checkpoint_fp32"]["layout"]["state_dict"]}
    parts = {k.split(".")[4] for k in shapes if ".prompt_attn." in k}
    assert parts == set(RELEASE_PARTS)
    assert shapes["encoder.resblocks.1.prompt_attn.proj_t2v.weight"] == [768, 512]  # text -> visual: visual query
    assert shapes["encoder.resblocks.1.prompt_attn.proj_v2t.weight"] == [512, 768]


def test_per_layer_modules_the_release_never_runs_are_left_out():
    """PS False, depth 1 on 3 blocks: the release runs block 1's module only; blocks 0 and 2 keep
    their initial values in its file (recorded from the release's own file)."""
    case = FIX["cases"]["per_layer"]
    assert case["checkpoint_fp32"]["layout"]["initial_values"] == {"0": True, "1": False, "2": True}
    converted = convert_release_state_dict(release_state(case))
    assert {k.split(".")[1] for k in converted if k.startswith("cmpa.")} == {"0"}
    assert torch.equal(converted["cmpa.0.visual.proj.weight"],
                       generator().seeded_normal("encoder.resblocks.1.prompt_attn.proj_t2v.weight", (768, 512)))


def test_an_unknown_prompt_attention_key_is_refused():
    with pytest.raises(KeyError, match="encoder.resblocks.1.prompt_attn.gate.weight"):
        convert_release_state_dict({"encoder.resblocks.1.prompt_attn.gate.weight": torch.zeros(1)})


# ---- what the release computes from the same state ----------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_the_release_checkpoint_gives_the_releases_logits(release_clip, name):
    """Our CMPA model holding the converted file's state reproduces the release's eval logits on the
    fixtures' batch, as shipped: its one cast, `x_visual @ self.proj_visual.half()`
    (trainers/cmpa.py:99), rounds the visual projection through fp16, which clip's build_model
    does to ours when it builds CLIP (the release renamed it proj_visual, so its own
    convert_weights misses it). Without that cast its logits move by 1.5e-4."""
    case = FIX["cases"][name]
    model = DCP(release_clip, cmpa_settings(case), FIX["inputs"]["classnames"]).eval()
    load_strict(model.prompt_learner, convert_release_state_dict(release_state(case)), name)
    with torch.no_grad():
        logits = model(FIX["inputs"]["images"])
    shipped = case["results"]["as_shipped"]
    assert list(shipped["cast_sites"]) == ["trainers/cmpa.py:99"]
    assert (logits - shipped["eval_logits"]).abs().max() < 1e-5  # measured 7.7e-7 (of 0.96)
    assert (logits - case["results"]["no_casts"]["eval_logits"]).abs().max() > 1e-4


# ---- the load_strict message for another method's checkpoint -----------------------------------
def test_a_release_file_loaded_into_another_method_names_the_release(release_clip, tmp_path):
    from vlprompt.methods.maple import MaPLe, MaPLeSettings
    state = release_state(FIX["cases"]["shared"])
    maple = MaPLe(release_clip, MaPLeSettings(prompt_depth=2), ["apple"])
    source = str(tmp_path / "output" / "MultiModalPromptLearner" / "model.pth.tar-2")
    with pytest.raises(CheckpointError) as err:
        load_strict(maple.prompt_learner, state, source)
    message = str(err.value)
    assert message.startswith(f"{source} was not written for this model: none of its keys (")
    assert message.endswith("Its key names are those of the official CMPA release's checkpoints: run it with "
                            "--trainer CMPA (or DCP), which converts them.")
    assert "prompt length" not in message and "depth" not in message
    # outside its release folder, every method whose converter accepts the keys is named
    with pytest.raises(CheckpointError, match=r"accepted by the release-checkpoint conversion of .*"
                                              r"CMPA \(--trainer CMPA or DCP\)"):
        load_strict(maple.prompt_learner, state, str(tmp_path / "model.pth.tar-2"))


def test_our_checkpoint_of_another_method_names_its_trainer_and_folder(release_clip, tmp_path):
    from vlprompt.methods.maple import MaPLe, MaPLeSettings
    case = FIX["cases"]["shared"]
    dcp = DCP(release_clip, cmpa_settings(case), ["apple"])
    maple = MaPLe(release_clip, MaPLeSettings(prompt_depth=2), ["apple"])
    source = str(tmp_path / "caltech101" / "DCP" / "cfg" / "seed1" / "MultiModalPromptLearner" / "model.pth.tar-2")
    with pytest.raises(CheckpointError) as err:
        load_strict(maple.prompt_learner, dcp.prompt_learner.state_dict(), source)
    message = str(err.value)
    assert "none of its keys (text_context, visual_context, cmpa.*.visual.proj.weight" in message
    assert "is a key of MaPLePromptLearner (ctx, proj.weight" in message
    from vlprompt.methods.registry import methods
    keepers = sorted(m.name for m in methods() if m.checkpoint_folder == "MultiModalPromptLearner")
    assert {"DCP", "MaPLe"} <= set(keepers)  # and CoPrompt's, ...: every method that uses the folder
    assert ("another method's checkpoint (its path names the trainer DCP; its folder MultiModalPromptLearner/ "
            f"is where {', '.join(keepers)} keep theirs)") in message
    assert "prompt length" not in message


def test_a_configuration_mismatch_keeps_naming_the_keys(release_clip):
    case = FIX["cases"]["per_layer"]
    converted = convert_release_state_dict(release_state(case))
    deeper = DCP(release_clip, DCPSettings(n_ctx=4, prompt_depth=2, ps=False), ["apple"])
    with pytest.raises(CheckpointError, match=r"configuration \(prompt length, depth.*missing keys \['cmpa\.1\."):
        load_strict(deeper.prompt_learner, converted, "per_layer")


# ---- through train.py --------------------------------------------------------------------------
TINY_CMPA = ["INPUT.SIZE", "(32, 32)", "DATALOADER.NUM_WORKERS", "0", "DATALOADER.TEST.BATCH_SIZE", "4",
             "DATASET.NUM_SHOTS", "4", "DATASET.SUBSAMPLE_CLASSES", "all", "TRAINER.CMPA.PREC", "fp32"]


def cmpa_eval_command(workspace, clip_path, model_dir, out, case, *options):
    """The release's eval.sh way: --trainer CMPA --eval-only --model-dir --load-epoch, with the
    case's TRAINER.CMPA keys and the release's shipped recipe."""
    from conftest import ROOT
    config = case["config"]
    return [sys.executable, os.path.join(ROOT, "train.py"), "--root", str(workspace / "data"), "--seed", "1",
            "--trainer", "CMPA", "--dataset-config-file", os.path.join(ROOT, "configs/datasets/caltech101.yaml"),
            "--config-file", os.path.join(ROOT, "configs/trainers/CMPA/vit_b16_c2_ep20_batch4_16ctx.yaml"),
            "--output-dir", str(out), "--model-dir", str(model_dir), "--load-epoch", str(FIX["epoch"]), "--eval-only",
            "TRAINER.CMPA.N_CTX", str(config["N_CTX"]), "TRAINER.CMPA.PROMPT_DEPTH", str(config["PROMPT_DEPTH"]),
            "TRAINER.CMPA.PS", str(config["PS"]), "TRAINER.CMPA.FUSING", config["FUSING"],
            "MODEL.BACKBONE.PATH", str(clip_path), "MODEL.FEATURE_CACHE_DIR", str(out / "cache"), *TINY_CMPA,
            *options]


@pytest.fixture(scope="module")
def release_run(workspace, tmp_path_factory):
    """A run folder holding the release's file and a CLIP of the widths the release hard-codes
    (768 vision, 512 text: tiny-B, as the release was run with)."""
    from vlprompt.clip.loading import save_random_clip
    root = tmp_path_factory.mktemp("cmpa_release")
    clip_path = save_random_clip(str(root / "tiny_b_clip.pt"), "tiny-B")
    path = write_release_file(FIX["cases"]["shared"], root / "release")
    return root, clip_path, path


@requires_dassl
def test_a_pickled_release_file_needs_trust(workspace, release_run, tmp_path):
    root, clip_path, path = release_run
    with pytest.raises(CheckpointError, match="if you trust it, set MODEL.TRUST_RELEASE_CHECKPOINT True"):
        read_checkpoint(path, trust_key="MODEL.TRUST_RELEASE_CHECKPOINT")
    refused = run(cmpa_eval_command(workspace, clip_path, root / "release", tmp_path / "refused",
                                    FIX["cases"]["shared"]), expect_ok=False)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and path in lines[0] and "MODEL.TRUST_RELEASE_CHECKPOINT True" in lines[0]


@requires_dassl
def test_train_py_evaluates_the_release_file_as_our_model_holding_its_state(workspace, release_run, tmp_path):
    """--trainer CMPA --eval-only --model-dir <the release's run> --load-epoch 2: converted and
    evaluated; in the trainer (through --model-dir or MODEL.INIT_WEIGHTS), the same logits as our
    model given the converted state directly."""
    import train
    from dassl.engine import build_trainer
    from vlprompt.clip.loading import load_clip
    root, clip_path, path = release_run
    case = FIX["cases"]["shared"]
    trusted = ["MODEL.TRUST_RELEASE_CHECKPOINT", "True"]
    cmd = cmpa_eval_command(workspace, clip_path, root / "release", tmp_path / "cli", case, *trusted)
    proc = run(cmd)
    assert f"{path} is a checkpoint of the official release: converting its key names" in proc.stdout
    assert len(accuracies(proc.stdout)) == 1

    def trainer_from(out, *options):
        args = cmpa_eval_command(workspace, clip_path, root / "release", tmp_path / out, case, *trusted, *options)
        return build_trainer(train.setup_cfg(train.build_parser().parse_args(args[2:])))

    from_model_dir = trainer_from("model_dir")
    from_model_dir.load_model(str(root / "release"), epoch=FIX["epoch"])
    from_init_weights = trainer_from("init_weights", "MODEL.INIT_WEIGHTS", path)  # loaded while building
    direct = DCP(load_clip("ViT-B/16", path=clip_path), cmpa_settings(case),
                 from_model_dir.dm.dataset.classnames).eval()
    load_strict(direct.prompt_learner, convert_release_state_dict(release_state(case)), "direct")
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = direct(images)
        for trainer in (from_model_dir, from_init_weights):
            trainer.set_model_mode("eval")
            assert torch.equal(trainer.model(images), ours)


def test_a_release_file_given_to_a_trainer_whose_converter_refuses_it_is_one_message(tmp_path):
    """MaPLe's converter accepts the prompt_learner.* names of CMPA's file (same folder name), then
    meets a key of CMPA's: one CheckpointError naming the release that wrote it, no KeyError."""
    pytest.importorskip("dassl")
    from types import SimpleNamespace
    import torch
    from dassl.engine import TRAINER_REGISTRY
    import trainers  # noqa: F401  (registers the trainers)
    path = tmp_path / "output" / "MultiModalPromptLearner" / "model.pth.tar-2"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": release_state(FIX["cases"]["shared"]), "epoch": 2}, path)
    maple = TRAINER_REGISTRY.get("MaPLe")
    fake = SimpleNamespace(spec=maple.spec, cfg=SimpleNamespace(MODEL=SimpleNamespace(TRUST_RELEASE_CHECKPOINT=True)))
    with pytest.raises(CheckpointError) as err:
        maple.load_state_for(fake, "MultiModalPromptLearner", str(path))
    assert str(err.value).startswith(f"{path} is not a MaPLe release checkpoint (")
    assert "official CMPA release" in str(err.value) and "--trainer CMPA" in str(err.value)
