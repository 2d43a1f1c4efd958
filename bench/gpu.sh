#!/usr/bin/env bash
# The GPU check, in one go: the parity suite's GPU-relevant subset, then
# ResNeXt-50 bf16 training images/s vs PyTorch AMP channels_last, inference of every model, and
# DCNv2 forward+backward vs torch_ref. Run from the repository root on a machine with a CUDA GPU
# and a CUDA build of jax (pip install -U "jax[cuda12]") and of torch==2.13.0:
#     bash bench/gpu.sh 2>&1 | tee gpu.log
# On GPU every convolution is lax's (cuDNN): tests/parity_tests check that the accelerator path
# keeps feature_group_count, and these numbers measure cuDNN through XLA against torch's cuDNN.
# The parts' time limits add up to 8 minutes (120 + 100 + 200 + 60 s). On an H200 the first
# inference call of a model took 73 s (compile and autotuning; BENCHMARKS.md, GPU (H200)), so the
# inference part does not reach all nine models there: GPU_MODELS=googlenet,resnext50_32x4d (a
# comma-separated list) picks some. A part that fails is named and the others still run; the
# script exits 1 if any part failed, else 2 if any ran out of time (its results are partial).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
$PY -c "import jax, flax, torch; assert jax.default_backend() == 'gpu', jax.devices()
print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, jax.devices())" || exit 1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
failed=() timed_out=()
part() {
    local name=$1 rc=0; shift; echo "## $name"; "$@" || rc=$?
    if [ $rc -eq 124 ]; then echo "## TIMED OUT: $name (partial)"; timed_out+=("$name")
    elif [ $rc -ne 0 ]; then echo "## FAILED: $name (exit $rc)"; failed+=("$name"); fi
}
# parity on the GPU: the op grid (fp32 and bf16), every model's eval logits and feature maps,
# deformable conv against the oracle and torch_ref, the lowering's accelerator path (not the
# tests of the CPU engines, which run on CPU only)
part parity env OMP_NUM_THREADS=2 timeout 120 $PY -m pytest -q -n 8 -p no:cacheprovider parity_tests/test_ops.py \
    parity_tests/test_deform.py -k "not bounded_memory and not on_onednn" \
    "parity_tests/test_models.py::test_eval_logits_and_feature_maps_small_input" \
    "parity_tests/test_lowering.py::test_gpu_and_tpu_keep_lax_convolutions"
# ResNeXt-50 bf16 training throughput, jaxconv vs torch AMP channels_last
part train timeout 100 $PY -m bench train --model resnext50_32x4d --batch 64 --steps 10 \
    --dtype bfloat16 --device cuda
# inference of every model (or $GPU_MODELS), and DCNv2 forward + backward
part inference timeout 200 $PY - <<'PYEOF'
import os, time, numpy as np, jax, jax.numpy as jnp, torch
from flax import nnx
import torch_ref
from bench.conv import _interleaved
from jaxconv.models import create_model, input_size, list_models

names = os.environ["GPU_MODELS"].split(",") if os.environ.get("GPU_MODELS") else list_models()
for name in names:
    s = input_size(name); x = np.random.default_rng(0).standard_normal((32, s, s, 3)).astype(np.float32)
    m = create_model(name, dtype=jnp.bfloat16); m.eval()
    graphdef, state = nnx.split(m)
    f = jax.jit(lambda state, x, g=graphdef: nnx.merge(g, state)(x)); xj = jnp.asarray(x)
    t = time.perf_counter(); f(state, xj).block_until_ready(); compile_s = time.perf_counter() - t
    tm = torch_ref.create_model(name).cuda().eval().to(memory_format=torch.channels_last)
    xt = torch.tensor(x.transpose(0, 3, 1, 2)).cuda().contiguous(memory_format=torch.channels_last)

    def torch_call():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            tm(xt)
        torch.cuda.synchronize()
    r = _interleaved({"jax": lambda: f(state, xj).block_until_ready(), "torch": torch_call}, 20)
    tj, tt = 1e3 * r["jax"][1], 1e3 * r["torch"][1]   # medians
    print(f"inference bf16 batch 32 {name}: jaxconv {tj:.2f} ms (first call {compile_s:.0f} s), "
          f"torch {tt:.2f} ms, ratio {tj / tt:.2f}", flush=True)
PYEOF
part deform timeout 60 $PY -m bench deform --repeats 5 --device cuda
[ ${#failed[@]} -eq 0 ] || { echo "## gpu.sh: failed parts: ${failed[*]}"; exit 1; }
[ ${#timed_out[@]} -eq 0 ] || { echo "## gpu.sh: parts out of time (partial): ${timed_out[*]}"; exit 2; }
