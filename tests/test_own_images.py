"""Your own images, end to end (issue 21): a class-folder dataset of toy-world photos, HiCroPL
trained on its base classes through the task script, tested on its new classes by the test loop,
and the same images classified by vlprompt.load_classifier / vlprompt.predict (trained classes,
classes named on the command line, the checkpoint alone) and by the ONNX export.

One training run is shared by the module (the toy CLIP, demo_toy's recipe, one epoch)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, requires_dassl

pytestmark = requires_dassl

TOY_CLIP = os.path.join(ROOT, "vlprompt", "toyworld", "toy_clip.pt")
N_CLASSES, PER_CLASS = 6, 32  # 16 training images per class: the scripts' 16 shots


class Run:
    """Paths of the shared run."""

    def __init__(self, root):
        self.root = root
        self.images = root / "my_toys"
        self.yaml = root / "my_toys.yaml"
        self.clip = root / "weights" / "toy_clip.pt"  # a copy: the tests move it
        self.output = root / "output"
        self.env = dict(os.environ, OUTPUT=str(self.output), CFG="demo_toy", PYTHONWARNINGS="ignore",
                        VLPROMPT_CACHE=str(root / "cache"))
        self.env.pop("DATA", None)  # the dataset YAML's folder is the data root
        self.train_dir = self.output / "base2new/train_base/my_toys/shots_16/HiCroPL/demo_toy/seed1"

    def options(self, *extra):
        return ["MODEL.BACKBONE.PATH", str(self.clip), "OPTIM.MAX_EPOCH", "1", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from datasets.toy_world import write_image_folder
    run = Run(tmp_path_factory.mktemp("own_images"))
    write_image_folder(str(run.images), N_CLASSES, PER_CLASS)
    run.yaml.write_text('DATASET:\n  NAME: "ImageFolder"\n  IMAGE_FOLDER: "my_toys"\n'
                        '  CLASSNAMES_FILE: "my_toys/classes.txt"\n')
    run.clip.parent.mkdir()
    shutil.copy(TOY_CLIP, run.clip)
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts/hicropl/base2new_train.sh"), str(run.yaml), "1",
                           *run.options()], capture_output=True, text=True, env=run.env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


def dassl_test_loop(run, stage, trainer="HiCroPL", model_dir=None, options=()):
    """The test loop of a task (the arguments vlprompt.run gives train.py), run in this process:
    (trainer, {image path: logits}, accuracy)."""
    import train
    from dassl.engine import build_trainer
    from dassl.utils import set_random_seed
    from vlprompt.experiments import run as task_run
    ctx, positional, _ = task_run.parse([stage, trainer, str(run.yaml), "1"], run.env)
    job = task_run.plan(ctx, positional, run.env)[-1]
    args = train.build_parser().parse_args(["--output-dir", str(run.root / f"loop_{stage}_{trainer}"), *job.args,
                                            *run.options(*options)])
    cfg = train.setup_cfg(args)
    set_random_seed(cfg.SEED)
    tester = build_trainer(cfg)
    if args.model_dir or model_dir:
        tester.load_model(model_dir or args.model_dir)
    seen = {}
    infer = tester.infer

    def recording(images, impaths):
        logits = infer(images, impaths)
        seen.update(zip(impaths, logits.float().cpu()))
        return logits
    tester.infer = recording
    accuracy = tester.test()
    return tester, seen, accuracy


@pytest.fixture(scope="module")
def new_loop(run):
    return dassl_test_loop(run, "base2new_test")


def test_the_checkpoint_describes_its_model(run):
    from vlprompt.classifier import find_checkpoint
    state = torch.load(find_checkpoint(str(run.train_dir)), weights_only=True)
    info = state["info"]
    assert info["method"] == "HiCroPL" and info["settings"]["n_ctx"] == 4 and info["precision"] == "fp32"
    assert info["classnames"] == ["red circle", "orange square", "yellow triangle"]  # the base half, in classes.txt order
    assert info["backbone"]["path"] == str(run.clip) and len(info["backbone"]["fingerprint"]) == 64
    assert info["input"] == {"size": [32, 32], "interpolation": "bicubic", "normalize": True,
                             "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    assert info["dataset"] == "ImageFolder"


def test_predictions_on_new_classes_equal_the_test_loops(run, new_loop):
    import vlprompt
    tester, seen, accuracy = new_loop
    classes = tester.dm.dataset.classnames
    assert classes == ["green star", "blue cross", "purple ring"]
    classifier = vlprompt.load_classifier(str(run.train_dir), classes=classes)
    paths = sorted(seen)
    logits = classifier(paths)
    expected = torch.stack([seen[p] for p in paths])
    assert (logits - expected).abs().max().item() < 1e-5
    labels = torch.tensor([classes.index(os.path.basename(os.path.dirname(p)).replace("_", " ")) for p in paths])
    assert 100.0 * (logits.argmax(1) == labels).float().mean().item() == pytest.approx(accuracy)
    assert accuracy > 100.0 / len(classes)  # new classes, never trained on, well above chance


def test_predictions_with_the_trained_classes_equal_the_test_loops(run):
    import vlprompt
    tester, seen, _ = dassl_test_loop(run, "base2new_test", options=("DATASET.SUBSAMPLE_CLASSES", "base"))
    classifier = vlprompt.load_classifier(str(run.train_dir))  # the classes it was trained on
    assert classifier.classnames == tester.dm.dataset.classnames
    one = sorted(seen)[0]
    assert (classifier(one)[0] - seen[one]).abs().max().item() < 1e-5  # a single image, by its path
    from PIL import Image
    with Image.open(one) as image:  # or as a PIL image, with a tensor already transformed
        batch = [image.copy(), classifier.transform(image.convert("RGB"))]
    assert (classifier(batch) - seen[one]).abs().max().item() < 1e-5


def test_the_predict_command_with_classes_from_the_command_line(run, new_loop, capsys):
    from vlprompt import predict
    _, seen, _ = new_loop
    image = sorted(seen)[0]
    assert predict.main([str(run.train_dir), image, "--classes", "green star, blue cross,purple ring", "--json",
                         "--topk", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip())
    probabilities = seen[image].softmax(-1)
    best = probabilities.topk(2)
    names = ["green star", "blue cross", "purple ring"]
    assert result["image"] == image
    assert [name for name, _ in result["top"]] == [names[i] for i in best.indices]
    assert [p for _, p in result["top"]] == pytest.approx(best.values.tolist(), abs=1e-5)
    # a folder: every image in it, one line each, the table form
    assert predict.main([str(run.train_dir), str(run.images / "blue_cross"), "--classes-file",
                         str(write_lines(run.root / "names.txt", names))]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == PER_CLASS and lines[0].startswith(str(run.images / "blue_cross" / "000.png") + ": ")


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prediction_from_the_checkpoint_alone(run, new_loop, capsys):
    """No dataset folder, no run folder, the CLIP weights moved: the checkpoint file and
    --backbone-path give the test loop's logits."""
    import vlprompt
    from vlprompt import predict
    from vlprompt.classifier import ClassifierError, find_checkpoint
    _, seen, _ = new_loop
    alone = run.root / "alone"
    alone.mkdir()
    checkpoint = shutil.copy(find_checkpoint(str(run.train_dir)), alone / "model.pth.tar")
    images = [str(shutil.copy(p, alone / f"{i}_{os.path.basename(p)}")) for i, p in enumerate(sorted(seen)[:5])]
    expected = torch.stack([seen[p] for p in sorted(seen)[:5]])
    moved = run.root / "elsewhere.pt"
    os.rename(run.images, run.root / "hidden")
    os.rename(run.clip, moved)
    try:
        with pytest.raises(ClassifierError, match=r"are not there any more: pass backbone_path= \(--backbone-path\)"):
            vlprompt.load_classifier(str(checkpoint))
        classes = ["green star", "blue cross", "purple ring"]
        classifier = vlprompt.load_classifier(str(checkpoint), classes=classes, backbone_path=str(moved))
        assert (classifier(images) - expected).abs().max().item() < 1e-5
        assert predict.main([str(checkpoint), *images, "--classes", ",".join(classes), "--backbone-path",
                             str(moved), "--json"]) == 0
        tops = [json.loads(line)["top"][0] for line in capsys.readouterr().out.strip().splitlines()]
        assert [name for name, _ in tops] == [classes[i] for i in expected.argmax(1)]
        # other weights than the run's: refused, naming the file
        from vlprompt.clip.loading import save_random_clip
        other = save_random_clip(str(run.root / "other.pt"), "toy", seed=3)
        with pytest.raises(SystemExit) as exit_:
            predict.main([str(checkpoint), images[0], "--backbone-path", other])
        assert exit_.value.code == 2 and "are not the ones" in capsys.readouterr().err
    finally:
        os.rename(run.root / "hidden", run.images)
        os.rename(moved, run.clip)


def test_a_checkpoint_without_its_description_loads_from_the_run_log_or_a_config(run, new_loop, tmp_path):
    import vlprompt
    from vlprompt.classifier import ClassifierError, find_checkpoint
    _, seen, _ = new_loop
    state = torch.load(find_checkpoint(str(run.train_dir)), weights_only=True)
    del state["info"]  # as written before checkpoints described themselves
    classes, paths = ["green star", "blue cross", "purple ring"], sorted(seen)[:4]
    expected = torch.stack([seen[p] for p in paths])
    old_run = tmp_path / "old_run"
    (old_run / "VLPromptLearner").mkdir(parents=True)
    torch.save(state, old_run / "VLPromptLearner" / "model-best.pth.tar")
    shutil.copy(run.train_dir / "log.txt", old_run / "log.txt")  # the config Dassl printed
    loaded = vlprompt.load_classifier(str(old_run), classes=classes, backbone_path=str(run.clip))
    assert (loaded(paths) - expected).abs().max().item() < 1e-5
    os.remove(old_run / "log.txt")
    with pytest.raises(ClassifierError, match=r"does not say which model it holds .* pass method="):
        vlprompt.load_classifier(str(old_run), classes=classes, backbone_path=str(run.clip))
    config = os.path.join(ROOT, "configs/trainers/HiCroPL/demo_toy.yaml")
    with pytest.raises(ClassifierError, match=r"demo_toy.yaml names no method: pass method="):
        vlprompt.load_classifier(str(old_run), classes=classes, backbone_path=str(run.clip), config=config)
    loaded = vlprompt.load_classifier(str(old_run), classes=classes, backbone_path=str(run.clip), config=config,
                                      method="HiCroPL")
    assert (loaded(paths) - expected).abs().max().item() < 1e-5


def test_onnx_export_of_hicropl_matches_pytorch(run, new_loop, capsys):
    import onnxruntime
    import vlprompt
    from vlprompt import export
    _, seen, _ = new_loop
    out = run.root / "hicropl.onnx"
    assert export.main([str(run.train_dir), "--classes", "green star,blue cross,purple ring", "--out", str(out)]) == 0
    assert "checked with onnxruntime" in capsys.readouterr().out and out.stat().st_size > 1e6
    classifier = vlprompt.load_classifier(str(run.train_dir), classes=["green star", "blue cross", "purple ring"])
    paths = sorted(seen)
    images = classifier.load_images(paths)
    got = onnxruntime.InferenceSession(str(out)).run(None, {"image": images.numpy()})[0]
    expected = torch.stack([seen[p] for p in paths])
    assert (torch.from_numpy(got) - expected).abs().max().item() < 1e-4


def train_in_process(run, trainer, folder, *options):
    """A one-epoch run of `trainer` on the image folder (2 shots), trained in this process."""
    import train
    from dassl.engine import build_trainer
    from dassl.utils import set_random_seed
    args = train.build_parser().parse_args([
        "--root", str(run.root), "--seed", "1", "--trainer", trainer, "--dataset-config-file", str(run.yaml),
        "--config-file", os.path.join(ROOT, f"configs/trainers/{trainer}/demo_toy.yaml"),
        "--output-dir", str(folder), *run.options("DATASET.NUM_SHOTS", "2", *options)])
    cfg = train.setup_cfg(args)
    set_random_seed(cfg.SEED)
    trainer = build_trainer(cfg)
    if trainer.spec.trains:
        trainer.train()
    return trainer


def test_onnx_export_of_coop_matches_pytorch_and_cocoop_is_refused(run, capsys):
    import onnxruntime
    import vlprompt
    from vlprompt import export
    train_in_process(run, "CoOp", run.root / "coop")
    out = run.root / "coop.onnx"
    assert export.main([str(run.root / "coop"), "--out", str(out)]) == 0
    classifier = vlprompt.load_classifier(str(run.root / "coop"))
    images = classifier.load_images(sorted(str(p) for p in (run.images / "red_circle").glob("*.png"))[:6])
    got = onnxruntime.InferenceSession(str(out)).run(None, {"image": images.numpy()})[0]
    assert (torch.from_numpy(got) - classifier(images)).abs().max().item() < 1e-4
    train_in_process(run, "CoCoOp", run.root / "cocoop", "DATALOADER.TRAIN_X.BATCH_SIZE", "2")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        export.main([str(run.root / "cocoop"), "--out", str(run.root / "cocoop.onnx")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "CoCoOp cannot be exported" in err and "every image has its own class text features" in err
    assert not (run.root / "cocoop.onnx").exists()
    # yet it classifies, its class features computed per image as in its test loop
    assert vlprompt.load_classifier(str(run.root / "cocoop"), classes=["star", "ring"])(images).shape == (6, 2)


def test_zero_shot_clip_runs_classify_too(run):
    import vlprompt
    trainer = train_in_process(run, "ZeroshotCLIP", run.root / "zeroshot", "DATASET.SUBSAMPLE_CLASSES", "new")
    classifier = vlprompt.load_classifier(str(run.root / "zeroshot"))
    assert classifier.classnames == ["green star", "blue cross", "purple ring"]
    paths = [str(run.images / "purple_ring" / f"{i:03d}.png") for i in range(4)]
    images = classifier.load_images(paths)
    with torch.no_grad():
        expected = trainer.model(images)
    assert (classifier(paths) - expected).abs().max().item() < 1e-5


def every_prompt_method():
    from helpers import shipped_prompt_methods
    return sorted({spec.name for task in ("base2new", "xd") for spec in shipped_prompt_methods(task)})


@pytest.mark.parametrize("method", every_prompt_method())
def test_every_registered_method_rebuilds_from_its_checkpoint(run, method, tmp_path):
    """The registry's model and settings, rebuilt from a checkpoint's description alone, give the
    trainer's logits (untrained weights: no training needed to check the rebuild) on new classes."""
    import vlprompt
    from dassl.engine import build_trainer
    import train
    options = ["DATASET.SUBSAMPLE_CLASSES", "new", "DATASET.NUM_SHOTS", "2"]
    args = train.build_parser().parse_args([
        "--root", str(run.root), "--seed", "1", "--trainer", method, "--dataset-config-file", str(run.yaml),
        "--config-file", os.path.join(ROOT, f"configs/trainers/{method}/demo_toy.yaml"),
        "--output-dir", str(tmp_path / "run"), *run.options(*options)])
    trainer = build_trainer(train.setup_cfg(args))
    if trainer.spec.trains:
        torch.manual_seed(7)
        with torch.no_grad():  # away from the initial values, so that loading them is checked
            for parameter in trainer.model.prompt_learner.parameters():
                parameter.add_(0.02 * torch.randn_like(parameter))
        trainer.save_model(0, str(tmp_path / "run"), model_name="model-best.pth.tar")
    classifier = vlprompt.load_classifier(str(tmp_path / "run"))
    assert classifier.classnames == ["green star", "blue cross", "purple ring"]
    paths = [str(run.images / name / f"{i:03d}.png") for name in ("green_star", "red_circle") for i in range(3)]
    images = classifier.load_images(paths)
    trainer.model.eval()
    with torch.no_grad(), trainer.model.evaluation():
        expected = trainer.model(images)
    assert (classifier(paths) - expected).abs().max().item() < 1e-5
    classifier.set_classes(["star", "ring"])
    assert classifier(paths).shape == (6, 2)


def test_a_release_checkpoint_loads_with_its_method_and_config(run, tmp_path):
    """The HiCroPL release's VLPromptLearner state dict (its names, fp16, frozen CLIP inside)."""
    import vlprompt
    from helpers import release_state_dict
    from vlprompt.classifier import ClassifierError
    config = os.path.join(ROOT, "configs/trainers/HiCroPL/demo_toy.yaml")
    classes = ["green star", "blue cross"]
    ours = vlprompt.load_classifier(str(run.train_dir), classes=classes)
    release = release_state_dict(ours.model, vlprompt.classifier.load_clip("", str(run.clip)))
    (tmp_path / "VLPromptLearner").mkdir()
    path = tmp_path / "VLPromptLearner" / "model.pth.tar-5"
    torch.save({"state_dict": release, "epoch": 5}, path)
    with pytest.raises(ClassifierError, match="pass method="):
        vlprompt.load_classifier(str(path), classes=classes, backbone_path=str(run.clip))
    loaded = vlprompt.load_classifier(str(path), classes=classes, backbone_path=str(run.clip), method="HiCroPL",
                                      config=config)
    paths = [str(run.images / "blue_cross" / f"{i:03d}.png") for i in range(4)]
    # the release keeps its prompts in fp16: the same logits up to that rounding
    assert (loaded(paths) - ours(paths)).abs().max().item() < 1e-3  # 1.3e-4 measured


def test_predict_imports_no_dassl(run, tmp_path):
    """vlprompt.predict and load_classifier are framework-free: the command runs without Dassl."""
    script = ("import sys; from vlprompt import predict; code = predict.main(sys.argv[1:]); "
              "loaded = [m for m in sys.modules if m.split('.')[0] in ('dassl', 'yacs', 'trainers', 'datasets')]; "
              "print('LOADED', loaded); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", script, str(run.train_dir),
                           str(run.images / "red_circle" / "001.png"), "--topk", "1"],
                          capture_output=True, text=True, cwd=ROOT, env=run.env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOADED []" in proc.stdout and "red_circle/001.png: " in proc.stdout
