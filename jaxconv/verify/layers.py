"""Cross-framework verification of any port: `compare(torch_module, nnx_module, *inputs)` runs
both on the same inputs, captures every submodule's output on both sides, pairs them by path
(torch's ``named_modules()`` name = the NNX attribute path, as the conversion rule table
assumes) and reports, in execution order, where they agree, where the first disagreement is,
and what the output, BatchNorm statistics and gradients do.

Bounds scale with each output and with torch's own float32 error: a layer passes when its error
is within ``atol * max(1, scale)`` (the tolerance table's MODEL_LOGITS_ATOL by default) or
within NOISE_FACTOR x the distance of torch's float32 output from torch in float64 on the same
input. A layer whose reference has vanished (max |value| < VANISHED) is reported as not tested
when the port's output is within the bound of it too (else it fails).
With ``float64=True`` both sides run in float64 and the bound is FP64_RTOL of the scale, which
separates a real bug from float32 rounding.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxconv.nn.hooks import recording
from jaxconv.verify import MODEL_LOGITS_ATOL

NOISE_FACTOR = 3.0    # jaxconv may be this many times torch's own float32 error from float64
VANISHED = 1e-10      # a reference below this is no signal to compare
FP64_RTOL = 1e-9      # float64 mode: error bound relative to the output's scale


@dataclasses.dataclass
class Row:
    """One compared output: a layer (by path), the model's output, a BN statistic or a gradient."""
    path: str
    kind: str
    shape: tuple
    max_abs: float
    max_rel: float
    bound: float
    status: str          # "pass", "FAIL", "not tested", "shape mismatch"

    @property
    def failed(self) -> bool:
        return self.status in ("FAIL", "shape mismatch")


@dataclasses.dataclass
class Report:
    layers: list
    outputs: list
    bn_stats: list
    grads: list
    unpaired_torch: list
    unpaired_jax: list
    top1: tuple | None = None     # (agreeing samples, samples)
    top5: tuple | None = None
    mode: str = "eval, float32"
    error: str | None = None      # what the jaxconv side raised, if it did not run through

    @property
    def first_failure(self) -> str | None:
        """The path of the first layer (in execution order) that fails, or None."""
        return next((r.path for r in self.layers if r.failed), None)

    @property
    def passed(self) -> bool:
        rows = self.layers + self.outputs + self.bn_stats + self.grads
        return self.error is None and not any(r.failed for r in rows)

    def to_json(self) -> str:
        return json.dumps({"passed": self.passed, "first_failure": self.first_failure,
                           "mode": self.mode, "error": self.error, "top1": self.top1,
                           "top5": self.top5,
                           **{k: [dataclasses.asdict(r) for r in getattr(self, k)]
                              for k in ("layers", "outputs", "bn_stats", "grads")},
                           "unpaired_torch": self.unpaired_torch, "unpaired_jax": self.unpaired_jax},
                          indent=1)

    def __str__(self) -> str:
        width = max([len(r.path) for r in self.layers + self.outputs + self.bn_stats + self.grads]
                    + [5])
        lines = [f"compare ({self.mode}): {'PASS' if self.passed else 'FAIL'}; first failing "
                 f"layer: {self.first_failure or 'none'}",
                 f"{'layer':<{width}}  {'type':<22} {'shape':<20} {'max abs':>10} {'max rel':>10} "
                 f"{'bound':>10}  result"]
        for title, rows in (("", self.layers), ("output", self.outputs),
                            ("BatchNorm running statistics after the step", self.bn_stats),
                            ("parameter gradients", self.grads)):
            if title and rows:
                lines.append(f"-- {title}")
            lines += [f"{r.path:<{width}}  {r.kind:<22} {str(r.shape):<20} {r.max_abs:10.2e} "
                      f"{r.max_rel:10.2e} {r.bound:10.2e}  {r.status}" for r in rows]
        if self.error:
            lines.append(f"the jaxconv module raised {self.error} (compared up to there)")
        if self.top1:
            lines.append(f"top-1 agreement {self.top1[0]}/{self.top1[1]}, top-5 agreement "
                         f"{self.top5[0]}/{self.top5[1]}")
        for side, names in (("torch", self.unpaired_torch), ("jaxconv", self.unpaired_jax)):
            if names:
                lines.append(f"unpaired {side} modules ({len(names)}): {', '.join(names[:12])}"
                             + (" ..." if len(names) > 12 else ""))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- capture

def _torch_outputs(module, inputs):
    """(output, {path: [outputs in call order]}, [paths in completion order]) of a torch run."""
    import torch
    records, order, handles = {}, [], []
    for name, m in module.named_modules():
        if not name:
            continue

        def hook(_, __, out, name=name):
            records.setdefault(name, []).append(out)
            order.append(name)
        handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = module(*inputs)
    finally:
        for h in handles:
            h.remove()
    return out, records, order


def _nnx_hooks(model, records, order):
    """Record every submodule's output (by its attribute path) while `model` runs."""
    paths = {id(node): ".".join(map(str, path)) for path, node in nnx.iter_graph(model)
             if path and isinstance(node, nnx.Module)}
    # the classes that define the __call__ each module runs (a subclass inherits the wrapper)
    classes = {next(c for c in type(n).__mro__ if "__call__" in c.__dict__)
               for _, n in nnx.iter_graph(model) if isinstance(n, nnx.Module)}

    def hook(module, args, out):
        path = paths.get(id(module))
        if path is not None:
            records.setdefault(path, []).append(out)
            order.append(path)

    return recording(classes, hook)


def _nnx_outputs(model, inputs):
    """(output, {path: [outputs]}, [paths in completion order], error): compiled; if the port
    raises (a shape that does not fit, say), it runs again eagerly up to the error, so that the
    layers before it are still compared."""
    records, order = {}, []

    def run(model, *xs):
        records.clear()
        order.clear()
        with _nnx_hooks(model, records, order):
            out = model(*xs)
        return out, records

    try:
        out, recs = nnx.jit(run)(model, *inputs)
        return out, dict(recs), list(order), None
    except Exception as e:  # noqa: BLE001 (whatever the port raises is reported)
        try:
            run(nnx.clone(model), *inputs)
        except Exception:  # noqa: BLE001
            pass
        return None, dict(records), list(order), f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


# ---------------------------------------------------------------------------------- compare

def _to_numpy(a):
    if hasattr(a, "detach"):
        a = a.detach().cpu()
        a = a.float() if str(a.dtype) == "torch.bfloat16" else a
        return a.numpy()
    return np.asarray(a)


def _leaves(tree):
    """Array leaves of an output (tensors, dicts of heads, lists of maps), in order."""
    if isinstance(tree, dict):
        return [leaf for k in tree for leaf in _leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [leaf for t in tree for leaf in _leaves(t)]
    return [tree] if hasattr(tree, "shape") else []


def _nhwc(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def _row(path, kind, ours, ref, ref64, atol, float64) -> Row:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return Row(path, kind, tuple(ref.shape), float("nan"), float("nan"), 0.0,
                   "shape mismatch")
    if ref.size == 0:
        return Row(path, kind, tuple(ref.shape), 0.0, 0.0, 0.0, "not tested")
    err = float(np.max(np.abs(ours - ref)))
    scale = float(np.max(np.abs(ref64 if ref64 is not None else ref)))
    if float64:
        bound = FP64_RTOL * max(1.0, scale)
    else:
        own = float(np.max(np.abs(ref - np.asarray(ref64, np.float64)))) if ref64 is not None else 0.0
        bound = max(atol * max(1.0, scale), NOISE_FACTOR * own)
    # a vanished reference cannot test a relative error, but a port far from it still fails
    status = "FAIL" if err > bound else "not tested" if scale < VANISHED else "pass"
    return Row(path, kind, tuple(ours.shape), err, err / max(scale, 1e-300), bound, status)


def _unpaired(path, kind, shape, status: str) -> Row:
    """A failed row for something with nothing to compare it to on the other side."""
    return Row(path, kind, shape, float("nan"), float("nan"), 0.0, status)


def _count_mismatch(path, kind, n_torch: int, n_port: int) -> Row:
    """The port returns another number of arrays than torch (a head left out)."""
    return _unpaired(f"{path} ({n_torch} arrays in torch, {n_port} in the port)", kind, (n_port,),
                     "shape mismatch")


def _inputs(inputs, dtype):
    """(torch inputs NCHW, jax inputs NHWC): numpy / jax arrays are taken as NHWC, torch
    tensors as NCHW; other ranks as they are."""
    import torch
    tin, jin = [], []
    for x in inputs:
        if hasattr(x, "detach"):
            a = _to_numpy(x)
            tin.append(torch.tensor(a, dtype=dtype))
            jin.append(_nhwc(a))
        else:
            a = np.asarray(x)
            tin.append(torch.tensor(a.transpose(0, 3, 1, 2) if a.ndim == 4 else a, dtype=dtype))
            jin.append(a)
    return tin, jin


def compare(torch_module, nnx_module, *inputs, load_weights: bool = True, train: bool = False,
            grads: bool = False, atol: float | None = None, float64: bool = False,
            seed: int = 0) -> Report:
    """Compare `nnx_module` (a port) with `torch_module` on `inputs` layer by layer.

    `load_weights`: first copy the torch weights into the NNX module with the conversion rule
    table (strict; False when you loaded your own). Inputs: NHWC arrays (the torch side gets
    NCHW) or NCHW torch tensors. `train`: both in train mode (BatchNorm batch statistics, the
    running statistics compared after the step; dropout is not made equal: set its rate to 0).
    `grads`: also every parameter's gradient of sum(output * a fixed random cotangent).
    `atol`: the absolute bound at unit scale (default MODEL_LOGITS_ATOL). `float64`: run both
    sides in float64 (the NNX module's parameters and compute cast). The modules are not
    modified beyond the weight copy (train-mode statistics are updated on copies)."""
    with jax.enable_x64(True) if float64 else contextlib.nullcontext():
        return _compare(torch_module, nnx_module, inputs, load_weights, train, grads, atol,
                        float64, seed)


def _compare(torch_module, nnx_module, inputs, load_weights, train, grads, atol, float64,
             seed) -> Report:
    import torch

    from jaxconv.convert import from_torch, to_torch
    atol = MODEL_LOGITS_ATOL if atol is None else atol
    tdtype = torch.float64 if float64 else torch.float32
    tmod = copy.deepcopy(torch_module).to(tdtype)
    if load_weights:
        from_torch(nnx_module, torch_module.state_dict())
    jmod = nnx.clone(nnx_module)
    if float64:
        jmod = _cast(jmod, jnp.float64)
    tmod.train(train)
    jmod.train() if train else jmod.eval()
    tin, jin = _inputs(inputs, tdtype)
    jin = [jnp.asarray(a, jnp.float64 if float64 else jnp.float32) for a in jin]

    t_out, t_rec, _ = _torch_outputs(tmod, tin)
    t64_rec, t64_out = {}, None
    if not float64:   # torch's own float32 error, the noise floor of every bound
        t64 = copy.deepcopy(torch_module).double().train(train)
        t64_out, t64_rec, _ = _torch_outputs(t64, [t.double() for t in tin])
    j_out, j_rec, j_order, error = _nnx_outputs(jmod, jin)

    layers, seen = [], set()
    for path in j_order:
        if path in seen or path not in t_rec:
            continue
        seen.add(path)
        for call, (jo, to) in enumerate(zip(j_rec[path], t_rec[path])):
            tl, jl = _leaves(to), _leaves(jo)
            t64l = _leaves(t64_rec[path][call]) if path in t64_rec else [None] * len(tl)
            if len(jl) != len(tl):
                layers.append(_count_mismatch(path, type(_module(tmod, path)).__name__, len(tl),
                                              len(jl)))
            for i, (a, b, b64) in enumerate(zip(jl, tl, t64l)):
                name = path + (f"[{call}]" if len(t_rec[path]) > 1 else "") + \
                    (f"#{i}" if len(tl) > 1 else "")
                layers.append(_row(name, type(_module(tmod, path)).__name__, np.asarray(a),
                                   _nhwc(_to_numpy(b)), None if b64 is None else _nhwc(_to_numpy(b64)),
                                   atol, float64))
    unpaired_torch = sorted(set(t_rec) - set(j_rec))
    unpaired_jax = sorted(set(j_rec) - set(t_rec))

    outputs = []
    t_leaves, j_leaves = _leaves(t_out), _leaves(j_out)
    t64_leaves = _leaves(t64_out) if t64_out is not None else [None] * len(t_leaves)
    if len(j_leaves) != len(t_leaves):
        outputs.append(_count_mismatch("output", "output", len(t_leaves), len(j_leaves)))
    for i, (a, b, b64) in enumerate(zip(j_leaves, t_leaves, t64_leaves)):
        outputs.append(_row(f"output#{i}" if len(t_leaves) > 1 else "output", "output", np.asarray(a),
                            _nhwc(_to_numpy(b)), None if b64 is None else _nhwc(_to_numpy(b64)),
                            atol, float64))
    report = Report(layers, outputs, [], [], unpaired_torch, unpaired_jax,
                    mode=f"{'train' if train else 'eval'}, {'float64' if float64 else 'float32'}",
                    error=error)
    if error:   # the port did not run through: what was compared up to there is the report
        return report
    logits = j_leaves[0] if j_leaves else None
    if logits is not None and logits.ndim == 2 and logits.shape[-1] > 1:
        a, b = np.asarray(logits), _to_numpy(t_leaves[0])
        report.top1 = (_agree(a, b, 1), len(a))
        report.top5 = (_agree(a, b, min(5, a.shape[-1])), len(a))

    if train:   # the running statistics the step left behind
        jstate, tstate = to_torch(jmod), tmod.state_dict()
        t64state = t64.state_dict() if not float64 else {}
        for k, v in tstate.items():
            if k.endswith(("running_mean", "running_var")) and k in jstate:
                report.bn_stats.append(_row(k, "BatchNorm statistic", jstate[k], _to_numpy(v),
                                            _to_numpy(t64state[k]) if k in t64state else None,
                                            atol, float64))
    if grads:
        report.grads = _grad_rows(tmod, jmod, tin, jin, torch_module, train, atol, float64, seed)
    return report


def _module(root, path):
    for part in path.split("."):
        root = getattr(root, part) if not part.isdigit() else root[int(part)]
    return root


def _agree(a, b, k) -> int:
    top = lambda v: np.sort(np.argsort(-v, axis=-1)[:, :k], axis=-1)  # noqa: E731
    return int(np.sum(np.all(top(a) == top(b), axis=-1)))


def _cast(model, dtype):
    """A copy of `model` with floating parameters and statistics in `dtype`, computing in it."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                         state)
    model = nnx.merge(graphdef, state)
    for _, m in nnx.iter_graph(model):
        if isinstance(m, nnx.Module) and hasattr(m, "dtype") and getattr(m, "dtype", None) is not None:
            m.dtype = dtype
    return model


def _grad_rows(tmod, jmod, tin, jin, torch_module, train, atol, float64, seed):
    """Every parameter's gradient of sum(output * cotangent), both sides (and torch float64)."""
    import torch

    from jaxconv.convert import to_torch

    def torch_grads(module, inputs):
        module = copy.deepcopy(module).train(train)
        module.zero_grad()
        leaves = _leaves(module(*inputs))
        rng = np.random.default_rng(seed)
        cots = [torch.tensor(rng.standard_normal(t.shape), dtype=t.dtype) for t in leaves]
        sum((t * c).sum() for t, c in zip(leaves, cots)).backward()
        return {k: _to_numpy(p.grad) for k, p in module.named_parameters() if p.grad is not None}, cots

    tg, cots = torch_grads(tmod, tin)
    tg64 = None if float64 else torch_grads(copy.deepcopy(torch_module).double(),
                                            [t.double() for t in tin])[0]
    j_cots = [jnp.asarray(_nhwc(_to_numpy(c))) for c in cots]

    def loss(m, *xs):
        return sum(jnp.sum(o * c) for o, c in zip(_leaves(m(*xs)), j_cots))

    g = nnx.grad(loss)(jmod, *jin)
    holder = nnx.clone(jmod)
    nnx.update(holder, g)
    jg = to_torch(holder)
    # a parameter torch has and the port lacks (possible with load_weights=False) fails
    return [_row(k, "gradient", jg[k], v, None if tg64 is None else tg64[k], atol, float64)
            if k in jg else _unpaired(f"{k} (not a parameter of the port)", "gradient",
                                      tuple(v.shape), "FAIL")
            for k, v in tg.items()]
