"""VLPROMPT_DEVICE: the one switch that pins where train.py (and everything that starts it) runs.

    unset        Dassl's rule: the GPU when one is visible (cfg.USE_CUDA), else the CPU
    cpu          the CPU, and CUDA is never initialised even where GPUs are visible (the test
                 suite and scripts/demo.sh set it: bitwise checks and the demo's "same numbers on
                 every run" hold on the CPU only, and parallel test workers must not each open
                 a CUDA context on GPU 0)
    cuda, cuda:N a GPU on purpose (an error where none is visible)
"""
import os
import re
from typing import Optional

from .errors import InvalidValue

VARIABLE = "VLPROMPT_DEVICE"


def requested_device(env=None) -> Optional[str]:
    """The device VLPROMPT_DEVICE asks for ("cpu", "cuda", "cuda:N"), None when unset; a wrong
    value is a user error naming the variable."""
    value = (os.environ if env is None else env).get(VARIABLE, "").strip()
    if not value:
        return None
    if value == "cpu" or re.fullmatch(r"cuda(:\d+)?", value):
        return value
    raise InvalidValue(f"{VARIABLE}={value!r} is invalid: use cpu, cuda or cuda:N (GPU N), or unset it "
                       f"(the GPU when one is visible)")


def apply_to_cfg(cfg, env=None) -> Optional[str]:
    """Set cfg.USE_CUDA from VLPROMPT_DEVICE (before cfg is frozen); returns what was asked for.
    "cpu" never touches CUDA; a GPU that is not there is a user error."""
    device = requested_device(env)
    if device is None:
        return None
    if device == "cpu":
        cfg.USE_CUDA = False
        hide_gpus()
        return device
    import torch
    index = int(device.split(":")[1]) if ":" in device else 0
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise InvalidValue(f"{VARIABLE}={device} but {'no GPU is' if not torch.cuda.is_available() else 'that GPU is not'}"
                           f" visible: use {VARIABLE}=cpu, or another GPU index")
    cfg.USE_CUDA = True
    return device


def hide_gpus() -> None:
    """CUDA_VISIBLE_DEVICES="" for this process and its children. USE_CUDA False is not enough:
    with a GPU visible, torch's optimizers ask for the current CUDA stream at every step
    (Optimizer._accelerator_graph_capture_health_check), which initialises CUDA and opens a
    context on GPU 0. Effective before CUDA starts (train.py: always; in a process that has
    already used CUDA it changes nothing)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def select_gpu(device: Optional[str]) -> None:
    """Make cuda:N the current GPU (Dassl asks for plain "cuda"; run_device resolves the index)."""
    if device is not None and device.startswith("cuda:"):
        import torch
        torch.cuda.set_device(int(device.split(":")[1]))
