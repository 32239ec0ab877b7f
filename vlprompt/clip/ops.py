"""CLIP's residual attention block, evaluated from outside with fused attention.

The weights are those of an unmodified `clip.model.ResidualAttentionBlock`; only the way it is
evaluated changes: batch-first tensors, `scaled_dot_product_attention`, a causal flag instead of
a stored 77x77 mask (so sequences can be cut), and a variant whose first tokens are shared by
every sequence of the batch.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _split_heads(x: Tensor, n_heads: int) -> Tensor:
    n, length, width = x.shape  # [N, L, D] -> [N, H, L, D/H]
    return x.view(n, length, n_heads, width // n_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    n, heads, length, head_dim = x.shape  # [N, H, L, D/H] -> [N, L, D]
    return x.transpose(1, 2).reshape(n, length, heads * head_dim)


def _qkv(attn: nn.MultiheadAttention, x: Tensor):
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    return (_split_heads(t, attn.num_heads) for t in (q, k, v))


def self_attention(attn: nn.MultiheadAttention, x: Tensor, causal: bool = False) -> Tensor:
    """nn.MultiheadAttention(x, x, x) for batch-first x [N, L, D]."""
    q, k, v = _qkv(attn, x)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return attn.out_proj(_merge_heads(out))


def residual_block(block: nn.Module, x: Tensor, causal: bool = False) -> Tensor:
    """One CLIP ResidualAttentionBlock on batch-first x [N, L, D]."""
    x = x + self_attention(block.attn, block.ln_1(x), causal)
    return x + block.mlp(block.ln_2(x))


def _prefix_mask(n_prefix: int, n_suffix: int, device) -> Tensor:
    # suffix query j sees every prefix token and suffix tokens 0..j: [Ls, Lp + Ls], True = attend
    keys = torch.arange(n_prefix + n_suffix, device=device)
    queries = torch.arange(n_suffix, device=device)
    return keys[None, :] <= queries[:, None] + n_prefix


def _per_sequence(prefix_part: Tensor, n: int) -> Tensor:
    """[P, ...] prefix keys or values -> [n, ...]: prefix p serves sequences p*n/P .. (p+1)*n/P - 1."""
    groups = prefix_part.shape[0]
    if n % groups:
        raise ValueError(f"{n} sequences do not split into {groups} groups of one prefix each")
    if groups == 1:
        return prefix_part.expand(n, -1, -1, -1)
    return prefix_part if groups == n else prefix_part.repeat_interleave(n // groups, dim=0)


def residual_block_shared_prefix(block: nn.Module, prefix: Tensor, suffix: Tensor):
    """A causal block over sequences [prefix; suffix] whose prefix is common to groups of them.

    prefix [P, Lp, D]; suffix [N, Ls, D] with N a multiple of P: prefix p is the beginning of
    sequences p*N/P .. (p+1)*N/P - 1 (P == 1: one prefix for all; P == N: one each; CoCoOp's
    per-image contexts: one per image for its C classes).
    Under the causal mask the prefix attends only to itself, so it is computed P times instead
    of N times; each suffix attends to its prefix's keys and values and to its own past.
    Returns (prefix, suffix) after the block; equal to `residual_block` on the concatenations.
    """
    attn = block.attn
    n = suffix.shape[0]
    qp, kp, vp = _qkv(attn, block.ln_1(prefix))
    qs, ks, vs = _qkv(attn, block.ln_1(suffix))
    prefix_out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
    keys = torch.cat([_per_sequence(kp, n), ks], dim=2)
    values = torch.cat([_per_sequence(vp, n), vs], dim=2)
    mask = _prefix_mask(prefix.shape[1], suffix.shape[1], suffix.device)
    suffix_out = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask)
    prefix = prefix + attn.out_proj(_merge_heads(prefix_out))
    suffix = suffix + attn.out_proj(_merge_heads(suffix_out))
    prefix = prefix + block.mlp(block.ln_2(prefix))
    suffix = suffix + block.mlp(block.ln_2(suffix))
    return prefix, suffix
