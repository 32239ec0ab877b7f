"""Prompt learning on frozen CLIP, framework-free (torch and clip only)."""
import warnings

# The clip package imports pkg_resources, whose deprecation warning would open every command's output.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")


def load_classifier(run_dir_or_checkpoint, classes=None, backbone_path=None, device="cpu", precision=None, **more):
    """A trained run (or checkpoint) as a classifier of images over any class names: see
    vlprompt.classifier.load_classifier (imported on first use, so `import vlprompt` stays light)."""
    from .classifier import load_classifier as load
    return load(run_dir_or_checkpoint, classes=classes, backbone_path=backbone_path, device=device,
                precision=precision, **more)
