"""Dassl's per-epoch learning rates, built from torch's own schedulers.

Upstream Dassl's warm-up schedulers pass `verbose` to torch's LRScheduler, which torch 2.x
rejects, and they pickle their successor scheduler object into checkpoints, which
`torch.load(weights_only=True)` refuses. Here the same per-epoch values are computed once by
stepping torch's schedulers the way Dassl's wrapper steps them, and replayed by a LambdaLR whose
state is plain numbers.
"""
from typing import List

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, MultiStepLR, StepLR

from vlprompt.errors import InvalidValue

SCHEDULERS = ("single_step", "multi_step", "cosine")
WARMUP_TYPES = ("constant", "linear")


class EpochTable:
    """lr factor of epoch e, from a precomputed table; a callable object so LambdaLR saves its
    numbers in state_dict (functions and lambdas are not saved)."""

    def __init__(self, factors: List[float]):
        self.factors = [float(f) for f in factors]

    def __call__(self, epoch: int) -> float:
        return self.factors[min(epoch, len(self.factors) - 1)]


def _main_scheduler(optimizer, optim_cfg):
    name, max_epoch = optim_cfg.LR_SCHEDULER, optim_cfg.MAX_EPOCH
    if name not in SCHEDULERS:
        raise InvalidValue(f"OPTIM.LR_SCHEDULER={name!r} is invalid: must be one of {SCHEDULERS}")
    stepsize, gamma = optim_cfg.STEPSIZE, optim_cfg.GAMMA
    if name == "cosine":
        return CosineAnnealingLR(optimizer, float(max_epoch))
    if name == "single_step":
        step = stepsize[-1] if isinstance(stepsize, (list, tuple)) else stepsize
        if not isinstance(step, int):
            raise InvalidValue(f"OPTIM.STEPSIZE={stepsize!r} is invalid: single_step needs an integer")
        return StepLR(optimizer, step_size=step if step > 0 else max_epoch, gamma=gamma)
    if not isinstance(stepsize, (list, tuple)):
        raise InvalidValue(f"OPTIM.STEPSIZE={stepsize!r} is invalid: multi_step needs a list of epochs")
    return MultiStepLR(optimizer, milestones=list(stepsize), gamma=gamma)


def dassl_epoch_lrs(optim_cfg, base_lrs: List[float]) -> List[List[float]]:
    """lrs[e][g]: the learning rate of param group g during epoch e under Dassl's scheduler."""
    max_epoch = optim_cfg.MAX_EPOCH
    if not isinstance(max_epoch, int) or max_epoch < 1:
        raise InvalidValue(f"OPTIM.MAX_EPOCH={max_epoch!r} is invalid: must be an integer >= 1")
    dummy = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr}
                             for lr in base_lrs], lr=base_lrs[0])
    main = _main_scheduler(dummy, optim_cfg)
    dummy.step()  # no gradients: a no-op that keeps torch from warning about the call order
    warmup = optim_cfg.WARMUP_EPOCH
    lrs = []
    if warmup > 0:
        if optim_cfg.WARMUP_TYPE not in WARMUP_TYPES:
            raise InvalidValue(f"OPTIM.WARMUP_TYPE={optim_cfg.WARMUP_TYPE!r} is invalid: must be one of {WARMUP_TYPES}")
        if not optim_cfg.WARMUP_RECOUNT:
            main.last_epoch = warmup  # Dassl: the main schedule does not restart after warm-up
        for epoch in range(min(warmup, max_epoch)):
            if optim_cfg.WARMUP_TYPE == "constant":
                lrs.append([optim_cfg.WARMUP_CONS_LR] * len(base_lrs))
            elif epoch == 0:
                lrs.append([optim_cfg.WARMUP_MIN_LR] * len(base_lrs))
            else:
                lrs.append([lr * epoch / warmup for lr in base_lrs])
    # first post-warm-up epoch uses the main scheduler's initial lr, then it steps once per epoch
    while len(lrs) < max_epoch:
        if len(lrs) > max(warmup, 0):
            main.step()
        lrs.append(list(main.get_last_lr()))
    return lrs


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim_cfg) -> LambdaLR:
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    table = dassl_epoch_lrs(optim_cfg, base_lrs)
    lambdas = [EpochTable([row[g] / base for row in table]) for g, base in enumerate(base_lrs)]
    return LambdaLR(optimizer, lr_lambda=lambdas)
