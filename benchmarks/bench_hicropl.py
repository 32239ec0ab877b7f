"""HiCroPL: our default path against the release's way of computing the same thing.

Full-size CLIP with random weights (real shapes), base-to-new configuration (N_CTX 16,
PROMPT_DEPTH 12, CROSS_LAYER 6). The reference path (vlprompt.methods.hicropl_reference) runs all 77 text
tokens through CLIP's own blocks, a second copy of the image tower as teacher, and recomputes
class text features for every test batch, with no caches. Measured in one run:
  (a) training step (forward + backward + Adam), median of timed steps after warm-up, at 50 and
      at 500 classes (ImageNet's base half);
  (b) evaluation of the same test images three times in a row (as best_val model selection does
      every epoch), at test batch 32, timed on decoded image tensors: JPEG decoding is host work
      that both paths share (the frozen-feature cache is still keyed by the image files);
  (c) peak training memory (RSS on CPU, max allocated on the chosen GPU), each path in its own
      process.
Both paths are first checked to give the same logits and loss.
  (d) with --checkpointing: our path with and without activation checkpointing of the frozen
      encoder blocks (MODEL.GRADIENT_CHECKPOINTING), each in its own process: peak memory
      (and its part above the memory before training: the activations and optimizer state) and
      the median training step time; --checkpointing-only measures this alone.

    python benchmarks/bench_hicropl.py                     # CPU defaults: about 10 minutes on 2 cores
    python benchmarks/bench_hicropl.py --device cuda --dtype fp16 --batch 32 --steps 10 --test-images 1000
    python benchmarks/bench_hicropl.py --device cuda:1 ...   # any one GPU
    python benchmarks/bench_hicropl.py --checkpointing-only --batch 32 --classes 50 50 --steps 1
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vlprompt.clip.loading import cast_clip, clip_from_state_dict, freeze, random_clip_state_dict  # noqa: E402
from vlprompt.clip.image_features import ImageFeatureCache  # noqa: E402
from vlprompt.methods.common import normalize  # noqa: E402
from vlprompt.methods.hicropl import HiCroPL, HiCroPLSettings  # noqa: E402
from vlprompt.files import tensors_fingerprint  # noqa: E402
from vlprompt.methods.hicropl_reference import ReleaseStyleHiCroPL  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WORDS = ["red", "spotted", "golden", "wild", "small", "grey", "striped", "northern", "royal", "sea",
         "fox", "warbler", "retriever", "orchid", "aircraft", "sedan", "beetle", "lighthouse", "terrier",
         "mushroom", "pelican", "canoe", "violin", "cathedral"]
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]


def classnames(n):
    """Names of 1-4 words, like real datasets' (the class suffix length drives text cost)."""
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=1 + i % 4)) + f" {i}" for i in range(n)]


def build_clip(args):
    model = freeze(clip_from_state_dict(random_clip_state_dict(args.arch, seed=0), source=args.arch))
    if args.dtype != "fp32":
        cast_clip(model, DTYPES[args.dtype])
    args.resolution = model.visual.input_resolution
    return model.to(args.device)


def build_pair(clip_model, n_classes, args, which=("ours", "reference")):
    cfg = HiCroPLSettings(n_ctx=args.n_ctx, ctx_init="a photo of a", prompt_depth=args.depth,
                        cross_layer=args.cross_layer, lambd=12.0)
    generator = torch.Generator().manual_seed(1)
    fixed = normalize(torch.randn(n_classes, clip_model.text_projection.shape[1], generator=generator))
    names = classnames(n_classes)
    models = {}
    torch.manual_seed(0)
    if "ours" in which:
        models["ours"] = HiCroPL(clip_model, cfg, names, fixed).to(args.device)
    if "reference" in which:
        models["reference"] = ReleaseStyleHiCroPL(clip_model, cfg, names, fixed).to(args.device)
    if len(models) == 2:
        models["reference"].prompt_learner.load_state_dict(models["ours"].prompt_learner.state_dict())
    return models


def batch(args, n_classes, size=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    res = args.resolution
    images = torch.randn(size or args.batch, 3, res, res, generator=generator).to(args.device)
    labels = torch.randint(0, n_classes, (images.shape[0],), generator=generator).to(args.device)
    return images, labels


def on_gpu(args) -> bool:
    return torch.device(args.device).type == "cuda"


def sync(args):
    if on_gpu(args):
        torch.cuda.synchronize(args.device)


def autocast(args):
    return torch.autocast(torch.device(args.device).type, dtype=torch.float16, enabled=args.amp)


def check_equal(models, args):
    images, labels = batch(args, len(models["ours"].classnames), size=2)
    with autocast(args):
        loss_ours, logits_ours, _ = models["ours"].loss(images, labels)
        loss_ref, logits_ref, _ = models["reference"].loss(images, labels)
    logit_diff = (logits_ours - logits_ref).abs().max().item()
    loss_diff = abs(loss_ours.item() - loss_ref.item())
    tol = 1e-3 if args.dtype == "fp32" and not args.amp else 5e-2
    print(f"check: max |logits ours - reference| = {logit_diff:.2e}, |loss ours - reference| = {loss_diff:.2e} "
          f"(loss {loss_ours.item():.6f} vs {loss_ref.item():.6f})")
    if not (logit_diff < tol * max(1.0, logits_ref.abs().max().item()) and loss_diff < tol):
        sys.exit(f"the two paths disagree beyond tolerance {tol}: not timing them")


def train_step_times(model, args, n_classes, warmup, steps, saved=None):
    """Step times after `warmup`; `saved` (a list): gets the bytes autograd keeps for backward in
    the first step (the activations: exact, whatever the allocator does)."""
    optimizer = torch.optim.Adam(model.prompt_learner.parameters(), lr=2.5e-3, eps=1e-3, weight_decay=5e-4)
    images, labels = batch(args, n_classes, seed=3)
    times = []
    for step in range(warmup + steps):
        sync(args)
        start = time.perf_counter()
        count = saved is not None and step == 0
        pack = lambda t: saved.append(t.numel() * t.element_size()) or t
        with autocast(args), torch.autograd.graph.saved_tensors_hooks(pack if count else (lambda t: t), lambda t: t):
            loss, _, _ = model.loss(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(args)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def write_test_images(folder, n, res):
    rng = np.random.default_rng(5)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"test_{i:05d}.jpg")
        Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def decode(paths):
    """[N, 3, H, W] normalised images, decoded once on the host before any timing."""
    tensors = [(torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255 - MEAN) / STD
               for p in paths]
    return torch.stack(tensors)


def eval_passes(model, paths, decoded, args, cache_dir=None, passes=3):
    """Seconds for `passes` evaluations of all test images (decoded tensors, moved to the device
    per batch as a loader would); ours reuses frozen features."""
    model.eval()
    cache = None
    if cache_dir is not None:  # what the trainer does once per run: fingerprint the frozen tower
        key = tensors_fingerprint(model.image_encoder.state_dict().items()) + f"|{args.dtype}"
        cache = ImageFeatureCache(cache_dir, key, "bench-test-transform", report=lambda _: None)
    # Hashing the tower and copying the images to the device are not timed: both paths would pay
    # the copy (a loader's pinned, asynchronous copy overlaps compute), the hash is once per run.
    on_device = decoded.to(args.device)
    sync(args)
    start = time.perf_counter()
    predictions = []
    with torch.no_grad(), autocast(args):
        for _ in range(passes):
            with model.evaluation():
                out = []
                for i in range(0, len(paths), args.test_batch):
                    chunk = paths[i:i + args.test_batch]
                    images = on_device[i:i + args.test_batch]
                    frozen = cache.features(chunk, images, model.frozen_image_features) if cache else None
                    out.append(model(images, frozen_image_features=frozen).argmax(1))
                predictions.append(torch.cat(out))
            if cache:
                cache.save()
    sync(args)
    return time.perf_counter() - start, [p.cpu() for p in predictions]


def memory_probe(args):
    """Child process: peak memory of `--memory-probe` path over warm-up + timed training steps
    (and the memory before them, and the timed steps' median)."""
    clip_model = build_clip(args)
    model = build_pair(clip_model, args.classes[0], args, which=(args.memory_probe,))[args.memory_probe]
    del clip_model  # the model holds what it needs; the reference keeps its teacher copy
    if args.checkpointing:
        set_checkpointing(model, True)
    if on_gpu(args):
        sync(args)
        before = torch.cuda.memory_allocated(args.device) / 2 ** 20
        torch.cuda.reset_peak_memory_stats(args.device)
    else:
        reset_peak_rss()  # the peak while training, not while building the random CLIP
        before = current_rss_mb()
    saved = []
    times = train_step_times(model, args, args.classes[0], warmup=1, steps=args.probe_steps, saved=saved)
    if on_gpu(args):
        peak = torch.cuda.max_memory_allocated(args.device) / 2 ** 20
    else:
        peak = peak_rss_mb()
    print(json.dumps({"peak_mb": peak, "before_mb": before, "step_s": statistics.median(times),
                      "saved_mb": sum(saved) / 2 ** 20}))


def set_checkpointing(model, on: bool) -> None:
    """What MODEL.GRADIENT_CHECKPOINTING does in the trainer."""
    from vlprompt.clip.encoders import PromptedImageEncoder, PromptedTextEncoder
    for module in model.modules():
        if isinstance(module, (PromptedTextEncoder, PromptedImageEncoder)):
            module.gradient_checkpointing = on


def current_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # Linux >= 4.0: VmHWM restarts from the current RSS
    except OSError:
        print("note: cannot reset the peak RSS here; it includes building the model", file=sys.stderr)


def peak_rss_mb():
    """This process's peak resident memory. VmHWM restarts at exec, unlike ru_maxrss, which a
    child inherits from the parent that forked it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2 ** 20)


def probe(args, path, checkpointing=False, steps=3):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", path, "--device", args.device,
           "--dtype", args.dtype, "--batch", str(args.batch), "--arch", args.arch,
           "--classes", str(args.classes[0]), str(args.classes[1]), "--n-ctx", str(args.n_ctx),
           "--depth", str(args.depth), "--cross-layer", str(args.cross_layer), "--threads", str(args.threads),
           "--probe-steps", str(steps)] + (["--amp"] if args.amp else []) + (["--checkpointing"] if checkpointing else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:  # the child's own error, not just its exit status
        sys.exit(f"the memory probe of the {path} path failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory(args):
    return {path: probe(args, path)["peak_mb"] for path in ("ours", "reference")}


def measure_checkpointing(args) -> str:
    """(d): our path without and with checkpointing; the summary's part."""
    off, on = (probe(args, "ours", checkpointing, steps=args.steps) for checkpointing in (False, True))
    what = "max allocated on " + args.device if on_gpu(args) else "RSS"
    for name, result in (("without", off), ("with", on)):
        print(f"checkpointing, {args.classes[0]} classes, batch {args.batch}, {name:7s}: peak {what} "
              f"{result['peak_mb']:.0f} MB ({result['peak_mb'] - result['before_mb']:.0f} MB above the "
              f"{result['before_mb']:.0f} MB before training), kept for backward {result['saved_mb']:.0f} MB, "
              f"step {result['step_s']:.2f} s")
    grown = lambda r: r["peak_mb"] - r["before_mb"]
    return (f"checkpointing_memory_ratio={on['peak_mb'] / off['peak_mb']:.2f} "
            f"checkpointing_training_memory_ratio={grown(on) / grown(off):.2f} "
            f"checkpointing_saved_ratio={on['saved_mb'] / off['saved_mb']:.3f} "
            f"checkpointing_time_ratio={on['step_s'] / off['step_s']:.2f} "
            f"saved_mb={off['saved_mb']:.0f},{on['saved_mb']:.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="frozen CLIP weights and activations")
    parser.add_argument("--amp", action="store_true", help="fp32 weights under fp16 autocast")
    parser.add_argument("--arch", default="ViT-B/16", help="backbone shapes (ViT-B/16, ViT-B/32, ViT-L/14)")
    parser.add_argument("--n-ctx", type=int, default=16)
    parser.add_argument("--depth", type=int, default=12, help="PROMPT_DEPTH")
    parser.add_argument("--cross-layer", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4, help="training batch")
    parser.add_argument("--classes", type=int, nargs=2, default=[50, 500], metavar=("C1", "C2"))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps at C1 classes")
    parser.add_argument("--steps-large", type=int, default=2, help="timed training steps at C2 classes")
    parser.add_argument("--warmup-large", type=int, default=0,
                        help="warm-up steps at C2 classes (a reference step there takes minutes on CPU)")
    parser.add_argument("--test-images", type=int, default=64)
    parser.add_argument("--test-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--checkpointing", action="store_true",
                        help="also measure (d): activation checkpointing of the frozen blocks, off and on")
    parser.add_argument("--checkpointing-only", action="store_true", help="measure (d) alone")
    parser.add_argument("--memory-probe", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--probe-steps", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        return memory_probe(args)
    if args.checkpointing_only:
        print(f"device {args.device}, dtype {args.dtype}{' + amp' if args.amp else ''}, backbone {args.arch} "
              f"(random weights), N_CTX {args.n_ctx}, PROMPT_DEPTH {args.depth}, train batch {args.batch}, "
              f"{args.classes[0]} classes, 1 warm-up + {args.steps} timed step(s), {args.threads} threads")
        print(measure_checkpointing(args))
        return

    print(f"device {args.device}, dtype {args.dtype}{' + amp' if args.amp else ''}, backbone {args.arch} "
          f"(random weights), N_CTX {args.n_ctx}, PROMPT_DEPTH {args.depth}, CROSS_LAYER {args.cross_layer}, "
          f"train batch {args.batch}, "
          f"classes {args.classes}, warm-up + timed steps {args.warmup}+{args.steps} / "
          f"{args.warmup_large}+{args.steps_large}, "
          f"{args.test_images} test images at batch {args.test_batch}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    clip_model = build_clip(args)
    results = {}
    for n_classes, steps, warmup in zip(args.classes, (args.steps, args.steps_large), (args.warmup, args.warmup_large)):
        models = build_pair(clip_model, n_classes, args)
        check_equal(models, args)
        for path, model in models.items():
            times = train_step_times(model, args, n_classes, warmup, steps)
            results[(path, n_classes)] = statistics.median(times)
            print(f"train step, {n_classes} classes, {path:9s}: median {results[(path, n_classes)]:.3f} s "
                  f"({', '.join(f'{t:.2f}' for t in times)})")
        if n_classes == args.classes[0]:
            with tempfile.TemporaryDirectory() as tmp:
                paths = write_test_images(tmp, args.test_images, args.resolution)
                decoded = decode(paths)
                ours_s, ours_pred = eval_passes(models["ours"], paths, decoded, args,
                                                cache_dir=os.path.join(tmp, "cache"))
                ref_s, ref_pred = eval_passes(models["reference"], paths, decoded, args)
            agree = float((ours_pred[-1] == ref_pred[-1]).float().mean())
            results["eval"] = (ours_s, ref_s)
            print(f"eval (decoded tensors), 3 passes over {args.test_images} images: ours {ours_s:.2f} s, "
                  f"reference {ref_s:.2f} s "
                  f"({args.test_images * 3 / ours_s:.2f} vs {args.test_images * 3 / ref_s:.2f} images/s); "
                  f"predictions agree on {agree:.0%}")
        del models

    del clip_model  # the probes run in their own processes: leave them the memory
    if on_gpu(args):
        torch.cuda.empty_cache()
    c1, c2 = args.classes
    speedup = results[("reference", c1)] / results[("ours", c1)]
    speedup_large = results[("reference", c2)] / results[("ours", c2)]
    eval_speedup = results["eval"][1] / results["eval"][0]
    line = (f"train_step_speedup={speedup:.2f} train_step_speedup_{c2}={speedup_large:.2f} "
            f"eval_speedup={eval_speedup:.2f}")
    if not args.skip_memory:
        peaks = measure_memory(args)
        print(f"peak training memory ({'max allocated on ' + args.device if on_gpu(args) else 'RSS'}), "
              f"{c1} classes: ours {peaks['ours']:.0f} MB, reference {peaks['reference']:.0f} MB")
        line += f" peak_memory_ratio={peaks['ours'] / peaks['reference']:.2f}"
    if args.checkpointing:
        line += " " + measure_checkpointing(args)
    print(line)


if __name__ == "__main__":
    main()
