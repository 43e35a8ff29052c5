"""Triton kernels for the Beagle draft layer, each beside a plain PyTorch reference.

The kernels take tensors and know nothing of vllm_beagle. Under TRITON_INTERPRET=1 they run on CPU
tensors (slowly, for tests); otherwise they need a GPU.
"""

import os

import torch
import triton.language as tl


def dot_config(dtype: torch.dtype):
    """The dtype and precision of tl.dot operands for tensors stored in `dtype`.

    fp32 storage multiplies in true fp32 ("ieee", not tf32). The interpreter computes bf16 wrongly,
    so under it every dot is done in fp32.
    """
    if dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1":
        return tl.float32, "ieee"
    return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), "tf32"
