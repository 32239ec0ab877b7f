"""The prompted encoders against CLIP's own, unmodified modules."""
import copy

import clip
import pytest
import torch


from vlprompt.clip.loading import cast_clip
from vlprompt.clip.encoders import PromptedImageEncoder, PromptedTextEncoder, encode_lockstep
from vlprompt.methods.hicropl_reference import CLIPBlocksImageEncoder, CLIPBlocksTextEncoder
from helpers import half_tolerance, images_for

NAMES = ["dog.", "sports car.", "a very long class name with many many different tokens in it."]


def placeholder_tokens(n, names=NAMES):
    return clip.tokenize([" ".join(["X"] * n) + " " + name for name in names])


@pytest.mark.parametrize("which", ["tiny_clip", "tiny_l_clip"])
def test_no_prompts_equals_clip_encoders(which, request):
    model = request.getfixturevalue(which)
    tokens = clip.tokenize(["a photo of a dog.", "cat", "an extremely long description of a thing"])
    images = images_for(model, batch=3)
    with torch.no_grad():
        # fp32 rounding only: fused attention with a causal flag vs CLIP's additive -inf mask
        torch.testing.assert_close(PromptedTextEncoder(model)(tokens), model.encode_text(tokens),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(PromptedImageEncoder(model)(images), model.encode_image(images),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["tiny_clip", "tiny_l_clip"])
def test_deep_prompts_at_the_specified_positions(which, request):
    model = request.getfixturevalue(which)
    gen = torch.Generator().manual_seed(1)
    n, depth = 4, 3
    text_prompts = [torch.randn(n, model.ln_final.weight.shape[0], generator=gen) for _ in range(depth)]
    vis_prompts = [torch.randn(n, model.visual.ln_post.weight.shape[0], generator=gen) for _ in range(depth)]
    tokens, images = placeholder_tokens(n), images_for(model, batch=3)
    with torch.no_grad():  # against CLIP's own blocks, sequence-first, stored 77x77 mask
        torch.testing.assert_close(PromptedTextEncoder(model)(tokens, text_prompts),
                                   CLIPBlocksTextEncoder(model)(tokens, text_prompts), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(PromptedImageEncoder(model)(images, vis_prompts),
                                   CLIPBlocksImageEncoder(model)(images, vis_prompts), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared_prefix,cut", [(True, True), (False, True), (True, False)])
def test_text_shortcuts_equal_full_77_token_computation(tiny_clip, shared_prefix, cut):
    n = 5
    width = tiny_clip.ln_final.weight.shape[0]
    prompts = [torch.randn(n, width, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    tokens = placeholder_tokens(n)
    full = PromptedTextEncoder(tiny_clip, shared_prefix=False, cut_at_eot=False)
    fast = PromptedTextEncoder(tiny_clip, shared_prefix=shared_prefix, cut_at_eot=cut)
    with torch.no_grad():
        torch.testing.assert_close(fast(tokens, prompts), full(tokens, prompts), atol=1e-5, rtol=1e-5)


def test_shared_prefix_gradients_match_full(tiny_clip):
    n = 3
    width = tiny_clip.ln_final.weight.shape[0]
    tokens = placeholder_tokens(n)
    grads = []
    for shared in (True, False):
        prompts = [torch.randn(n, width, generator=torch.Generator().manual_seed(i)).requires_grad_()
                   for i in range(2)]
        PromptedTextEncoder(tiny_clip, shared_prefix=shared, cut_at_eot=shared)(tokens, prompts).sum().backward()
        grads.append([p.grad for p in prompts])
    for fast, full in zip(*grads):
        torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-4)


def test_per_class_prompts_equal_shared_when_identical(tiny_clip):
    n = 2
    width = tiny_clip.ln_final.weight.shape[0]
    tokens = placeholder_tokens(n)
    shared = [torch.randn(n, width, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    per_class = [p.expand(len(tokens), -1, -1) for p in shared]
    encoder = PromptedTextEncoder(tiny_clip)
    with torch.no_grad():
        torch.testing.assert_close(encoder(tokens, per_class), encoder(tokens, shared), atol=1e-5, rtol=1e-5)


def test_lockstep_hook_sees_prompt_states_and_can_replace_them(tiny_clip):
    """A between-layers hook that returns fixed per-layer prompts reproduces the separate encoders."""
    n, depth = 3, 3
    text_enc, image_enc = PromptedTextEncoder(tiny_clip), PromptedImageEncoder(tiny_clip)
    gen = torch.Generator().manual_seed(2)
    text_prompts = [torch.randn(n, text_enc.width, generator=gen) for _ in range(depth)]
    vis_prompts = [torch.randn(n, image_enc.width, generator=gen) for _ in range(depth)]
    tokens, images = placeholder_tokens(n), images_for(tiny_clip, batch=2)
    seen = []

    def between(i, text_states, image_states):
        seen.append((i, tuple(text_states.shape), tuple(image_states.shape)))
        return (text_prompts[i], vis_prompts[i]) if i < depth else (None, None)

    with torch.no_grad():
        text, image = encode_lockstep(text_enc, tokens, image_enc, images, text_prompts[0], vis_prompts[0], between)
        torch.testing.assert_close(text, text_enc(tokens, text_prompts))
        torch.testing.assert_close(image, image_enc(images, vis_prompts))
    assert seen[0] == (1, (1, n, text_enc.width), (2, n, image_enc.width))
    assert [s[0] for s in seen] == list(range(1, max(text_enc.depth, image_enc.depth)))


def test_lockstep_hook_couples_the_encoders(tiny_clip):
    """Information flows through the hook: image prompts built from text states change the image."""
    n = 2
    text_enc, image_enc = PromptedTextEncoder(tiny_clip), PromptedImageEncoder(tiny_clip)
    proj = torch.nn.Linear(text_enc.width, image_enc.width)
    tokens, images = placeholder_tokens(n), images_for(tiny_clip, batch=2)
    first_t = torch.zeros(n, text_enc.width, requires_grad=True)
    first_v = torch.zeros(n, image_enc.width)
    coupled = lambda i, t, v: (None, proj(t.mean(0)))
    _, image = encode_lockstep(text_enc, tokens, image_enc, images, first_t, first_v, coupled)
    image.sum().backward()
    assert first_t.grad is not None and first_t.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precisions_agree_with_fp32(tiny_clip, dtype):
    half = cast_clip(copy.deepcopy(tiny_clip), dtype)
    n = 4
    tokens, images = placeholder_tokens(n), images_for(tiny_clip, batch=3)
    t_prompts = [torch.randn(n, 64, generator=torch.Generator().manual_seed(i)) * 0.1 for i in range(3)]
    v_prompts = [torch.randn(n, 128, generator=torch.Generator().manual_seed(9 + i)) * 0.1 for i in range(3)]
    with torch.no_grad():
        for make, inputs, prompts in ((PromptedTextEncoder, tokens, t_prompts),
                                      (PromptedImageEncoder, images, v_prompts)):
            reference = make(tiny_clip)(inputs, prompts)
            low = make(half)(inputs, prompts)
            assert low.dtype == dtype
            assert (low.float() - reference).abs().max() / reference.abs().max() < half_tolerance(dtype, 1.0)


def test_prompt_that_would_overwrite_eot_is_refused(tiny_clip):
    with pytest.raises(ValueError, match="EOT"):
        PromptedTextEncoder(tiny_clip)(clip.tokenize(["dog"]), [torch.zeros(4, 64)])
