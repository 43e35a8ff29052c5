"""The plugin's entry point: installed, registering twice is harmless, and the fix it applies to the
pinned vLLM (vllm_fixes.py) is what vLLM's kernel dispatcher runs, does what the kernel it replaces is
defined to do, and is applied only to the vLLM versions and the broken kernel it was written for."""

import logging
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


EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def vllms_own_wrapper():
    """vLLM's CPU expand_kernel wrapper as it ships, from a fresh copy of its module (register() has
    replaced the attribute in this process)."""
    import importlib.util

    from vllm.utils import cpu_triton_utils

    spec = importlib.util.spec_from_file_location("fresh_cpu_triton_utils", cpu_triton_utils.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._expand_kernel_impl


def test_the_fix_is_what_vllms_dispatcher_runs_for_expand_kernel():
    """As in a vLLM worker: the plugins are loaded, then the platform registers its kernel overrides; the
    rejection sampler's expansion then runs the fix and gives the kernel's values, in the caller's dtype."""
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON, dispatcher
    from vllm.v1.sample import rejection_sampler

    if not current_platform.is_cpu() or HAS_TRITON:
        pytest.skip("vLLM registers its CPU kernel overrides only on CPU without Triton's CPU backend")
    register()
    current_platform.register_triton_kernel_overrides()
    assert dispatcher._registry[EXPAND_KERNEL][1] is vllm_fixes.expand_kernel
    temperatures = torch.tensor([0.7, 0.0, 1.5])  # 0: a greedy request, written as 1 (replace_from, replace_to)
    expanded = rejection_sampler.expand_batch_to_tokens(temperatures, torch.tensor([2, 3, 5], dtype=torch.int32), 5,
                                                        replace_from=0, replace_to=1)
    assert expanded.dtype == torch.float32 and expanded.tolist() == pytest.approx([0.7, 0.7, 1.0, 1.5, 1.5])


def test_the_probe_tells_vllms_wrapper_from_the_fix():
    from vllm.platforms import current_platform

    assert vllm_fixes._expands_wrongly(vllms_own_wrapper(), current_platform)
    assert not vllm_fixes._expands_wrongly(vllm_fixes.expand_kernel, current_platform)


def test_the_fix_applies_once_only_to_the_versions_and_the_kernel_it_was_written_for(monkeypatch, caplog):
    import vllm
    from vllm.utils import cpu_triton_utils

    caplog.set_level(logging.INFO, logger=vllm_fixes.__name__)
    shipped = vllms_own_wrapper()

    def correct(*args):  # a vLLM whose wrapper carries the fix
        vllm_fixes.expand_kernel(*args)

    for version, wrapper in (("0.33.0", shipped), ("0.31.2", shipped), ("0.32.0", correct)):
        monkeypatch.setattr(vllm, "__version__", version)
        monkeypatch.setattr(cpu_triton_utils, "_expand_kernel_impl", wrapper)
        vllm_fixes.apply()
        assert cpu_triton_utils._expand_kernel_impl is wrapper, version
    assert not caplog.records
    monkeypatch.setattr(vllm, "__version__", "0.32.0")
    monkeypatch.setattr(cpu_triton_utils, "_expand_kernel_impl", shipped)
    vllm_fixes.apply()
    vllm_fixes.apply()  # register() runs in every process, and may run twice in one
    assert cpu_triton_utils._expand_kernel_impl is vllm_fixes.expand_kernel
    assert [r.levelno for r in caplog.records] == [logging.INFO] and "vllm-project/vllm#55005" in caplog.text


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
