#!/usr/bin/env bash
# The GPU check, in one go (< 8 minutes on one GPU): the parity suite's GPU-relevant subset, then
# ResNeXt-50 bf16 training images/s vs PyTorch AMP channels_last, inference of every model, and
# DCNv2 forward+backward vs torch_ref. Run from the repository root on a machine with a CUDA GPU
# and a CUDA build of jax (pip install -U "jax[cuda12]") and of torch==2.13.0:
#     bash bench/gpu.sh 2>&1 | tee gpu.log
# On GPU every convolution is lax's (cuDNN): tests/parity_tests check that the accelerator path
# keeps feature_group_count, and these numbers measure cuDNN through XLA against torch's cuDNN.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
$PY -c "import jax; assert jax.default_backend() == 'gpu', jax.devices(); print(jax.devices())"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# parity on the GPU: the op grid (fp32 and bf16), every model's eval logits and feature maps,
# deformable conv against the oracle and torch_ref, the lowering's accelerator path
timeout 240 $PY -m pytest -q -x -p no:cacheprovider parity_tests/test_ops.py \
    parity_tests/test_deform.py -k "not bounded_memory" \
    "parity_tests/test_models.py::test_eval_logits_and_feature_maps_small_input" \
    "parity_tests/test_lowering.py::test_gpu_and_tpu_keep_lax_convolutions"
# ResNeXt-50 bf16 training throughput, jaxconv vs torch AMP channels_last
timeout 120 $PY -m bench train --model resnext50_32x4d --batch 64 --steps 10 --dtype bfloat16 \
    --device cuda
# inference of every model, and DCNv2 forward + backward
timeout 90 $PY - <<'PYEOF'
import time, numpy as np, jax, jax.numpy as jnp, torch
from flax import nnx
import torch_ref
from jaxconv.models import create_model, input_size, list_models
for name in list_models():
    s = input_size(name); x = np.random.default_rng(0).standard_normal((32, s, s, 3)).astype(np.float32)
    m = create_model(name, dtype=jnp.bfloat16); m.eval()
    f = nnx.jit(lambda m, x: m(x)); xj = jnp.asarray(x); f(m, xj).block_until_ready()
    t = time.perf_counter(); [f(m, xj).block_until_ready() for _ in range(10)]; tj = (time.perf_counter() - t) / 10
    tm = torch_ref.create_model(name).cuda().eval().to(memory_format=torch.channels_last)
    xt = torch.tensor(x.transpose(0, 3, 1, 2)).cuda().contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        tm(xt); torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(10): tm(xt)
        torch.cuda.synchronize(); tt = (time.perf_counter() - t) / 10
    print(f"inference bf16 batch 32 {name}: jaxconv {tj*1e3:.1f} ms, torch {tt*1e3:.1f} ms, ratio {tj/tt:.2f}", flush=True)
PYEOF
timeout 60 $PY -m bench deform --repeats 5
