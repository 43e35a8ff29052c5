"""The plugin's entry point: installed, registering twice is harmless, and the fix it applies to the
pinned vLLM (vllm_fixes.py) does what the kernel it replaces is defined to do."""

from importlib.metadata import entry_points

import pytest
import torch

from vllm_beagle import register, vllm_fixes
from vllm_beagle.schema import ARCH_BY_STATE


def test_entry_point_is_installed():
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("beagle") == "vllm_beagle:register"


def test_register_is_idempotent():
    from vllm import ModelRegistry

    register()
    register()
    archs = ModelRegistry.get_supported_archs()
    for arch in ARCH_BY_STATE.values():
        assert arch in archs
    assert len([a for a in archs if "Beagle" in a]) == len(set(ARCH_BY_STATE.values()))


def test_cpu_expand_kernel_fix_is_what_the_platform_registers():
    from vllm.utils import cpu_triton_utils

    register()
    assert cpu_triton_utils._expand_kernel_impl is vllm_fixes.expand_kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_cpu_expand_kernel_fix_matches_the_triton_kernels_definition(dtype):
    """Request i's value over its tokens cu[i-1]:cu[i], `replace_from` rewritten, in the caller's dtype;
    requests without tokens write nothing and the output past cu[-1] is left alone."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        batch = int(torch.randint(1, 9, (1,), generator=gen))
        counts = torch.randint(0, 5, (batch,), generator=gen)
        values = (torch.rand(batch, generator=gen) * 2).to(dtype) if dtype.is_floating_point else \
            torch.randint(0, 3, (batch,), generator=gen, dtype=dtype)
        values[0] = 0  # always one value to replace
        cu = counts.cumsum(0).to(torch.int32)
        output = torch.full((int(counts.sum()) + 3,), -7, dtype=dtype)  # poisoned, with a tail to keep
        vllm_fixes.expand_kernel(output, values, cu, 0, 1)
        expected = [1 if v == 0 else v for v, c in zip(values.tolist(), counts.tolist()) for _ in range(c)]
        assert output.tolist() == expected + [-7] * 3
