"""vllm-beagle: Beagle cross-attention speculative-decoding drafts for vLLM.

Importing the package imports neither vLLM nor the trainer; `register()` is the entry point vLLM
calls (group `vllm.general_plugins`) in every process that may build a model.
"""

__version__ = "0.1.0"


def register() -> None:
    """Register the Beagle draft architectures with vLLM and apply the fixes for the pinned vLLM's bugs
    that change answers (vllm_fixes.py); safe to call any number of times."""
    from vllm import ModelRegistry

    from . import vllm_fixes
    from .schema import ARCH_BY_STATE

    vllm_fixes.apply()

    supported = ModelRegistry.get_supported_archs()
    for arch in ARCH_BY_STATE.values():
        if arch not in supported:
            ModelRegistry.register_model(arch, f"vllm_beagle.vllm_model:{arch}")
