#!/usr/bin/env python3
"""numpy's f32 matmul on the shapes of benches/cpu.rs, for the README's comparison.

Usage: python3 tools/numpy-gemm.py  (needs numpy; `pip install numpy` into any environment).
Prints the median and best time of 20 runs and GFLOP/s (2*m*n*k, the count criterion uses).
"""
import time

import numpy as np

for m, n, k in [(1024, 3072, 3072), (256, 768, 768)]:
    a = np.random.default_rng(0).standard_normal((m, k), dtype=np.float32)
    w = np.random.default_rng(1).standard_normal((n, k), dtype=np.float32)
    a @ w.T  # warm-up
    times = []
    for _ in range(20):
        t = time.perf_counter()
        a @ w.T
        times.append(time.perf_counter() - t)
    times.sort()
    med, best = times[len(times) // 2], times[0]
    flop = 2 * m * n * k
    print(f"{m}x{n}x{k}: median {med * 1e3:.2f} ms ({flop / med / 1e9:.1f} GFLOP/s), best {best * 1e3:.2f} ms ({flop / best / 1e9:.1f} GFLOP/s)")
