"""Pure functions on arrays: NHWC activations, HWIO kernels, torch-style arguments."""
from jaxconv.ops.barrier import fusion_barrier
from jaxconv.ops.conv import conv2d, conv_transpose2d
from jaxconv.ops.deform import deform_conv2d
from jaxconv.ops.norm import batch_norm_train
from jaxconv.ops.pool import adaptive_avg_pool2d, avg_pool2d, max_pool2d

__all__ = ["conv2d", "conv_transpose2d", "deform_conv2d", "max_pool2d", "avg_pool2d",
           "adaptive_avg_pool2d", "batch_norm_train", "fusion_barrier"]
