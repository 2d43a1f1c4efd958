"""Whole-model verification: a torch_ref model (random init or a user's checkpoint) converted to
jaxconv and run on the same inputs; per-stage errors, logits error, top-1 / top-5 agreement and
BatchNorm running statistics after a train-mode step."""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxconv.verify import BN_STATS, MODEL_LOGITS_ATOL, excess


def _agreement(a: np.ndarray, b: np.ndarray, k: int) -> int:
    """Samples whose top-k class sets are equal."""
    top = lambda v: np.sort(np.argsort(-v, axis=-1)[:, :k], axis=-1)  # noqa: E731
    return int(np.sum(np.all(top(a) == top(b), axis=-1)))


def verify_model(name: str, *, checkpoint=None, dtype: str = "float32", size: int | None = None,
                 batch: int = 4, num_classes: int = 1000, seed: int = 0, out=print) -> bool:
    """Print the comparison table for one model; True when every check passes.

    fp32 passes with logits within MODEL_LOGITS_ATOL and BN statistics within BN_STATS; bf16
    (jaxconv in bf16 against torch in fp32) passes on top-1 agreement of every sample.
    """
    import torch

    import torch_ref
    from jaxconv.convert import from_torch, load_checkpoint, to_torch
    from jaxconv.models import create_model, input_size
    from jaxconv.models.registry import resolve

    name = resolve(name)  # one error message for unknown names, and aliases accepted
    torch.manual_seed(seed)
    tmodel = torch_ref.create_model(name, num_classes=num_classes)
    if checkpoint is not None:
        state = {k: torch.from_numpy(np.array(v)) for k, v in load_checkpoint(checkpoint).items()}
        tmodel.load_state_dict(state, strict=True)
    jmodel = from_torch(create_model(name, num_classes=num_classes, dtype=jnp.dtype(dtype)),
                        tmodel.state_dict())
    size = size or input_size(name)
    x = np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

    tmodel.eval()
    jmodel.eval()
    with torch.no_grad():
        tfeats, tlogits = tmodel.feature_maps(xt), tmodel(xt).numpy()
    jfeats = nnx.jit(lambda m, v: m.feature_maps(v))(jmodel, x)
    jlogits = np.asarray(nnx.jit(lambda m, v: m(v))(jmodel, x), np.float32)

    source = checkpoint or f"random init (seed {seed})"
    out(f"verify {name}: {source}, input {batch}x{size}x{size}x3, jaxconv {dtype} vs torch_ref "
        f"float32, {jax.default_backend()}")
    out(f"{'stage':<16} {'shape (NHWC)':<22} {'max abs err':>12} {'max rel err':>12}")
    for stage, t in tfeats.items():
        ref = t.numpy().transpose(0, 2, 3, 1)
        err = float(np.max(np.abs(np.asarray(jfeats[stage], np.float32) - ref)))
        out(f"{stage:<16} {str(ref.shape):<22} {err:12.2e} {err / max(np.abs(ref).max(), 1e-30):12.2e}")
    logits_err = float(np.max(np.abs(jlogits - tlogits)))
    out(f"{'logits':<16} {str(tlogits.shape):<22} {logits_err:12.2e} "
        f"{logits_err / max(np.abs(tlogits).max(), 1e-30):12.2e}")
    top1, top5 = _agreement(jlogits, tlogits, 1), _agreement(jlogits, tlogits, 5)
    out(f"top-1 agreement {top1}/{batch}, top-5 agreement {top5}/{batch}")

    # One train-mode forward on both: BN running statistics must move identically. Deep layers
    # with few values per channel amplify fp32 rounding in the batch variance, so the reference
    # is torch_ref in float64; jaxconv passes within the bound or within 2x torch's own fp32 error.
    t64 = copy.deepcopy(tmodel).double().train()
    tmodel.train()
    jmodel.train()
    with torch.no_grad():
        tmodel(xt)
        t64(xt.double())
    nnx.jit(lambda m, v: m(v))(jmodel, x)
    t32, t64s, jstate = tmodel.state_dict(), t64.state_dict(), to_torch(jmodel)
    bn_keys = [k for k in t32 if k.endswith(("running_mean", "running_var"))]
    bn_err = bn_torch_err = 0.0
    bn_ok = True
    for k in bn_keys:
        ref = t64s[k].numpy()
        err, torch_err = np.abs(jstate[k] - ref).max(), np.abs(t32[k].numpy() - ref).max()
        bn_err, bn_torch_err = max(bn_err, float(err)), max(bn_torch_err, float(torch_err))
        bn_ok &= bool(excess(jstate[k], ref, BN_STATS, BN_STATS) <= 1 or err <= 2 * torch_err)
    out(f"BN running statistics after one train-mode step, vs torch_ref in float64: max abs err "
        f"jaxconv {bn_err:.2e}, torch_ref float32 {bn_torch_err:.2e}")

    if dtype == "float32":
        ok = logits_err <= MODEL_LOGITS_ATOL and bn_ok
        out(f"{'PASS' if ok else 'FAIL'}: logits {logits_err:.2e} (bound {MODEL_LOGITS_ATOL:g} abs); "
            f"BN statistics within {BN_STATS:g} abs + rel or 2x torch's own error: {bn_ok}\n")
    else:
        ok = top1 == batch
        out(f"{'PASS' if ok else 'FAIL'}: {dtype} top-1 agreement {top1}/{batch} (bound: all)\n")
    return ok
