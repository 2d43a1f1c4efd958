"""Parity runs at full fp32 matmul precision on both sides (DESIGN.md, Precision)."""
import jax
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the [torch] extra")

jax.config.update("jax_default_matmul_precision", "highest")
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
