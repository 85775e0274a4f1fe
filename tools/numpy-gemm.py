#!/usr/bin/env python3
"""numpy's f32 matmul on the shapes of benches/cpu.rs, for the README's comparison.

Usage: python3 tools/numpy-gemm.py  (needs numpy; `pip install numpy` into any environment).
Prints GFLOP/s per shape (best of several runs), the same 2*m*n*k count criterion uses.
"""
import time

import numpy as np

for m, n, k in [(1024, 3072, 3072), (256, 768, 768)]:
    a = np.random.default_rng(0).standard_normal((m, k), dtype=np.float32)
    w = np.random.default_rng(1).standard_normal((n, k), dtype=np.float32)
    a @ w.T  # warm-up
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        a @ w.T
        best = min(best, time.perf_counter() - t)
    print(f"{m}x{n}x{k}: {best * 1e3:.2f} ms, {2 * m * n * k / best / 1e9:.1f} GFLOP/s")
