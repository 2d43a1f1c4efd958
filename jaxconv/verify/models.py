"""Whole-model verification of a registered model: its torch_ref twin (seeded random init or a
user's checkpoint) against the jaxconv model with the same weights, through `compare`: every
layer in eval mode, then one train-mode step's BatchNorm running statistics."""
from __future__ import annotations

import numpy as np


def verify_model(name: str, *, checkpoint=None, dtype: str = "float32", size: int | None = None,
                 batch: int = 4, num_classes: int = 1000, seed: int = 0, float64: bool = False,
                 out=print) -> bool:
    """Print the comparison for one model; True when every check passes. bfloat16 (jaxconv
    in bf16 against torch in fp32) passes on top-1 agreement of every sample. The train-mode
    check runs on a batch of at least 2 (torch's BatchNorm needs two values per channel)."""
    import jax.numpy as jnp
    import torch

    import torch_ref
    from jaxconv.convert import load_checkpoint
    from jaxconv.models.registry import create_model, spec
    from jaxconv.verify import compare

    s = spec(name)   # one error message for unknown names, and aliases accepted
    torch.manual_seed(seed)
    tmodel = torch_ref.create_model(s.name, num_classes=num_classes)
    if checkpoint is not None:
        state = {k: torch.from_numpy(np.array(v)) for k, v in load_checkpoint(checkpoint).items()}
        tmodel.load_state_dict(state, strict=True)
    size = size or s.input_size
    x = np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)
    source = checkpoint or f"random init (seed {seed})"
    out(f"verify {s.name}: {source}, input {batch}x{size}x{size}x3, jaxconv {dtype} vs torch_ref")

    def jax_model():
        return create_model(s.name, pretrained=False, num_classes=num_classes,
                            dtype=jnp.dtype(dtype))

    if dtype != "float32":   # lower precision: the same classes is what can be asked
        report = compare(tmodel, jax_model(), x)
        out(str(report))
        ok = report.top1 is not None and report.top1[0] == batch
        out(f"{'PASS' if ok else 'FAIL'}: {dtype} top-1 agreement {report.top1}\n")
        return ok
    report = compare(tmodel, jax_model(), x, float64=float64)
    out(str(report))
    xt = x if batch >= 2 else np.concatenate([x, x[::-1] * 0.5])
    train = compare(tmodel, jax_model(), xt, train=True, float64=float64)
    out("\n".join(line for line in str(train).splitlines()[2:]
                  if line.startswith(("-- BatchNorm", "unpaired")) or "running_" in line))
    ok = report.passed and all(not r.failed for r in train.bn_stats)
    out(f"{'PASS' if ok else 'FAIL'}: every layer and the logits within their bounds, BN "
        f"statistics after a train-mode step too: {ok}\n")
    return ok
