"""Reading, checking and writing Beagle checkpoints (config.json + model.safetensors)."""

from __future__ import annotations

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
    read_config,
)


def check_tensors(cfg: BeagleConfig, tensors: Mapping[str, torch.Tensor], checkpoint: str) -> None:
    """Refuse missing or unexpected tensors, wrong shapes, wrong dtypes, NaN/Inf values and a bad token map."""
    required, optional = cfg.tensor_shapes()
    shapes = {**required, **optional}
    missing = sorted(set(required) - set(tensors))
    if missing:
        raise CheckpointError(checkpoint, f"{WEIGHTS_FILE} lacks the tensor(s) {missing}")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise CheckpointError(
            checkpoint, f"{WEIGHTS_FILE} has unexpected tensor(s) {extra}; a Beagle draft holds {sorted(shapes)}"
        )
    for name, t in tensors.items():
        if tuple(t.shape) != shapes[name]:
            raise CheckpointError(
                checkpoint, f"tensor '{name}' has shape {tuple(t.shape)} but the config needs {shapes[name]}"
            )
        if name == DRAFT_TO_TARGET:
            _check_token_map(t, cfg.vocab_size, checkpoint)
            continue
        if not t.is_floating_point():
            raise CheckpointError(checkpoint, f"tensor '{name}' has dtype {t.dtype}; weights must be floating point")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise CheckpointError(checkpoint, f"tensor '{name}' holds {bad} NaN/Inf value(s)")


def _check_token_map(t: torch.Tensor, vocab_size: int, checkpoint: str) -> None:
    if t.dtype != torch.int64:
        raise CheckpointError(checkpoint, f"tensor '{DRAFT_TO_TARGET}' has dtype {t.dtype}; it must be int64 token ids")
    if len(t) and not (0 <= int(t.min()) and int(t.max()) < vocab_size):
        raise CheckpointError(checkpoint, f"tensor '{DRAFT_TO_TARGET}' holds ids outside the target's vocabulary "
                                          f"0..{vocab_size - 1}")
    if len(torch.unique(t)) != len(t):
        raise CheckpointError(checkpoint, f"tensor '{DRAFT_TO_TARGET}' maps two draft tokens to the same target id")


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(path, f"no {WEIGHTS_FILE} in the directory")
    try:
        return load_file(file)
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
    tensors = read_tensors(path)
    check_tensors(cfg, tensors, path)
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
