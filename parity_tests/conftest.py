"""Parity runs at full fp32 matmul precision on both sides (DESIGN.md, Precision).

torch is imported unconditionally: without it the parity suite must fail, never skip.
"""
import jax
import torch

jax.config.update("jax_default_matmul_precision", "highest")
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
