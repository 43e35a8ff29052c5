"""What bfloat16 costs or gains on this CPU: a matrix product of SmolLM2's MLP shape and the target's
forward pass (what `beagle data` runs to make states), each in float32 and in bfloat16.

    python benchmarks/cpu_bf16.py [--target DIR] [--tokens 256] [--repeats 3]

Prints whether the CPU has bf16 instructions (vllm_beagle/cpu.py), and the median of each measurement.
Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from vllm_beagle.cpu import native_bf16
from vllm_beagle.smollm2 import smollm2_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def seconds(fn, repeats: int, *inputs) -> float:
    fn(*inputs)  # warm-up: first calls pick kernels and allocate
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=None, help="HF directory (default: the embedded SmolLM2)")
    parser.add_argument("--tokens", type=int, default=256, help="positions per forward pass (default 256)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (default 3)")
    args = parser.parse_args()
    print(f"bf16 instructions: {native_bf16()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    m, k, n = 1000, 576, 1536
    for name, dtype in DTYPES.items():
        s = seconds(torch.matmul, args.repeats, torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype))
        print(f"matmul {m} x {k} x {n} {name}: {2 * m * k * n / s / 1e9:.1f} GFLOP/s")
    target_dir = args.target or smollm2_dir()
    ids = torch.randint(0, 49152, (1, args.tokens))
    for name, dtype in DTYPES.items():
        model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).eval()
        s = seconds(model.model, args.repeats, ids)  # the states alone: no LM head, as beagle data
        print(f"target forward, {args.tokens} positions, {name}: {args.tokens / s:.0f} tokens/s")
        del model


if __name__ == "__main__":
    main()
