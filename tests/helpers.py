"""Helpers shared by the test files (fixtures live in conftest.py)."""
import torch

# Half-precision error, measured as a multiple of the dtype's resolution (torch.finfo(dtype).eps)
# times the magnitude compared: a feature that went through a few layers in fp16/bf16 carries a
# relative error of about 1-1.5 eps on every CPU kernel set measured (AVX-512, AVX2, default),
# so 4 eps leaves a margin of about 3 without hiding an error of the size a bug makes (a wrong
# cast or a lost prompt moves features by tens of eps).
HALF_EPS_FACTOR = 4.0


def half_tolerance(dtype: torch.dtype, magnitude: float) -> float:
    """Largest acceptable |low - fp32| for values of size `magnitude` computed in `dtype`.

    For relative errors pass magnitude 1. For logits pass the logit scale (exp(logit_scale)):
    a logit is scale * cos(image, text), and the features' relative error enters through the
    cosine, so the error is bounded by scale * (a few eps) whatever the logits' own range.
    """
    return HALF_EPS_FACTOR * torch.finfo(dtype).eps * magnitude
