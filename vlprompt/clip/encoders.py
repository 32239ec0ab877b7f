"""CLIP's two encoders with per-layer prompt tokens, driven from outside an unmodified model.

Positions (as in VPT-deep / MaPLe / HiCroPL):
  text   [SOS, P_0 (n tokens), class tokens, ".", EOT] + positional embedding; before layer i >= 1
         positions 1..n are replaced by P_i (no positional embedding).
  image  [CLS, patches] + positional embedding, then P_0 appended, then ln_pre; before layer
         i >= 1 the last n tokens are replaced by P_i.
A layer given no prompt keeps what the previous layer produced at those positions.
The text side also takes, for first-layer prompts only: a per-sequence rearrangement of
[SOS, P_0, class tokens, ...] (`order`: CoOp's class name in front of or inside the context), and
G contexts for the same classes at once (`encode_per_context`: CoCoOp's one context per image).

Each encoder exposes embed / run_layer / prompt_states / features so that a method can step
several streams in lockstep and exchange information between layers (`run_lockstep`).

Adapters (MMA) change what a layer outputs rather than its input: `layer_output(i, x, y)` gets
layer i's input x and output y [N, L, D] and returns the output the next layer reads. It must
treat every token on its own (a per-token function of x and y, as a bottleneck adapter is), so
that the exact shortcuts stay exact: a token after a sequence's EOT never reaches its EOT feature
(cut at EOT), and a prefix shared by all sequences gives them the same prefix states (the hook
sees the prefix and the class-specific rest as separate calls). No hook, no change.
"""
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .ops import residual_block, residual_block_shared_prefix

Prompt = Optional[Tensor]  # [n, D] shared by the batch, or [N, n, D] one per sequence
# layer_output(i, layer input, layer output) -> the output layer i + 1 reads; per token (see above)
LayerOutput = Optional[Callable[[int, Tensor, Tensor], Tensor]]


@dataclass
class TextState:
    """Hidden states of a batch of prompts between two text layers.

    With a shared prefix, `prefix` [P, 1+n, D] holds SOS and the prompt tokens (P == 1 when every
    sequence shares them) and `body` [C, L-1-n, D] the class-specific rest; otherwise `prefix`
    is None and `body` is the whole [C, L, D] sequence.
    """
    prefix: Optional[Tensor]
    body: Tensor
    eot: Tensor  # [C] position of EOT in the whole sequence
    n_prompt: int


@dataclass
class ImageState:
    tokens: Tensor  # [B, 1 + patches + n, D]
    n_prompt: int


def _as_batch(prompt: Tensor, batch: int) -> Tensor:
    return prompt.unsqueeze(0).expand(batch, -1, -1) if prompt.dim() == 2 else prompt


class PromptedTextEncoder(nn.Module):
    """CLIP's text tower over token ids, with prompts at positions 1..n."""

    gradient_checkpointing = False  # see _run_block (MODEL.GRADIENT_CHECKPOINTING)

    def __init__(self, clip_model: nn.Module, shared_prefix: bool = True, cut_at_eot: bool = True):
        super().__init__()
        self.token_embedding = clip_model.token_embedding
        self.positional_embedding = clip_model.positional_embedding
        self.blocks = clip_model.transformer.resblocks
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        # Exact shortcuts (see transformer_ops and hicropl.md); off = the release's computation.
        self.shared_prefix = shared_prefix
        self.cut_at_eot = cut_at_eot

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def width(self) -> int:
        return self.ln_final.weight.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].attn.in_proj_weight.dtype

    def embed(self, token_ids: Tensor, prompt: Prompt = None, order: Optional[Tensor] = None) -> TextState:
        """`order` [C, 77] (optional): sequence c is [SOS, prompt, rest][order[c]] (a per-sequence
        rearrangement, e.g. CoOp's class name before or inside the context); EOT stays in place.
        Rearranged prompts are no common prefix: the shared-prefix shortcut is then off."""
        eot, first_eot, last_eot = eot_positions(token_ids)
        n = 0 if prompt is None else prompt.shape[-2]
        if n and first_eot <= n:
            raise ValueError(f"a {n}-token prompt overwrites the EOT token: tokenize placeholders first")
        # Causal mask: nothing after a sequence's EOT reaches its EOT feature, so the batch can
        # stop at the last EOT.
        length = last_eot + 1 if self.cut_at_eot else token_ids.shape[1]
        x = self.token_embedding(token_ids[:, :length]).to(self.dtype)
        if n:
            x = torch.cat([x[:, :1], _as_batch(prompt.to(self.dtype), x.shape[0]), x[:, 1 + n:]], dim=1)
        if order is not None:
            x = _rearranged(x, order, eot)
        x = x + self.positional_embedding[:length].to(self.dtype)
        if n and self.shared_prefix and order is None:
            prefix = x[:1, :1 + n] if prompt.dim() == 2 else x[:, :1 + n]
            return TextState(prefix=prefix, body=x[:, 1 + n:], eot=eot, n_prompt=n)
        return TextState(prefix=None, body=x, eot=eot, n_prompt=n)

    def _replace_prompt(self, state: TextState, prompt: Tensor) -> TextState:
        n = state.n_prompt
        if prompt.shape[-2] != n:
            raise ValueError(f"text prompt has {prompt.shape[-2]} tokens, the sequence has {n} prompt slots")
        prompt = prompt.to(self.dtype)
        if state.prefix is not None:
            sos = state.prefix[:, :1]
            if prompt.dim() == 3 and sos.shape[0] == 1:
                sos = sos.expand(prompt.shape[0], -1, -1)
            return replace(state, prefix=torch.cat([sos, _as_batch(prompt, sos.shape[0])], dim=1))
        x = state.body
        body = torch.cat([x[:, :1], _as_batch(prompt, x.shape[0]), x[:, 1 + n:]], dim=1)
        return replace(state, body=body)

    def run_layer(self, i: int, state: TextState, prompt: Prompt = None,
                  layer_output: LayerOutput = None) -> TextState:
        if prompt is not None:
            state = self._replace_prompt(state, prompt)
        block = self.blocks[i]
        if state.prefix is not None:  # one prefix for all, one each, or one per group (embed_per_context)
            prefix, body = _run_block(self, residual_block_shared_prefix, block, state.prefix, state.body)
            if layer_output is not None:
                prefix, body = layer_output(i, state.prefix, prefix), layer_output(i, state.body, body)
            return replace(state, prefix=prefix, body=body)
        body = _run_block(self, residual_block, block, state.body, causal=True)
        if layer_output is not None:
            body = layer_output(i, state.body, body)
        return replace(state, body=body)

    def prompt_states(self, state: TextState) -> Tensor:
        """[P, n, D] hidden states at the prompt positions (P == 1 when shared)."""
        n = state.n_prompt
        return state.prefix[:, 1:] if state.prefix is not None else state.body[:, 1:1 + n]

    def features(self, state: TextState) -> Tensor:
        """[C, E] projected EOT features."""
        rows = torch.arange(state.body.shape[0], device=state.body.device)
        offset = 0 if state.prefix is None else 1 + state.n_prompt
        x = state.body[rows, state.eot - offset]
        return self.ln_final(x) @ self.text_projection.to(x.dtype)

    def forward(self, token_ids: Tensor, prompts: Sequence[Prompt] = (), order: Optional[Tensor] = None,
                layer_output: LayerOutput = None) -> Tensor:
        """Features of `token_ids` [C, 77]; prompts[i] (if any) enters before layer i; `order`
        rearranges the first layer's sequences (see `embed`; first-layer prompts only);
        `layer_output` adapts every layer's output (see the module's docstring)."""
        prompts = _check_depth(prompts, self.depth, "text")
        if order is not None and len(prompts) > 1:
            raise ValueError("deep prompts replace positions 1..n: they cannot follow a rearranged first layer")
        state = self.embed(token_ids, prompts[0] if prompts else None, order=order)
        for i in range(self.depth):
            state = self.run_layer(i, state, prompts[i] if 0 < i < len(prompts) else None, layer_output)
        return self.features(state)

    def embed_per_context(self, token_ids: Tensor, contexts: Tensor) -> TextState:
        """Every sequence of `token_ids` [C, 77] with each of G first-layer contexts [G, n, D] at
        positions 1..n: G*C sequences, context-major (row g*C + c). With the shared-prefix
        shortcut, [SOS, context g] is computed once for its C sequences."""
        groups, n = contexts.shape[0], contexts.shape[1]
        state = self.embed(token_ids, contexts[0])  # context 0 places the class tokens and EOT
        contexts = contexts.to(self.dtype) + self.positional_embedding[1:1 + n].to(self.dtype)  # [G, n, D]
        if state.prefix is not None:
            grouped = self.in_groups(state, groups)
            return replace(grouped, prefix=torch.cat([grouped.prefix[:, :1], contexts], dim=1))  # [G, 1+n, D]
        x = state.body.expand(groups, -1, -1, -1)  # [G, C, L, D]: the release's G*C whole sequences
        x = torch.cat([x[:, :, :1], contexts.unsqueeze(1).expand(-1, x.shape[1], -1, -1), x[:, :, 1 + n:]], dim=2)
        return TextState(prefix=None, body=x.flatten(0, 1), eot=state.eot.repeat(groups), n_prompt=n)

    def in_groups(self, state: TextState, groups: int) -> TextState:
        """Every sequence of a shared-prefix state once per group (group-major: row g*C + c), each
        group with its own copy of the prefix, so that later layers can give each group its own
        prompts [G, n, D] (a group per image: CoCoOp's contexts, DCP's per-image exchange)."""
        if state.prefix is None or state.prefix.shape[0] != 1:
            raise ValueError("groups split one shared prefix: the shared-prefix shortcut must be on")
        return TextState(prefix=state.prefix.expand(groups, -1, -1), body=state.body.repeat(groups, 1, 1),
                         eot=state.eot.repeat(groups), n_prompt=state.n_prompt)

    def encode_per_context(self, token_ids: Tensor, contexts: Tensor) -> Tensor:
        """[G, C, E]: features of the C sequences with each of G first-layer contexts [G, n, D]
        (CoCoOp: one context per image). Each group is computed as `forward(token_ids, [context])`
        would compute it."""
        state = self.embed_per_context(token_ids, contexts)
        for i in range(self.depth):
            state = self.run_layer(i, state)
        return self.features(state).view(contexts.shape[0], token_ids.shape[0], -1)


class PromptedImageEncoder(nn.Module):
    """CLIP's ViT over images, with prompt tokens after the patches."""

    gradient_checkpointing = False  # see _run_block (MODEL.GRADIENT_CHECKPOINTING)

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        visual = clip_model.visual
        if not hasattr(visual, "transformer"):
            raise ValueError("prompted image encoders need a ViT CLIP backbone")
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        self.positional_embedding = visual.positional_embedding
        self.ln_pre = visual.ln_pre
        self.blocks = visual.transformer.resblocks
        self.ln_post = visual.ln_post
        self.proj = visual.proj
        self.input_resolution = visual.input_resolution

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def width(self) -> int:
        return self.ln_post.weight.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def embed(self, images: Tensor, prompt: Prompt = None) -> ImageState:
        x = self.conv1(images.to(self.dtype))  # [B, D, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, D]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        n = 0
        if prompt is not None:
            n = prompt.shape[-2]
            x = torch.cat([x, _as_batch(prompt.to(x.dtype), x.shape[0])], dim=1)
        return ImageState(tokens=self.ln_pre(x), n_prompt=n)

    def embed_prompts_only(self, prompt: Tensor) -> ImageState:
        """An image-free stream: CLS (with its position) and the prompt tokens, no patches.
        Its prompt states depend on the learned prompts alone, never on the images of a batch."""
        cls = (self.class_embedding + self.positional_embedding[0]).to(self.dtype).view(1, 1, -1)
        tokens = torch.cat([cls, _as_batch(prompt.to(self.dtype), 1)], dim=1)
        return ImageState(tokens=self.ln_pre(tokens), n_prompt=prompt.shape[-2])

    def run_layer(self, i: int, state: ImageState, prompt: Prompt = None,
                  layer_output: LayerOutput = None) -> ImageState:
        x = state.tokens
        if prompt is not None:
            n = state.n_prompt
            if prompt.shape[-2] != n:
                raise ValueError(f"visual prompt has {prompt.shape[-2]} tokens, the sequence has {n} slots")
            x = torch.cat([x[:, :-n], _as_batch(prompt.to(x.dtype), x.shape[0])], dim=1)
        y = _run_block(self, residual_block, self.blocks[i], x)
        return replace(state, tokens=y if layer_output is None else layer_output(i, x, y))

    def prompt_states(self, state: ImageState) -> Tensor:
        return state.tokens[:, state.tokens.shape[1] - state.n_prompt:]  # [B, n, D]

    def features(self, state: ImageState) -> Tensor:
        x = self.ln_post(state.tokens[:, 0])
        return x @ self.proj.to(x.dtype)

    def forward(self, images: Tensor, prompts: Sequence[Prompt] = (), layer_output: LayerOutput = None) -> Tensor:
        prompts = _check_depth(prompts, self.depth, "image")
        state = self.embed(images, prompts[0] if prompts else None)
        for i in range(self.depth):
            state = self.run_layer(i, state, prompts[i] if 0 < i < len(prompts) else None, layer_output)
        return self.features(state)


def _run_block(encoder: nn.Module, block_fn: Callable, *args, **kwargs):
    """block_fn(block, states...) of one frozen layer. With the encoder's gradient_checkpointing
    on and gradients flowing, its activations are not kept for backward but recomputed there:
    gradients reach the prompts through every frozen layer, so without it a training step keeps
    the activations of both whole towers (the same gradients, one more forward of each block)."""
    if encoder.gradient_checkpointing and torch.is_grad_enabled():
        return checkpoint(block_fn, *args, use_reentrant=False, **kwargs)
    return block_fn(*args, **kwargs)


def eot_positions(token_ids: Tensor) -> Tuple[Tensor, int, int]:
    """[C] position of each sequence's EOT (the largest id), and the first and last of them as
    host ints. The host reads them once per token-id tensor (a class set), kept on the tensor
    itself, not at every encode: on a GPU each read would wait for the device."""
    cached = getattr(token_ids, "_vlprompt_eot", None)
    if cached is None or cached[0] != token_ids._version:
        eot = token_ids.argmax(dim=-1)
        first, last = torch.stack([eot.min(), eot.max()]).tolist()
        cached = (token_ids._version, eot, first, last)
        token_ids._vlprompt_eot = cached
    return cached[1:]


def _rearranged(x: Tensor, order: Tensor, eot: Tensor) -> Tensor:
    """x [C, L, D] with sequence c's tokens taken in order[c] [77] (cut to L)."""
    length = x.shape[1]
    if order.dim() != 2 or order.shape[0] != x.shape[0] or order.shape[1] < length:
        raise ValueError(f"order {tuple(order.shape)} does not fit {x.shape[0]} sequences of {length} tokens")
    # Checked once per (order, EOT positions, length), as eot_positions, not at every encode.
    whole, order = order, order[:, :length].to(x.device)
    checked = getattr(whole, "_vlprompt_checked", None)
    if checked is None or checked[0] is not eot or checked[1:] != (length, whole._version):
        rows = torch.arange(x.shape[0], device=x.device)
        if bool((order >= length).any()) or not torch.equal(order[rows, eot], eot.to(x.device)):
            raise ValueError("order must rearrange tokens before each sequence's EOT and keep the EOT in place")
        whole._vlprompt_checked = (eot, length, whole._version)
    return x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _check_depth(prompts: Sequence[Prompt], depth: int, which: str) -> Sequence[Prompt]:
    prompts = list(prompts)
    if len(prompts) > depth:
        raise ValueError(f"{len(prompts)} {which} prompt layers for a {depth}-layer encoder")
    if prompts and prompts[0] is None and any(p is not None for p in prompts[1:]):
        raise ValueError(f"deep {which} prompts need a first-layer prompt to reserve their positions")
    return prompts


Encoder = Union[PromptedTextEncoder, PromptedImageEncoder]
State = Union[TextState, ImageState]
# between_layers(i, [prompt states of each stream]) -> [prompt entering layer i, or None, per stream]
BetweenLayers = Callable[[int, List[Tensor]], Sequence[Prompt]]


def run_lockstep(encoders: Sequence[Encoder], states: Sequence[State], between_layers: BetweenLayers,
                 layer_outputs: Sequence[LayerOutput] = ()) -> List[State]:
    """Step several streams (text, images, ...) layer by layer; before each layer i >= 1,
    `between_layers` sees every stream's prompt states and returns each stream's new prompts;
    `layer_outputs` (optional, one per stream or None) adapt each stream's layer outputs.
    Streams of different depths (ViT-L: 24 vision, 12 text layers) stop at their own depth."""
    states = list(states)
    hooks = list(layer_outputs) or [None] * len(states)
    if len(hooks) != len(states):
        raise ValueError(f"{len(hooks)} layer_outputs for {len(states)} streams")
    for i in range(max(e.depth for e in encoders)):
        prompts = [None] * len(states)
        if i > 0:
            prompts = between_layers(i, [e.prompt_states(s) for e, s in zip(encoders, states)])
        for k, (encoder, prompt) in enumerate(zip(encoders, prompts)):
            if i < encoder.depth:
                states[k] = encoder.run_layer(i, states[k], prompt, hooks[k])
    return states


def encode_lockstep(text_encoder: PromptedTextEncoder, token_ids: Tensor,
                    image_encoder: PromptedImageEncoder, images: Tensor,
                    first_text_prompt: Tensor, first_image_prompt: Tensor,
                    between_layers: Callable[[int, Tensor, Tensor], Tuple[Prompt, Prompt]]) -> Tuple[Tensor, Tensor]:
    """Text and images in lockstep; between_layers(i, text states [P, n, dt], image states
    [B, n, dv]) -> (text prompt, image prompt) entering layer i. Returns (text [C, E], image [B, E])."""
    text, image = run_lockstep(
        (text_encoder, image_encoder),
        (text_encoder.embed(token_ids, first_text_prompt), image_encoder.embed(images, first_image_prompt)),
        lambda i, states: between_layers(i, *states))
    return text_encoder.features(text), image_encoder.features(image)
