"""Reading, checking and writing Beagle checkpoints (config.json + model.safetensors)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .outputs import atomic_path, write_json
from .schema import (
    CONFIG_FILE,
    DRAFT_TO_TARGET,
    WEIGHTS_FILE,
    BeagleConfig,
    CheckpointError,
    check_against_target,
)
from .tensor_files import FLOATS, Spec, TensorFileError, check_header, header_of, open_checked


def read_config_dict(path: str) -> dict[str, Any]:
    """A draft folder's config.json as a dict (Beagle or vLLM's EAGLE format); CheckpointError naming
    what is wrong when it is missing or not a JSON object."""
    file = os.path.join(path, CONFIG_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(path, f"no {CONFIG_FILE} in the directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f"{CONFIG_FILE} is not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(path, f"{CONFIG_FILE} is nested too deeply to be a config") from None
    if not isinstance(d, dict):
        raise CheckpointError(path, f"{CONFIG_FILE} holds a {type(d).__name__}, not an object")
    return d


def read_config(path: str) -> BeagleConfig:
    return BeagleConfig.from_hf_dict(read_config_dict(path), checkpoint=path)


def is_beagle_config(config: Mapping[str, Any]) -> bool:
    """A Beagle checkpoint's config.json has a `beagle` section; an EAGLE-1 draft in vLLM's own format
    (the baseline) has none."""
    return "beagle" in config


def is_beagle_checkpoint(path: str) -> bool:
    return is_beagle_config(read_config_dict(path))


def _tensor_specs(cfg: BeagleConfig) -> tuple[dict[str, Spec], frozenset[str]]:
    """The tensors of model.safetensors (tensor_files.Spec) and which of them may be absent."""
    required, optional = cfg.tensor_shapes()
    specs = {name: Spec(shape, ("I64",), "token ids") if name == DRAFT_TO_TARGET else Spec(shape, FLOATS)
             for name, shape in {**required, **optional}.items()}
    return specs, frozenset(optional)


def check_tensors(cfg: BeagleConfig, tensors: Mapping[str, torch.Tensor], checkpoint: str) -> None:
    """Refuse missing or unexpected tensors, wrong shapes, dtypes off the list, NaN/Inf values and a bad token map."""
    try:
        check_header(header_of(tensors), *_tensor_specs(cfg))
    except TensorFileError as e:
        raise CheckpointError(checkpoint, f"{WEIGHTS_FILE} {e}") from None
    _check_values(cfg, tensors, checkpoint)


def _check_values(cfg: BeagleConfig, tensors: Mapping[str, torch.Tensor], checkpoint: str) -> None:
    """The values of tensors whose names, shapes and dtypes are checked."""
    for name, t in tensors.items():
        if name == DRAFT_TO_TARGET:
            _check_token_map(t, cfg.vocab_size, checkpoint)
            continue
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise CheckpointError(checkpoint, f"tensor '{name}' holds {bad} NaN/Inf value(s)")


def _check_token_map(t: torch.Tensor, vocab_size: int, checkpoint: str) -> None:
    if len(t) and not (0 <= int(t.min()) and int(t.max()) < vocab_size):
        raise CheckpointError(checkpoint, f"tensor '{DRAFT_TO_TARGET}' holds ids outside the target's vocabulary "
                                          f"0..{vocab_size - 1}")
    if len(torch.unique(t)) != len(t):
        raise CheckpointError(checkpoint, f"tensor '{DRAFT_TO_TARGET}' maps two draft tokens to the same target id")


def read_tensors(path: str, cfg: BeagleConfig | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint folder's model.safetensors. With the Beagle config they must be, its
    header is checked first (names, shapes, dtypes), so that no tensor is read from a file that does not
    fit it; vLLM's EAGLE format (eagle.py) is read without one."""
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(path, f"no {WEIGHTS_FILE} in the directory")
    try:
        if cfg is None:
            return load_file(file)
        handle, _, _ = open_checked(file, *_tensor_specs(cfg))
        return {name: handle.get_tensor(name) for name in handle.keys()}
    except TensorFileError as e:
        raise CheckpointError(path, f"{WEIGHTS_FILE} {e}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(path, f"{WEIGHTS_FILE} is truncated or not a safetensors file ({e})") from None


def load_checkpoint(path: str, target: Mapping[str, Any] | None = None,
                    target_name: str = "target") -> tuple[BeagleConfig, dict[str, torch.Tensor]]:
    """Read and fully check a checkpoint, against the target's HF config when one is given."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(path, "is not a directory")
    cfg = read_config(path)
    if target is not None:
        check_against_target(cfg, target, path, target_name)
    tensors = read_tensors(path, cfg)
    _check_values(cfg, tensors, path)
    return cfg, tensors


def save_checkpoint(path: str, cfg: BeagleConfig, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write a checked Beagle checkpoint."""
    check_tensors(cfg, tensors, os.fspath(path))
    write_checkpoint(path, cfg.to_hf_dict(), tensors)


def write_checkpoint(path: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """config.json + model.safetensors; each file appears whole or not at all, weights before config."""
    path = os.fspath(path)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    os.makedirs(path, exist_ok=True)
    with atomic_path(os.path.join(path, WEIGHTS_FILE)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    write_json(os.path.join(path, CONFIG_FILE), config)
