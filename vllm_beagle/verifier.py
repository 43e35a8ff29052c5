"""Which target a draft is served with: the `speculators_config` section of a draft's config.json.

vLLM serves a draft folder by itself (`vllm serve DRAFT`; on CPU `python -m
vllm.entrypoints.openai.api_server --model DRAFT`) when its config.json carries `speculators_config`:
it serves the verifier named there, with the draft as its speculative model, the method taken from
`speculators_model_type` (vLLM 0.32: `maybe_override_with_speculators` in
vllm/transformers_utils/config.py). Our drafts keep `model_type: llama`, so vLLM still reads them as
the one-layer Llama configs they are and builds the registered Beagle classes; only the choice of
target and method comes from this section.

The verifier recorded is the target's hub id where one is known (never a path of the machine that
trained the draft), or what `beagle train --verifier` says: a user who keeps the target elsewhere
records that folder there instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_SPECULATIVE_TOKENS = 3
# Hugging Face's cache keeps a hub model at .../models--ORG--NAME/snapshots/REVISION.
_HF_CACHE_PATH = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")


def hub_name(target_dir: str) -> str | None:
    """The hub id of a target folder where it can be told: the default target converted from its GGUF,
    or a folder of Hugging Face's cache."""
    from .smollm2 import NAME, default_cache

    converted = os.path.join(default_cache(), NAME)
    if os.path.isdir(target_dir) and os.path.isdir(converted) and os.path.samefile(target_dir, converted):
        return SMOLLM2_HUB_ID
    match = _HF_CACHE_PATH.search(os.path.abspath(target_dir))
    return f"{match[1]}/{match[2]}" if match else None


def target_name(target: str) -> str:
    """The target as clients and results name it: its hub id where known, else its folder's name (a
    path of this machine would mean nothing elsewhere)."""
    return hub_name(target) or os.path.basename(os.path.normpath(target))


def speculators_section(method: str, verifier: str) -> dict[str, Any]:
    """The config.json keys that let vLLM serve the draft by itself, with `verifier` as its target."""
    return {
        "speculators_model_type": method,
        "speculators_config": {
            "algorithm": method,
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": DEFAULT_SPECULATIVE_TOKENS}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier},
        },
        # vLLM's check of the section requires the key; the layer's config is the file's top level.
        "transformer_layer_config": {},
    }


def verifier_of(config: Mapping[str, Any]) -> str | None:
    """The verifier a draft's config.json names, or None; ValueError for a section of the wrong shape."""
    section = config.get("speculators_config")
    if section is None:
        return None
    verifier = section.get("verifier") if isinstance(section, Mapping) else None
    name = verifier.get("name_or_path") if isinstance(verifier, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ValueError("speculators_config.verifier.name_or_path must be a non-empty string, "
                         f"got {section!r}")
    return name


def local_target(verifier: str) -> str:
    """What to load for `verifier` here: the folder it names, the converted default target for its hub
    id (the model the shipped drafts were trained on; no hub is needed), or the hub id itself, which vLLM
    resolves. FileNotFoundError for a path that is not here."""
    if os.path.isdir(verifier):
        return verifier
    if verifier == SMOLLM2_HUB_ID:
        from .smollm2 import smollm2_dir

        return smollm2_dir()
    if verifier.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"the draft's target {verifier} is not here; give the target first: "
                                "beagle serve TARGET --draft DRAFT")
    return verifier
