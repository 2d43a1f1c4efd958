"""The op grid: every conv / pool op of jaxconv.ops on odd configurations, against
torch.nn.functional, forward and gradients. `python -m jaxconv.verify --ops` prints it as a
table; parity_tests/test_ops.py asserts every case.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxconv import ops
from jaxconv.verify import OP_BF16_RTOL, OP_FP32, Result, excess, nchw, oihw


@dataclasses.dataclass
class OpCase:
    """One configuration: `x` is the NHWC input shape, `weight` the torch-layout weight shape
    (OIHW; (C_in, C_out/groups, kh, kw) for transposed convs), `kwargs` torch's arguments."""
    op: str
    x: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    weight: tuple | None = None
    bias: bool = False
    dtype: str = "float32"

    @property
    def id(self) -> str:
        parts = [self.op, "x" + str(self.x)] + (["w" + str(self.weight)] if self.weight else [])
        parts += [f"{k}={v}" for k, v in self.kwargs.items()]
        parts += [self.dtype] if self.dtype != "float32" else []
        return " ".join(p.replace(" ", "") for p in parts)


def _conv(x, w, **kw):
    return OpCase("conv2d", x, kw, w, bias=True)


def _tconv(x, w, **kw):
    return OpCase("conv_transpose2d", x, kw, w, bias=True)


CONV2D = [
    _conv((3, 9, 7, 4), (8, 4, 3, 3), padding=1),                                  # standard
    _conv((3, 9, 7, 4), (6, 4, 1, 1)),                                             # pointwise
    _conv((3, 9, 7, 4), (6, 4, 3, 2), stride=(2, 1), padding=(1, 0)),              # asym kernel
    _conv((3, 9, 7, 4), (5, 4, 3, 3), dilation=(2, 1), padding=(2, 1)),            # dilated
    _conv((3, 8, 9, 4), (6, 2, 1, 3), padding=(0, 1), groups=2),                   # grouped 1xk
    _conv((3, 9, 8, 8), (8, 2, 3, 1), stride=2, groups=4),                         # groups 4, kx1
    _conv((3, 9, 7, 4), (4, 1, 3, 3), padding=1, groups=4),                        # depthwise
    _conv((3, 9, 7, 4), (8, 1, 3, 2), stride=(2, 1), dilation=(1, 2), groups=4),   # depth mult 2
    _conv((3, 9, 7, 4), (6, 2, 3, 3), padding="same", dilation=(2, 1), groups=2),  # 'same'
    _conv((3, 9, 7, 4), (6, 4, 3, 2), padding="valid"),
    _conv((3, 9, 7, 4), (6, 2, 3, 3), padding=(1, 2), groups=2, padding_mode="reflect"),
    _conv((3, 9, 7, 4), (6, 4, 3, 2), padding=(2, 1), padding_mode="replicate"),
    _conv((3, 9, 7, 4), (6, 4, 3, 3), stride=2, padding=1, padding_mode="circular"),
    _conv((0, 9, 7, 4), (6, 2, 3, 2), stride=(2, 1), padding=(1, 0), groups=2),    # batch 0
    _conv((1, 13, 5, 3), (4, 3, 5, 5), stride=3, padding=2),
    _conv((2, 9, 9, 4), (6, 4, 7, 1), padding=(3, 0)),                             # Inception v3 7x1
    _conv((2, 9, 9, 4), (6, 4, 1, 7), padding=(0, 3)),                             # and 1x7
]
CONV_TRANSPOSE2D = [
    _tconv((3, 5, 4, 4), (4, 6, 3, 3), stride=2, padding=1, output_padding=1),
    _tconv((3, 5, 4, 4), (4, 3, 3, 2), stride=(2, 1), padding=(1, 0), output_padding=(1, 0),
           groups=2, dilation=(1, 2)),
    _tconv((3, 5, 4, 8), (8, 1, 2, 3), stride=3, groups=4),
    _tconv((3, 5, 4, 4), (4, 5, 3, 3), dilation=2, padding=3),
    _tconv((0, 5, 4, 4), (4, 6, 3, 3), stride=2),
    _tconv((2, 5, 4, 4), (4, 6, 1, 1), stride=2),
]
POOLS = [
    OpCase("max_pool2d", (3, 9, 7, 4), dict(kernel_size=3, stride=2, ceil_mode=True)),
    OpCase("max_pool2d", (3, 9, 7, 4), dict(kernel_size=3, stride=2, padding=1)),
    OpCase("max_pool2d", (3, 9, 7, 4), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0),
                                           dilation=(2, 1), ceil_mode=True)),
    OpCase("max_pool2d", (0, 9, 7, 4), dict(kernel_size=2)),
    OpCase("avg_pool2d", (3, 9, 7, 4), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    OpCase("avg_pool2d", (3, 9, 7, 4), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True,
                                           count_include_pad=False)),
    OpCase("avg_pool2d", (3, 9, 7, 4), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0))),
    OpCase("avg_pool2d", (3, 9, 7, 4), dict(kernel_size=2, divisor_override=3)),
    # more than 25 taps: lax's reduce-window instead of strided slices
    OpCase("avg_pool2d", (2, 9, 7, 4), dict(kernel_size=(6, 5), stride=(1, 2), padding=(3, 2),
                                           ceil_mode=True, count_include_pad=False)),
    OpCase("max_pool2d", (2, 9, 7, 4), dict(kernel_size=(6, 5), stride=(1, 2), padding=(3, 2),
                                           ceil_mode=True)),
    OpCase("adaptive_avg_pool2d", (2, 14, 14, 4), dict(output_size=4)),  # GoogLeNet aux head
    OpCase("adaptive_avg_pool2d", (2, 7, 7, 4), dict(output_size=1)),
    OpCase("adaptive_avg_pool2d", (2, 9, 7, 4), dict(output_size=(4, 3))),
    OpCase("adaptive_avg_pool2d", (2, 5, 3, 4), dict(output_size=(2, None))),
]
BF16 = [dataclasses.replace(c, dtype="bfloat16") for c in (CONV2D[0], CONV2D[4], CONV2D[7],
                                                           CONV_TRANSPOSE2D[1], POOLS[4])]
CASES = CONV2D + CONV_TRANSPOSE2D + POOLS + BF16


def _torch_fn(case: OpCase):
    """The torch.nn.functional side of `case`, on NCHW tensors."""
    import torch.nn.functional as F

    kw = dict(case.kwargs)
    if case.op == "conv2d" and kw.get("padding_mode", "zeros") != "zeros":
        mode = kw.pop("padding_mode")
        ph, pw = (kw.pop("padding"),) * 2 if isinstance(kw["padding"], int) else kw.pop("padding")
        return lambda x, w, b: F.conv2d(F.pad(x, (pw, pw, ph, ph), mode=mode), w, b, **kw)
    kw.pop("padding_mode", None)
    return lambda *args: getattr(F, case.op)(*args, **kw)


def run_case(case: OpCase, seed: int = 0) -> Result:
    """Run `case` in jaxconv and torch on the same random data; forward and, in fp32, the
    gradients of every input under the same random cotangent."""
    import torch

    rng = np.random.default_rng(seed)
    args = [rng.standard_normal(case.x).astype(np.float32)]
    to_torch = [nchw]
    if case.weight is not None:
        args.append(rng.standard_normal(case.weight).astype(np.float32).transpose(2, 3, 1, 0))  # HWIO
        to_torch.append(oihw)
        if case.bias:
            out_ch = case.weight[0] if case.op == "conv2d" else case.weight[1] * case.kwargs.get("groups", 1)
            args.append(rng.standard_normal(out_ch).astype(np.float32))
            to_torch.append(lambda b: b)
    jax_fn = lambda *a: getattr(ops, case.op)(*a, **case.kwargs)  # noqa: E731
    torch_fn = _torch_fn(case)

    if case.dtype == "bfloat16":
        y = np.asarray(jax_fn(*[jnp.asarray(a, jnp.bfloat16) for a in args]), np.float32)
        ref = torch_fn(*[torch.tensor(f(a)).bfloat16() for f, a in zip(to_torch, args)])
        ref = ref.float().numpy()
        err = float(np.max(np.abs(nchw(y) - ref))) if ref.size else 0.0
        scale = float(np.max(np.abs(ref))) if ref.size else 1.0
        return Result(err, {}, err <= OP_BF16_RTOL * scale)

    targs = [torch.tensor(f(a), requires_grad=True) for f, a in zip(to_torch, args)]
    tout = torch_fn(*targs)
    y, vjp = jax.vjp(jax_fn, *[jnp.asarray(a) for a in args])
    y = nchw(np.asarray(y))
    ref = tout.detach().numpy()
    cot = rng.standard_normal(ref.shape).astype(np.float32)
    tout.backward(torch.tensor(cot))
    jgrads = vjp(jnp.asarray(cot.transpose(0, 2, 3, 1)))  # NCHW -> NHWC
    names = ["x", "weight", "bias"][:len(args)]
    grads, ok = {}, excess(y, ref, **OP_FP32) <= 1
    for name, f, jg, ta in zip(names, to_torch, jgrads, targs):
        jg, tg = f(np.asarray(jg)), ta.grad.numpy()
        grads[name] = float(np.max(np.abs(jg - tg))) if tg.size else 0.0
        ok &= excess(jg, tg, **OP_FP32) <= 1
    fwd = float(np.max(np.abs(y - ref))) if ref.size else 0.0
    return Result(fwd, grads, bool(ok))
