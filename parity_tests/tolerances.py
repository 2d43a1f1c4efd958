"""DESIGN.md's tolerance table; the single definition lives in jaxconv.verify (the CLI uses it too)."""
from jaxconv.verify import BN_STATS, DEFORM_FP64, MODEL_LOGITS_ATOL, OP_BF16_RTOL, OP_FP32  # noqa: F401
