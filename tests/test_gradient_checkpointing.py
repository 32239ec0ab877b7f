"""Activation checkpointing of the frozen encoder blocks (MODEL.GRADIENT_CHECKPOINTING): the same
gradients for the prompts (to 1e-6 in fp32), fewer activations kept for backward."""
import pytest
import torch

from conftest import requires_dassl
from helpers import build_hicropl, images_for, in_process_trainer


def set_checkpointing(model, on: bool):
    from vlprompt.clip.encoders import PromptedImageEncoder, PromptedTextEncoder
    encoders = [m for m in model.modules() if isinstance(m, (PromptedTextEncoder, PromptedImageEncoder))]
    assert encoders
    for encoder in encoders:
        encoder.gradient_checkpointing = on


def gradients_and_kept_bytes(model, images, labels):
    """Prompt gradients of one loss, and the bytes autograd keeps for backward."""
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t
    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss(images, labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.prompt_learner.named_parameters() if p.grad is not None}
    return grads, sum(kept)


def coop(clip_model, position):
    from vlprompt.methods.coop import CoOp, CoOpSettings
    torch.manual_seed(0)
    return CoOp(clip_model, CoOpSettings(n_ctx=4, class_token_position=position), ["dog", "cat", "sports car"])


def cocoop(clip_model):
    from vlprompt.methods.cocoop import CoCoOp, CoCoOpSettings
    torch.manual_seed(0)
    return CoCoOp(clip_model, CoCoOpSettings(n_ctx=4), ["dog", "cat", "sports car"])


MODELS = {"HiCroPL": lambda clip: build_hicropl(clip), "CoOp middle": lambda clip: coop(clip, "middle"),
          "CoCoOp": cocoop, "HiCroPL release shortcuts off": lambda clip: build_hicropl(clip, exact_shortcuts=False)}


@pytest.mark.parametrize("name", list(MODELS))
def test_checkpointing_gives_the_same_gradients_and_keeps_less(name, tiny_clip):
    model = MODELS[name](tiny_clip).train()
    images, labels = images_for(model, batch=3), torch.tensor([0, 1, 2])
    plain, plain_bytes = gradients_and_kept_bytes(model, images, labels)
    set_checkpointing(model, True)
    try:
        recomputed, checkpointed_bytes = gradients_and_kept_bytes(model, images, labels)
    finally:
        set_checkpointing(model, False)
    assert plain.keys() == recomputed.keys() and plain
    for key in plain:
        assert (plain[key] - recomputed[key]).abs().max() <= 1e-6, key
    assert checkpointed_bytes < 0.7 * plain_bytes, (checkpointed_bytes, plain_bytes)


def test_without_gradients_checkpointing_changes_nothing(tiny_clip):
    model = build_hicropl(tiny_clip).eval()
    images = images_for(model, batch=2)
    with torch.no_grad():
        plain = model(images)
        set_checkpointing(model, True)
        checkpointed = model(images)
    assert torch.equal(plain, checkpointed)


@requires_dassl
def test_the_config_key_turns_it_on_for_every_encoder(workspace, tmp_path, capsys):
    from vlprompt.clip.encoders import PromptedImageEncoder, PromptedTextEncoder
    off = in_process_trainer(workspace, tmp_path)
    on = in_process_trainer(workspace, tmp_path, "MODEL.GRADIENT_CHECKPOINTING", "True")
    flags = lambda trainer: {m.gradient_checkpointing for m in trainer.model.modules()
                             if isinstance(m, (PromptedTextEncoder, PromptedImageEncoder))}
    assert flags(off) == {False} and flags(on) == {True}
    assert "Gradient checkpointing: frozen encoder blocks recompute" in capsys.readouterr().out
