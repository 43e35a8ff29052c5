"""The plugin's entry point: installed, and registering twice is harmless."""

from importlib.metadata import entry_points

from vllm_beagle import register
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
    assert len([a for a in archs if "Beagle" in a]) == len(ARCH_BY_STATE)
