"""The drafts this package ships for its default target, SmolLM2-135M-Instruct, and how vLLM runs a draft.

`beagle` is the Beagle draft, `eagle-baseline` the EAGLE-1 draft trained by the same trainer for
comparison; each folder's config.json records the data, the epochs and the training command.
"""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = {"beagle": "beagle-smollm2-135m", "eagle-baseline": "eagle-smollm2-135m"}
# vLLM's n-gram drafting, as DESIGN.md section 7 measures it: no training, prompt lookup of 2 to 4 tokens.
NGRAM = "ngram"


def draft_path(name: str) -> str:
    """A shipped draft's folder, or `name` itself when it is a path."""
    if name in SHIPPED:
        path = os.path.join(HERE, SHIPPED[name])
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"the shipped draft {name!r} is missing from {path}; reinstall vllm-beagle")
        return path
    if not os.path.isdir(name):
        raise FileNotFoundError(f"draft {name!r} is neither a shipped draft ({', '.join(SHIPPED)}, {NGRAM}) "
                                "nor a checkpoint folder")
    return name


def speculative_config(name: str, k: int) -> dict:
    """vLLM's speculative config for a draft name (a shipped one, `ngram`, or a checkpoint folder)."""
    if name == NGRAM:
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    from ..checkpoint import is_beagle_checkpoint, read_config

    path = os.path.abspath(draft_path(name))
    if not is_beagle_checkpoint(path):
        return {"method": "eagle", "model": path, "num_speculative_tokens": k}
    cfg = read_config(path)
    spec = {"method": cfg.method, "model": path, "num_speculative_tokens": k}
    return spec | ({"parallel_drafting": True} if cfg.drafting == "parallel" else {})
