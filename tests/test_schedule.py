"""Our schedule replays Dassl's per-epoch learning rates and saves plain state."""
import io
import itertools

import pytest
import torch

from conftest import requires_dassl

# stepping schedulers without optimizer steps is the point here
pytestmark = [requires_dassl, pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")]


def dassl_optim_cfg(**values):
    from dassl.config import get_cfg_default
    cfg = get_cfg_default().OPTIM
    cfg.defrost()
    for key, value in values.items():
        setattr(cfg, key, value)
    return cfg


def run_epochs(scheduler, optimizer, epochs):
    lrs = []
    for _ in range(epochs):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        scheduler.step()
    return lrs


CASES = list(itertools.product(["cosine", "single_step", "multi_step"], ["constant", "linear"],
                               [True, False], [0, 1, 3]))


@pytest.mark.parametrize("scheduler,warmup_type,recount,warmup", CASES)
def test_same_per_epoch_lr_as_dassl(monkeypatch, scheduler, warmup_type, recount, warmup):
    from dassl.optim import build_lr_scheduler as dassl_build
    from torch.optim import lr_scheduler

    from trainers.schedule import build_lr_scheduler

    # Upstream Dassl passes `verbose` to torch's LRScheduler (a TypeError on torch 2.x); accept
    # and drop it here, in the test only, to obtain Dassl's reference values.
    original_init = lr_scheduler.LRScheduler.__init__
    monkeypatch.setattr(lr_scheduler.LRScheduler, "__init__",
                        lambda self, optimizer, last_epoch=-1, verbose=None: original_init(self, optimizer, last_epoch))
    cfg = dassl_optim_cfg(LR_SCHEDULER=scheduler, WARMUP_TYPE=warmup_type, WARMUP_RECOUNT=recount,
                          WARMUP_EPOCH=warmup, MAX_EPOCH=12,
                          STEPSIZE=(5,) if scheduler == "single_step" else (3, 7))

    def optimizer():
        params = [torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)]
        return torch.optim.Adam([{"params": params[:1]}, {"params": params[1:], "lr": 1e-4}], lr=2.5e-3)

    reference_opt, ours_opt = optimizer(), optimizer()
    reference = run_epochs(dassl_build(reference_opt, cfg), reference_opt, 12)
    ours = run_epochs(build_lr_scheduler(ours_opt, cfg), ours_opt, 12)
    flat = lambda rows: [lr for row in rows for lr in row]
    assert flat(ours) == pytest.approx(flat(reference), rel=1e-9, abs=1e-15)


def test_release_schedule_values_and_weights_only_state():
    from trainers.schedule import build_lr_scheduler
    cfg = dassl_optim_cfg(LR_SCHEDULER="cosine", WARMUP_TYPE="constant", WARMUP_EPOCH=1,
                          WARMUP_CONS_LR=1e-5, MAX_EPOCH=50, LR=2.5e-3)
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=2.5e-3)
    sched = build_lr_scheduler(opt, cfg)
    lrs = [lr for [lr] in run_epochs(sched, opt, 50)]
    assert lrs[0] == pytest.approx(1e-5)  # constant warm-up epoch
    assert lrs[1] == pytest.approx(2.5e-3)  # then the cosine restarts from the base lr
    assert lrs[2] == pytest.approx(2.5e-3 * (1 + torch.cos(torch.tensor(torch.pi / 50)).item()) / 2)
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # no pickled scheduler objects
    fresh_opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=2.5e-3)
    fresh = build_lr_scheduler(fresh_opt, cfg)
    fresh.load_state_dict(state)
    assert fresh.last_epoch == 50 and fresh.get_last_lr() == sched.get_last_lr()


def test_bad_schedule_values_name_the_key():
    from trainers.schedule import build_lr_scheduler
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="OPTIM.LR_SCHEDULER='exp'"):
        build_lr_scheduler(opt, dassl_optim_cfg(LR_SCHEDULER="exp"))
    with pytest.raises(ValueError, match="OPTIM.MAX_EPOCH=0"):
        build_lr_scheduler(opt, dassl_optim_cfg(MAX_EPOCH=0))
