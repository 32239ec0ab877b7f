"""Edge-efficiency report: EdgeCNN beside MobileNetV2 and ShuffleNetV2 at the same 44x44 input.

Per model: parameters, multiply-accumulates (convolutions and linear layers), batch-1 CPU latency
(median of repeated runs, one thread and all cores, as on an edge device), extra peak memory of
batch-1 inference, and an ONNX export checked against PyTorch on the same inputs (onnx and
onnxruntime from PyPI; the release's export silently shipped random weights). torchvision's
models have random weights: structure and cost only.

    python benchmarks/edge_report.py                                  # a few minutes on 2 cores
    python benchmarks/edge_report.py --checkpoint output/fer2013/EdgeCNN/fer2013/seed1/model/model-best.pth.tar
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from vlprompt.methods.edgecnn import EdgeCNN  # noqa: E402

SIDE, CLASSES = 44, 7


def build(name: str) -> nn.Module:
    from torchvision import models
    makers = {"EdgeCNN": lambda: EdgeCNN(num_classes=CLASSES),
              "MobileNetV2": lambda: models.mobilenet_v2(num_classes=CLASSES),
              "ShuffleNetV2 x1.0": lambda: models.shufflenet_v2_x1_0(num_classes=CLASSES)}
    torch.manual_seed(0)
    return makers[name]().eval()


def load_trained_edgecnn(path: str) -> nn.Module:
    """Weights from the EdgeCNN trainer's checkpoint (Dassl SimpleNet: backbone.net.* + classifier.*)."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    state = {k.replace("backbone.net.", "", 1): v for k, v in state.items()}
    model = EdgeCNN(num_classes=state["classifier.weight"].shape[0])
    model.load_state_dict(state)  # strict: every weight must land, unlike the release's export
    return model.eval()


def count_macs(model: nn.Module, side: int = SIDE) -> int:
    macs = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            macs.append(output.numel() * per_output)
        elif isinstance(module, nn.Linear):
            macs.append(output.numel() * module.in_features)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 3, side, side))
    for handle in handles:
        handle.remove()
    return sum(macs)


def latency_ms(model: nn.Module, threads: int, repeats: int, warmup: int = 10) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    image = torch.rand(1, 3, SIDE, SIDE)
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(image)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    torch.set_num_threads(previous)
    return statistics.median(times)


def export_onnx(model: nn.Module, path: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(1, 3, SIDE, SIDE),), path, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return path


def onnx_logits(path: str, images: torch.Tensor):
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {"image": images.numpy()})[0]


def onnx_check(model: nn.Module, folder: str, name: str) -> str:
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None:
        return "skipped (pip install onnx onnxruntime)"
    path = export_onnx(model, os.path.join(folder, name.split()[0].lower() + ".onnx"))
    images = torch.rand(8, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(images)
    diff = (torch.from_numpy(onnx_logits(path, images)) - expected).abs().max().item()
    size = os.path.getsize(path) / 2 ** 20
    return f"max abs diff {diff:.1e} ({'match' if diff < 1e-4 * max(1.0, expected.abs().max().item()) else 'MISMATCH'}), {size:.2f} MB"


def memory_probe(name: str, checkpoint: str) -> None:
    """Child process: extra peak RSS of 20 batch-1 inferences over the resident model."""
    model = load_trained_edgecnn(checkpoint) if checkpoint and name == "EdgeCNN" else build(name)
    image = torch.rand(1, 3, SIDE, SIDE)
    with torch.no_grad():
        model(image)  # allocate the runtime's buffers once
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # restart VmHWM from here
    with torch.no_grad():
        for _ in range(20):
            model(image)
    print(json.dumps({"extra_kb": _status_kb("VmHWM") - before}))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def extra_peak_kb(name: str, checkpoint: str) -> str:
    if not os.path.exists("/proc/self/clear_refs"):
        return "n/a (Linux only)"
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", name, "--checkpoint", checkpoint or ""]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return f"{json.loads(out)['extra_kb'] / 1024:.1f} MB"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="", help="trained EdgeCNN (EdgeCNN trainer's model file)")
    parser.add_argument("--repeats", type=int, default=100, help="timed batch-1 runs per setting")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        return memory_probe(args.memory_probe, args.checkpoint)

    from tabulate import tabulate
    cores = os.cpu_count()
    print(f"input 1x3x{SIDE}x{SIDE}, {CLASSES} classes, CPU, torch {torch.__version__}, {cores} cores; "
          f"latency: median of {args.repeats} runs after 10 warm-up runs")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in ("EdgeCNN", "MobileNetV2", "ShuffleNetV2 x1.0"):
            model = load_trained_edgecnn(args.checkpoint) if args.checkpoint and name == "EdgeCNN" else build(name)
            params = sum(p.numel() for p in model.parameters())
            rows.append({
                "model": name + (" (trained)" if args.checkpoint and name == "EdgeCNN" else ""),
                "parameters": str(params),
                "MACs": f"{count_macs(model) / 1e6:.1f} M",
                "weights": f"{params * 4 / 2 ** 20:.2f} MB",
                "latency, 1 thread": f"{latency_ms(model, 1, args.repeats):.2f} ms",
                f"latency, {cores} threads": f"{latency_ms(model, cores, args.repeats):.2f} ms",
                "extra peak memory": extra_peak_kb(name, args.checkpoint),
                "ONNX round-trip": onnx_check(model, folder, name),
            })
    print(tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
