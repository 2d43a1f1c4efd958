"""python -m jaxconv.summary MODEL: per-layer output shape, parameters and multiply-adds.

Shapes come from jax.eval_shape (nothing is computed); multiply-adds count the conv and linear
layers per image (a conv: output positions x kh x kw x C_in/groups x C_out), which is where
the cost arguments of the papers live (a depthwise separable conv costs about
1/C_out + 1/k^2 of a standard one).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from jaxconv import nn
from jaxconv.models import create_model, input_size
from jaxconv.nn.hooks import recording

_LEAVES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def _recording(calls: list):
    """Record (module, input shape, output shape) of every leaf layer call."""
    return recording(_LEAVES, lambda m, args, out: calls.append((m, args[0].shape, out.shape)))


def _macs(layer, in_shape, out_shape) -> int:
    """Multiply-adds per image: every kernel weight meets every output (input, when transposed)
    position once."""
    if isinstance(layer, nn.Linear):
        return math.prod(out_shape[1:-1]) * layer.kernel.size
    positions = in_shape[1:3] if isinstance(layer, nn.ConvTranspose2d) else out_shape[1:3]
    return math.prod(positions) * layer.kernel.size


def summarize(model, size: int | tuple[int, int]):
    """(rows, total params, total MACs): rows are (path, type, output shape, params, MACs)."""
    h, w = (size, size) if isinstance(size, int) else size
    paths = {id(node): ".".join(map(str, path)) for path, node in nnx.iter_graph(model)}
    model.eval()
    calls = []
    with _recording(calls):
        jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32))
    rows = [(paths.get(id(layer), "?"), type(layer).__name__, tuple(out_shape[1:]),
             sum(v.size for _, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))),
             _macs(layer, in_shape, out_shape)) for layer, in_shape, out_shape in calls]
    params = sum(v.size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    return rows, params, sum(r[4] for r in rows)


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """One distinct convolution of a model, as `ops.conv2d` sees it: input (H, W, C_in) per
    image, output channels, kernel, stride, padding (torch's argument), dilation, groups."""
    in_hwc: tuple[int, int, int]
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: object
    dilation: tuple[int, int]
    groups: int

    @property
    def kind(self) -> str:
        """'depthwise', 'grouped', 'pointwise' (1x1) or 'dense'."""
        if self.groups > 1:
            return "depthwise" if self.groups == self.in_hwc[2] else "grouped"
        return "pointwise" if self.kernel_size == (1, 1) else "dense"


def conv_layers(name: str, size: int | None = None, **kwargs) -> dict[ConvLayer, list[str]]:
    """Every distinct Conv2d of registered model `name` at input `size` (default: native), in
    order of first use, with the paths of the layers that share it (nothing is computed)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: create_model(name, **kwargs)))
    size = size or input_size(name)
    calls, paths = [], {}

    def forward(state, x):
        model = nnx.merge(graphdef, state)
        model.eval()
        paths.update({id(node): ".".join(map(str, p)) for p, node in nnx.iter_graph(model)})
        with _recording(calls):
            return model(x)

    jax.eval_shape(forward, state, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    layers: dict[ConvLayer, list[str]] = {}
    for layer, in_shape, _ in calls:
        if type(layer) is nn.Conv2d:
            key = ConvLayer(tuple(in_shape[1:]), layer.out_channels, layer.kernel_size,
                            layer.stride, layer.padding, layer.dilation, layer.groups)
            layers.setdefault(key, []).append(paths.get(id(layer), "?"))
    return layers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxconv.summary", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="registered model name, e.g. resnext50_32x4d")
    p.add_argument("--size", type=int, help="input resolution (default: the model's native size)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--no-aux-logits", action="store_true", help="googlenet / inception_v3 without aux heads")
    args = p.parse_args(argv)
    kwargs = {"aux_logits": False} if args.no_aux_logits else {}
    try:
        model = create_model(args.model, num_classes=args.num_classes, **kwargs)
        size = args.size or input_size(args.model)
        rows, params, macs = summarize(model, size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    width = max(len(r[0]) for r in rows)
    print(f"{args.model} at {size}x{size} (multiply-adds per image, conv and linear layers)\n")
    print(f"{'layer':<{width}}  {'type':<16} {'output (H, W, C)':<18} {'params':>11} {'MACs':>15}")
    for path, kind, shape, n, m in rows:
        print(f"{path:<{width}}  {kind:<16} {str(shape):<18} {n:>11,} {m:>15,}")
    print(f"\ntotal parameters: {params:,} (BatchNorm included)\n"
          f"total multiply-adds: {macs:,} ({macs / 1e9:.2f} GMACs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
