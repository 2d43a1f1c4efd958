"""The one tolerance table of DESIGN.md; every parity check reads its bound from here."""
OP_FP32 = dict(atol=1e-5, rtol=1e-5)  # op forward and op gradients, fp32
OP_BF16_RTOL = 2e-2  # op forward in bf16, relative to the output's scale
DEFORM_FP64 = 1e-10  # deformable conv vs the float64 loop oracle
MODEL_LOGITS_ATOL = 1e-4  # model eval logits vs torch_ref
BN_STATS = 1e-5  # BatchNorm running statistics after a train step
