"""Helpers every prompt method shares (no method of its own): the first-layer text context, the
class prompts "<context words> <class name>." tokenized for CLIP, and normalisation."""
from typing import Optional, Sequence, Tuple

import torch
from clip import clip as clip_api
from torch import Tensor, nn

from ..clip.class_features import readable_name
from .settings import ConfigError

CONTEXT_LENGTH = 77
MAX_CONTEXT_TOKENS = CONTEXT_LENGTH - 4  # SOS, at least one class token, ".", EOT


def ctx_init_words(ctx_init: str) -> int:
    """Number of tokens CTX_INIT occupies (between SOS and EOT)."""
    tokens = clip_api.tokenize(ctx_init.replace("_", " "), truncate=True)[0]
    return int(tokens.argmax()) - 1


# The IVLP family's releases (IVLP, MaPLe, PromptSRC) seed the text context from CTX_INIT only
# when the context has at most this many tokens; a longer context is random whatever CTX_INIT says.
IVLP_FAMILY_INIT_MAX_TOKENS = 4


def ivlp_family_init_words(ctx_init: str, n_ctx: int) -> str:
    """CTX_INIT as the IVLP family's releases use it: only for a context of at most 4 tokens."""
    return ctx_init if n_ctx <= IVLP_FAMILY_INIT_MAX_TOKENS else ""


def check_init_fills_context(init_words: str, n_ctx: int, n_ctx_key: str) -> None:
    """CTX_INIT, when used, must cover the context: with fewer tokens the releases take the
    embeddings of EOT and padding as context and overwrite the class name."""
    words = init_words.replace("_", " ").strip()
    if words and ctx_init_words(words) < n_ctx:
        raise ConfigError("ctx_init", init_words,
                          f"has {ctx_init_words(words)} token(s), fewer than {n_ctx_key}={n_ctx}: give at least "
                          f"{n_ctx} tokens of words, lower {n_ctx_key}, or set CTX_INIT '' (random context)")


def initial_context(token_embedding: nn.Embedding, n_ctx: int, ctx_init: str) -> Tuple[Optional[Tensor], str]:
    """First-layer text context and the words that reserve its positions.

    CTX_INIT seeds the context with its first N_CTX word embeddings when it has at least N_CTX
    tokens; its remaining words stay as fixed tokens, as in the releases. Otherwise the context
    is random (returns None) and the positions are reserved by 'X' placeholders.
    """
    words = ctx_init.replace("_", " ").strip()
    if words:
        tokens = clip_api.tokenize(words, truncate=True)
        if int(tokens[0].argmax()) - 1 > MAX_CONTEXT_TOKENS:
            raise ConfigError("ctx_init", ctx_init, "too long for CLIP's 77-token context")
        if n_ctx <= ctx_init_words(words):
            with torch.no_grad():
                embedding = token_embedding(tokens.to(token_embedding.weight.device))
            return embedding[0, 1:1 + n_ctx].float().clone(), words
    return None, " ".join(["X"] * n_ctx)


def class_token_ids(prompt_prefix: str, classnames: Sequence[str], n_ctx: int) -> Tensor:
    """[C, 77] token ids of "<prompt prefix> <class name>."."""
    prompts = [f"{prompt_prefix} {readable_name(c)}." for c in classnames]
    try:
        return clip_api.tokenize(prompts)
    except RuntimeError as err:
        raise ConfigError("n_ctx", n_ctx, f"a class prompt does not fit CLIP's 77 tokens: {err}") from err


def normalize(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)
