"""What every prompt method shares on the text side: settings checks, the first-layer context,
and the class prompts "<context words> <class name>." tokenized for CLIP."""
from dataclasses import fields
from typing import Callable, Optional, Sequence, Tuple

import torch
from clip import clip as clip_api
from torch import Tensor, nn

from ..clip.class_features import readable_name

CONTEXT_LENGTH = 77


class ConfigError(ValueError):
    """An invalid setting; the message names the config key and the allowed values."""


def check_field_types(settings, key: Callable[[str], str]) -> None:
    """Every field of a settings dataclass has its declared type (bool is no int here)."""
    for f in fields(settings):
        value = getattr(settings, f.name)
        if f.type is bool:
            ok = isinstance(value, bool)
        elif f.type is str:
            ok = isinstance(value, str)
        else:
            ok = isinstance(value, (int, float) if f.type is float else int) and not isinstance(value, bool)
        if not ok:
            raise ConfigError(f"{key(f.name)}={value!r} is invalid: expected {f.type.__name__}, "
                              f"got {type(value).__name__}")


def check_n_ctx(n_ctx: int, key: str) -> None:
    if not 1 <= n_ctx <= CONTEXT_LENGTH - 4:
        raise ConfigError(f"{key}={n_ctx!r} is invalid: must be in [1, {CONTEXT_LENGTH - 4}] "
                          f"(the text context holds 77 tokens)")


def ctx_init_words(ctx_init: str) -> int:
    """Number of tokens CTX_INIT occupies (between SOS and EOT)."""
    tokens = clip_api.tokenize(ctx_init.replace("_", " "), truncate=True)[0]
    return int(tokens.argmax()) - 1


def initial_context(token_embedding: nn.Embedding, n_ctx: int, ctx_init: str,
                    key: str) -> Tuple[Optional[Tensor], str]:
    """First-layer text context and the words that reserve its positions.

    CTX_INIT seeds the context with its first N_CTX word embeddings when it has at least N_CTX
    tokens; its remaining words stay as fixed tokens, as in the releases. Otherwise the context
    is random (returns None) and the positions are reserved by 'X' placeholders.
    """
    words = ctx_init.replace("_", " ").strip()
    if words:
        tokens = clip_api.tokenize(words, truncate=True)
        if int(tokens[0].argmax()) - 1 > CONTEXT_LENGTH - 4:
            raise ConfigError(f"{key} is too long for the 77-token context")
        if n_ctx <= ctx_init_words(words):
            with torch.no_grad():
                embedding = token_embedding(tokens.to(token_embedding.weight.device))
            return embedding[0, 1:1 + n_ctx].float().clone(), words
    return None, " ".join(["X"] * n_ctx)


def class_token_ids(prompt_prefix: str, classnames: Sequence[str], n_ctx_key: str, n_ctx: int) -> Tensor:
    """[C, 77] token ids of "<prompt prefix> <class name>."."""
    prompts = [f"{prompt_prefix} {readable_name(c)}." for c in classnames]
    try:
        return clip_api.tokenize(prompts)
    except RuntimeError as err:
        raise ConfigError(f"a class prompt does not fit CLIP's 77 tokens with {n_ctx_key}={n_ctx}: {err}") from err


def normalize(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)
