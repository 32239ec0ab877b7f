"""No host synchronisation inside a training step: on a GPU every read of a device tensor by the
host (`.item()`, `bool(t)`, `float(t)`, `.tolist()`, `.cpu()`, `torch.equal`, ...) stalls the
CPU until the GPU has caught up, so a step that reads seven values waits seven times. There is
no GPU here, so the reads are counted on the CPU: each read-like call is recorded with where it
was made. A training step of every registered prompt method may make at most one (the amp
gradient scaler's, by design); the print step reads the accumulated log values once.

Reads that kernels make internally (boolean-mask indexing, nonzero) are not visible this way."""
import os
import traceback
from contextlib import contextmanager

import pytest
import torch

from conftest import ROOT, requires_dassl, write_workspace

pytestmark = requires_dassl

READ_METHODS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy")
READ_FUNCTIONS = ("equal", "allclose", "is_nonzero")


@contextmanager
def counted_host_reads(monkeypatch, exempt=()):
    """Yields a list that gets one entry ("where: what") per host read; `exempt`: tensors that
    live on the CPU by design (the optimizers' step counters), whose reads are no sync."""
    reads, exempt_ids = [], {id(t) for t in exempt}

    def where():
        frames = [f for f in traceback.extract_stack()[:-2] if f.filename != __file__]
        return " <- ".join(f"{os.path.relpath(f.filename, ROOT)}:{f.lineno}" for f in frames[-3:][::-1])

    def counting(name, original):
        def read(self, *args, **kwargs):
            if id(self) not in exempt_ids:
                reads.append(f"{where()}: Tensor.{name}")
            return original(self, *args, **kwargs)
        return read

    def counting_function(name, original):
        def read(*args, **kwargs):
            reads.append(f"{where()}: torch.{name}")
            return original(*args, **kwargs)
        return read

    with monkeypatch.context() as patch:
        for name in READ_METHODS:
            patch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
        for name in READ_FUNCTIONS:
            patch.setattr(torch, name, counting_function(name, getattr(torch, name)))
        yield reads


def test_the_counter_sees_each_kind_of_read(monkeypatch):
    x = torch.ones(3)
    with counted_host_reads(monkeypatch) as reads:
        x.sum().item(), bool(x.all()), float(x[0]), int(x[1]), x.tolist(), x.cpu(), torch.equal(x, x)
        y = x * 2 + 1  # device work: no read
    assert len(reads) == 7
    assert [r.rsplit(": ", 1)[1] for r in reads] == ["Tensor.item", "Tensor.__bool__", "Tensor.__float__",
                                                     "Tensor.__int__", "Tensor.tolist", "Tensor.cpu", "torch.equal"]
    assert y.shape == (3,)


def trained_methods():
    from helpers import shipped_prompt_methods
    return [spec.name for spec in shipped_prompt_methods() if spec.trains]


@pytest.fixture(scope="module")
def sync_root(tmp_path_factory):
    return write_workspace(tmp_path_factory.mktemp("syncs"), {"Caltech101": (4, (2, 1, 1))})


def tiny_trainer(name, root, *options):
    """The method's Dassl trainer on the tiny CLIP (test_config_fuzz's generic tiny run)."""
    import train
    from dassl.engine import build_trainer
    from test_config_fuzz import base_command
    argv = ["--root", str(root / "data"), "--seed", "1", "--output-dir", str(root / "out" / name),
            *base_command(name, root), "DATALOADER.NUM_WORKERS", "0", "MODEL.FEATURE_CACHE_DIR",
            str(root / "cache"), "TRAIN.PRINT_FREQ", "100", *options]
    return build_trainer(train.setup_cfg(train.build_parser().parse_args(argv)))


def step_reads(trainer, monkeypatch):
    """Host reads of the second training step of an epoch (the first one creates the optimizer's
    state), neither a print step nor the epoch's last."""
    batch = next(iter(trainer.train_loader_x))
    trainer.set_model_mode("train")
    trainer.num_batches, trainer.epoch = 10, 0
    trainer.before_epoch()
    trainer.batch_idx = 0
    trainer.forward_backward(batch)
    steps = [s["step"] for s in trainer.optim.state.values() if torch.is_tensor(s.get("step"))]
    trainer.batch_idx = 1
    with counted_host_reads(monkeypatch, exempt=steps) as reads:
        trainer.forward_backward(batch)
    return reads


# every registered method that trains (a method merged later is covered by registering), and CoOp
# with the class name inside and in front of the context (a rearranged first layer)
CASES = [(name, ()) for name in trained_methods()] + [
    ("CoOp", ("TRAINER.COOP.CLASS_TOKEN_POSITION", position)) for position in ("middle", "front")]


@pytest.mark.parametrize("name, options", CASES, ids=[" ".join((n,) + o[1:]) for n, o in CASES])
def test_a_training_step_does_not_wait_for_the_device(name, options, sync_root, monkeypatch):
    trainer = tiny_trainer(name, sync_root, *options)
    reads = step_reads(trainer, monkeypatch)
    assert len(reads) == 0, f"{name}: {len(reads)} host reads in one fp32 training step:\n" + "\n".join(reads)


def test_an_amp_step_reads_the_host_once_at_most(sync_root, monkeypatch):
    trainer = tiny_trainer("HiCroPL", sync_root, "TRAINER.HICROPL.PREC", "amp")
    reads = step_reads(trainer, monkeypatch)
    assert len(reads) <= 1, f"{len(reads)} host reads in one amp training step:\n" + "\n".join(reads)
