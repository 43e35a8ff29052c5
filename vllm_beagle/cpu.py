"""Whether this CPU computes bfloat16 natively.

PyTorch's bf16 matrix products are fast only where the CPU has bf16 instructions (AVX512-BF16 or AMX on
x86, BF16 on Arm). Without them they fall back to slow paths: on a 2-core AMD EPYC with AVX2 alone
(2026-12-04) a 1000 x 576 x 1536 product ran at 1.3 GFLOP/s in bf16 against 121 in fp32, and SmolLM2's
forward at 82 tokens/s against 499 (`benchmarks/cpu_bf16.py`). Choosing bf16 there turns an hour's job
into most of a day's, so the commands that offer it warn.
"""

from __future__ import annotations

import sys

# /proc/cpuinfo's x86 `flags` and Arm `Features` names of bf16 arithmetic.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """True or False by the CPU's flags; None where they cannot be read (not Linux)."""
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return not BF16_FLAGS.isdisjoint(value.split())
    return None


def warn_if_slow_bf16(what: str, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Print a warning that `what` (bf16 work on the CPU) will crawl here; True if it did."""
    if native_bf16(cpuinfo) is not False:
        return False
    print(f"warning: {what} asks for bfloat16 on a CPU without bfloat16 instructions (no AVX512-BF16, AMX "
          "or Arm BF16 among its flags): bf16 matrix products run here far slower than float32 (about 100x "
          "on an AVX2-only AMD EPYC); float32 is the faster choice on this machine", file=sys.stderr)
    return True
