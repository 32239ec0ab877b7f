"""Export a trained run to ONNX: the prompted image encoder, then the class text features folded
into a final linear layer (logits = image features @ (exp(logit_scale) * class features)^T).

    python -m vlprompt.export RUN_DIR --classes "a,b,c" --out model.onnx [--backbone-path FILE]

The file takes `image` [B, 3, H, W] (the run's test transform applied: resize, centre crop,
normalise; the sizes are printed) and gives `logits` [B, C] over the classes, in their order.
On export, onnxruntime runs it on a few images and its logits are compared with PyTorch's.
Methods whose class features depend on the image (CoCoOp, DCP's per_image and batch modes,
HiCroPL's release mapper mode) cannot be folded into one linear layer and are refused.
"""
import argparse
import os
import sys
import time
import warnings
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from .errors import UserError, report_user_errors
from .methods.common import normalize

TOLERANCE = 1e-4  # |onnxruntime - PyTorch| logits, fp32


class ExportError(UserError, ValueError):
    """A model that cannot be exported as asked; the message says why."""


class FoldedClassifier(nn.Module):
    """The prompted image encoder of a model whose class side is computed once, followed by a
    linear layer holding the class text features: the same logits as the model, with no text
    tower in the graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        with torch.no_grad():
            self.classes = model.encode_classes() if hasattr(model, "encode_classes") else None
            probe = torch.zeros(1, 3, model.image_encoder.input_resolution, model.image_encoder.input_resolution,
                                device=model.logit_scale.device)
            seen: Dict[str, Tensor] = {}
            self.image_features(probe, seen)
        text = seen.get("text")
        if text is None or text.dim() != 2:
            raise ExportError(f"{type(model).__name__} does not end in one set of class features shared by the "
                              f"images, so they cannot be folded into a linear layer")
        weight = model.logit_scale.exp().float() * normalize(text.float())  # [C, E]
        self.head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.head.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)

    def image_features(self, images: Tensor, seen: Optional[Dict[str, Tensor]] = None) -> Tensor:
        """Normalised image features [B, E] fp32 as the model's classify computes them: its final
        `logits(image, text)` is intercepted, recording the class features it received."""
        def features_only(image: Tensor, text: Tensor) -> Tensor:
            if seen is not None:
                seen["text"] = text
            return normalize(image.float())
        self.model.logits = features_only  # an instance attribute, shadowing the method for this call
        try:
            if self.classes is None:  # zero-shot CLIP: fixed features, no classify step
                image = self.model.frozen_image_features(images)
                return features_only(image, self.model.frozen_text_features)
            return self.model.classify(images, self.classes)
        finally:
            del self.model.logits

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.image_features(images))  # [B, C]


def why_not_exportable(model: nn.Module) -> str:
    if not getattr(model, "classes_cacheable", True):
        name = type(model).__name__
        detail = {"CoCoOp": "its meta-network shifts the context by each image's features, so every image "
                            "has its own class text features"}.get(name, "its class text features are computed "
                                                                          "from each image (or batch)")
        return (f"{name} cannot be exported as an image encoder with a fixed linear classifier: {detail}, and "
                f"they cannot be folded into one linear layer. Use vlprompt.predict / load_classifier instead")
    return ""


def export_onnx(classifier, out: str, check_images: int = 4) -> Dict[str, float]:
    """Write `out`; returns the largest |onnxruntime - PyTorch| logit, the file size and the
    onnxruntime latency per image (batch 1, median of 20)."""
    import numpy as np
    import onnxruntime
    reason = why_not_exportable(classifier.model)
    if reason:
        raise ExportError(reason)
    if classifier.precision != "fp32":
        raise ExportError(f"export runs in fp32 (the run's precision is {classifier.precision}): pass --precision fp32")
    folded = FoldedClassifier(classifier.model).eval()
    size = tuple(classifier.info["input"]["size"])
    example = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(folded, (example,), out, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    images = torch.randn(check_images, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = classifier.model(images).float()
    session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"image": images.numpy()})[0])
    diff = (got - expected).abs().max().item()
    if not diff <= TOLERANCE:
        os.remove(out)
        raise ExportError(f"onnxruntime's logits differ from PyTorch's by {diff:.2e} (> {TOLERANCE}): not written")
    one = images[:1].numpy()
    times = []
    for _ in range(20):
        start = time.perf_counter()
        session.run(None, {"image": one})
        times.append(time.perf_counter() - start)
    return {"max_abs_diff": diff, "bytes": os.path.getsize(out), "latency_ms": 1000 * float(np.median(times))}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vlprompt.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", metavar="RUN_DIR", help="a training run's folder or a checkpoint file")
    names = parser.add_mutually_exclusive_group()
    names.add_argument("--classes", help='class names separated by commas (default: the classes trained on)')
    names.add_argument("--classes-file", help="a file of class names, one per line")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--backbone-path", help="the run's CLIP weights, if moved since it ran")
    parser.add_argument("--method", help="checkpoints that do not describe themselves: the method's trainer name")
    parser.add_argument("--config", help="checkpoints that do not describe themselves: the run's config YAML")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """The command: a user mistake (a refused method included) is one line on stderr and exit 2."""
    return report_user_errors(lambda: export(parse_args(argv)))()


def export(args) -> int:
    from .classifier import load_classifier
    from .predict import class_list
    classifier = load_classifier(args.run, classes=class_list(args) or None, backbone_path=args.backbone_path,
                                 precision="fp32", method=args.method, config=args.config)
    result = export_onnx(classifier, args.out)
    info = classifier.info["input"]
    print(f"{args.out}: {result['bytes'] / 2 ** 20:.2f} MiB, {len(classifier.classnames)} classes "
          f"({', '.join(classifier.classnames[:6])}{' ...' if len(classifier.classnames) > 6 else ''})")
    print(f"input 'image' [B, 3, {info['size'][0]}, {info['size'][1]}]: resize the shorter side to "
          f"{max(info['size'])} ({info['interpolation']}), centre crop, scale to [0, 1]"
          + (f", normalise with mean {info['mean']} and std {info['std']}" if info.get("normalize", True) else ""))
    print(f"checked with onnxruntime: logits within {result['max_abs_diff']:.1e} of PyTorch's; "
          f"{result['latency_ms']:.2f} ms per image (batch 1, CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
