#!/usr/bin/env python3
"""The peer baseline for `engine bench` and `engine kernels`: the same transformer step in PyTorch +
diffusers, and PyTorch's SDPA for the attention microbenchmark, on the same card and shapes.

What runs, and why it is the same work as the engine's:
- diffusers' FluxTransformer2DModel built from the FLUX.1-dev config (or the engine's smaller
  presets) with random weights made on the device in the benchmark dtype (nothing is downloaded,
  no f32 copy of the 24 GB of weights exists anywhere), fed what `engine bench` feeds its model:
  (res / 16)^2 image tokens of 64 channels, 512 text tokens of 4096 features, a pooled vector of
  768, guidance 3.5, one timestep per step from 1 down to 1 / steps. Attention is diffusers'
  default, torch's scaled_dot_product_attention.
- One warm-up step, then each step timed on its own and synchronised, as `engine bench` does, with
  CUDA events on a GPU. FLOPs are counted by design.md section 11's rules (restated below), so
  TFLOP/s and MFU are comparable number for number; `--compare` checks the count against the
  engine's. Peak memory is torch's allocator high-water mark (the engine reports its own
  allocator's), plus the driver's used memory.
- SDPA at the shapes of `engine kernels` (full: 24 heads x 4608 tokens x 128, FLUX.1-dev at
  1024x1024), forward and forward + backward, with the backend torch chose and, on a GPU, each of
  flash, memory-efficient and cuDNN forced in turn.

Results print as a table, optionally go to JSON under the same keys as `engine bench --json`,
and `--compare` puts them beside the engine's JSON files with ratios.
"""

import argparse
import json
import statistics
import sys
import time

# The engine's model presets (engine/src/model/config.rs) in its field names. diffusers' Flux has
# the FLUX.1 block structure fixed (MLP ratio 4, qkv bias, rope theta 10000), which all of these share.
PRESETS = {
    "flux-dev": dict(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                     num_heads=24, depth=19, depth_single_blocks=38, axes_dim=(16, 56, 56), guidance_embed=True),
    "flux-small": dict(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=768,
                       num_heads=12, depth=2, depth_single_blocks=4, axes_dim=(8, 28, 28), guidance_embed=True),
    "flux-tiny": dict(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=64, hidden_size=64,
                      num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(4, 14, 14), guidance_embed=True),
}
MLP_RATIO = 4

# `engine kernels --size full|small`: (tokens, heads, head dim) of its attention row.
ATTENTION_SIZES = {"full": (4608, 24, 128), "small": (256, 4, 128)}

# Peak dense bf16 tensor-core rate by card name, the table of engine/src/cli/bench.rs (design.md section 11).
PEAK_BF16 = [("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("A800", 312e12)]

GUIDANCE = 3.5
GEMM_REPS = 10


class Failure(Exception):
    """An error the user can fix; printed as one line, without a traceback."""


def flux_step_flops(p, batch, img_tokens, txt_tokens):
    """Model FLOPs of one transformer evaluation by design.md section 11, per class: 2 M N K per
    token-row linear, 4 Lq Lk d per attention head; the per-sample embedding and modulation
    linears, norms and elementwise work count nothing. The same closed form as
    engine/src/perf/flops.rs, whose meta-backend trace `engine bench` prints."""
    h, heads = p["hidden_size"], p["num_heads"]
    m = MLP_RATIO * h
    tokens = img_tokens + txt_tokens
    rows = batch * tokens

    def linear(r, i, o):
        return 2 * r * i * o

    # A double block's two streams together cover every joint row once with qkv, proj, MLP in, MLP out;
    # a single block runs linear1 (qkv + MLP in) and linear2 over the joint rows.
    double = linear(rows, h, 3 * h) + linear(rows, h, h) + linear(rows, h, m) + linear(rows, m, h)
    single = linear(rows, h, 3 * h + m) + linear(rows, h + m, h)
    ends = (linear(batch * img_tokens, p["in_channels"], h) + linear(batch * txt_tokens, p["context_in_dim"], h)
            + linear(batch * img_tokens, h, p["out_channels"]))
    gemm = p["depth"] * double + p["depth_single_blocks"] * single + ends
    attention = (p["depth"] + p["depth_single_blocks"]) * 4 * batch * heads * tokens * tokens * (h // heads)
    return {"gemm": gemm, "attention": attention}


def attention_flops(tokens, heads, head_dim):
    """Forward: 4 L^2 d per head (QK^T and PV); the backward counts 2.5 forwards (FlashAttention's
    convention, the one the published attention figures use)."""
    return 4 * tokens * tokens * head_dim * heads


def diffusers_config(p):
    return dict(patch_size=1, in_channels=p["in_channels"], out_channels=p["out_channels"], num_layers=p["depth"],
                num_single_layers=p["depth_single_blocks"], attention_head_dim=p["hidden_size"] // p["num_heads"],
                num_attention_heads=p["num_heads"], joint_attention_dim=p["context_in_dim"],
                pooled_projection_dim=p["vec_in_dim"], guidance_embeds=p["guidance_embed"],
                axes_dims_rope=tuple(p["axes_dim"]))


def peak_rate(device_name, override_tflops):
    if override_tflops is not None:
        return override_tflops * 1e12
    return next((f for n, f in PEAK_BF16 if n in device_name), None)


class Clock:
    """Seconds of one synchronised call: CUDA events on a GPU (what the device did between the two
    marks, launch gaps included), the wall clock on the CPU."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def time(self, fn):
        if self.cuda:
            start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            del out
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        del out
        return seconds

    def median(self, fn, iters):
        """Median of `iters` calls after one warm-up, as `engine kernels` times its kernels."""
        self.time(fn)
        return statistics.median(self.time(fn) for _ in range(iters))


def device_name(torch, device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def gemm_ceiling(torch, clock, device, dtype):
    """A square GEMM through torch, the same ceiling `engine bench` measures beside its steps."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    clock.time(lambda: a @ b)

    def reps():
        for _ in range(GEMM_REPS):
            out = a @ b
        return out

    return n, 2 * n ** 3 * GEMM_REPS / clock.time(reps)


def bench_model(torch, args, device, dtype, clock):
    try:
        import diffusers
        from diffusers import FluxTransformer2DModel
    except ImportError as e:
        raise Failure(f"cannot import diffusers ({e}): install tools/peer-bench/requirements.txt "
                      "(offline: tools/peer-bench/wheels.sh on a machine with PyPI, then pip install --no-index "
                      "--find-links)") from None
    p = PRESETS[args.shape]
    side = args.res // 16
    img_tokens, txt_tokens, batch = side * side, args.txt_tokens, args.batch
    by_class = flux_step_flops(p, batch, img_tokens, txt_tokens)
    flops = sum(by_class.values())

    # Made where it runs, in the benchmark dtype: the device context puts every parameter on the
    # device and the default dtype makes nn.Linear & co. allocate it in bf16 there, so FLUX.1-dev's
    # 12B parameters never exist in f32 or on the host.
    t0 = time.perf_counter()
    default_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = FluxTransformer2DModel(**diffusers_config(p))
    except ImportError as e:  # diffusers' stand-in class when it finds no torch distribution metadata
        raise Failure(f"diffusers {diffusers.__version__} does not see this torch: {str(e).strip().splitlines()[0]}") from None
    finally:
        torch.set_default_dtype(default_dtype)
    model.eval().requires_grad_(False)
    clock.sync()
    build_s = time.perf_counter() - t0

    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    rows = torch.arange(side, device=device, dtype=dtype).repeat_interleave(side)
    cols = torch.arange(side, device=device, dtype=dtype).repeat(side)
    inputs = dict(
        hidden_states=randn(batch, img_tokens, p["in_channels"]),
        encoder_hidden_states=randn(batch, txt_tokens, p["context_in_dim"]),
        pooled_projections=randn(batch, p["vec_in_dim"]),
        # FLUX's position ids: (0, row, col) per image token, zeros for text.
        img_ids=torch.stack([torch.zeros_like(rows), rows, cols], dim=1),
        txt_ids=torch.zeros(txt_tokens, 3, device=device, dtype=dtype),
        guidance=torch.full((batch,), GUIDANCE, device=device, dtype=dtype) if p["guidance_embed"] else None,
    )
    forward = torch.compile(model) if args.compile else model

    def step(t):
        with torch.inference_mode():
            return forward(timestep=torch.full((batch,), t, device=device, dtype=dtype), return_dict=False, **inputs)[0]

    # Warm-up: kernel selection, the caching allocator, and with --compile the compilation itself.
    t0 = time.perf_counter()
    clock.time(lambda: step(1.0))
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [clock.time(lambda: step(1.0 - i / args.steps)) for i in range(args.steps)]
    memory_peak = memory_driver = None
    if device.type == "cuda":
        memory_peak = torch.cuda.max_memory_allocated(device)
        free, total = torch.cuda.mem_get_info(device)
        memory_driver = total - free
    del model, forward, inputs

    total = sum(times)
    mean = total / args.steps
    return {
        "peer": f"diffusers {diffusers.__version__} FluxTransformer2DModel, {'torch.compile' if args.compile else 'eager'}",
        "diffusers": diffusers.__version__, "compile": args.compile,
        "shape": args.shape, "res": args.res, "batch": batch, "steps": args.steps,
        "image_tokens": img_tokens, "text_tokens": txt_tokens,
        "build_seconds": build_s, "warmup_seconds": warmup_s,
        "seconds_per_step": mean, "seconds_per_step_median": statistics.median(times),
        "seconds_per_image": total / batch,
        "flops_per_step": flops, "flops_per_second": flops / mean, "flops_by_class": by_class,
        "memory_peak_bytes": memory_peak, "memory_driver_used_bytes": memory_driver,
    }


def sdpa_backends(torch, device):
    """(label, SDPBackend or None for torch's own choice) to time: torch's choice always, and on a
    GPU each fused backend forced in turn, so the table shows what the default left on the table."""
    rows = [("default", None)]
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend
        rows += [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                 ("cudnn", SDPBackend.CUDNN_ATTENTION)]
    return rows


def chosen_backend(torch, q, k, v):
    """The backend torch's dispatcher picks for these inputs (its private query; 'unknown' if a
    torch version lacks it)."""
    try:
        from torch.nn.attention import SDPBackend
        choice = torch._fused_sdp_choice(q, k, v)
        names = {SDPBackend.MATH: "math", SDPBackend.FLASH_ATTENTION: "flash",
                 SDPBackend.EFFICIENT_ATTENTION: "efficient", SDPBackend.CUDNN_ATTENTION: "cudnn"}
        return next(n for b, n in names.items() if int(b.value) == int(choice))
    except (AttributeError, ImportError, RuntimeError, StopIteration, TypeError):
        return "unknown"


def only_backend(backend):
    """A context that forces one SDPA backend, or leaves torch's choice alone for None."""
    import contextlib

    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([backend])


def bench_attention(torch, args, device, dtype, clock):
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    tokens, heads, head_dim = ATTENTION_SIZES[args.attn_size]
    shape = f"[1,{heads},{tokens},{head_dim}]"  # `engine kernels`' spelling, so rows pair up in --compare
    fwd_flops = attention_flops(tokens, heads, head_dim)
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v, dout = (torch.randn(1, heads, tokens, head_dim, generator=g, device=device, dtype=dtype) for _ in range(4))
    qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))

    def forward():
        with torch.inference_mode():
            return sdpa(q, k, v)

    def forward_backward():
        return torch.autograd.grad(sdpa(qg, kg, vg), (qg, kg, vg), dout)

    rows, skipped = [], []
    for label, backend in sdpa_backends(torch, device):
        if backend is None:
            ran = (chosen_backend(torch, q, k, v), chosen_backend(torch, qg, kg, vg))
        else:
            ran = (label, label)
        name = "sdpa" if backend is None else f"sdpa[{label}]"
        timed = {}
        # A backend may lack this card, shape or the backward: torch then raises "No available kernel".
        for what, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
            try:
                with only_backend(backend):
                    timed[what] = clock.median(fn, args.iters)
            except RuntimeError as e:
                skipped.append(f"{label} {what}: {str(e).strip().splitlines()[0]}")
                break
        if "fwd" in timed:
            rows.append({"kernel": f"{name} fwd", "backend": ran[0], "shape": shape, "seconds": timed["fwd"],
                         "flops": fwd_flops})
        if "fwd+bwd" not in timed:
            continue
        f, fb = timed["fwd"], timed["fwd+bwd"]
        rows.append({"kernel": f"{name} fwd+bwd", "backend": ran[1], "shape": shape, "seconds": fb,
                     "flops": 3.5 * fwd_flops})
        if fb > f:
            rows.append({"kernel": f"{name} bwd", "backend": ran[1], "shape": shape, "seconds": fb - f,
                         "flops": 2.5 * fwd_flops, "note": "fwd+bwd minus fwd"})
    for r in rows:
        r["rate"], r["unit"] = r["flops"] / r["seconds"], "FLOP/s"
    return {"attention": rows, "attention_skipped": skipped, "attention_iters": args.iters}


def run(args):
    try:
        import torch
    except ImportError:
        raise Failure("cannot import torch: run this with the Python that has PyTorch") from None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise Failure("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False); "
                      "use --device cpu with a small --shape")
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    clock = Clock(torch, device)
    name = device_name(torch, device)
    doc = {"device": name, "torch": torch.__version__, "dtype": args.dtype}
    n, gemm_rate = gemm_ceiling(torch, clock, device, dtype)
    doc.update(gemm_side=n, gemm_flops_per_second=gemm_rate)
    if not args.skip_model:
        doc.update(bench_model(torch, args, device, dtype, clock))
        peak = peak_rate(name, args.peak_tflops)
        doc.update(peak_flops_per_second=peak, mfu=doc["flops_per_second"] / peak if peak else None,
                   fraction_of_gemm=doc["flops_per_second"] / gemm_rate)
    if not args.skip_attention:
        doc.update(bench_attention(torch, args, device, dtype, clock))
    return doc


def scaled(x, unit):
    """T, G or M, whichever keeps one to three digits before the point: GPU rates read in T, the
    CPU smoke test's in G or M."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if abs(x) >= factor:
            return f"{x / factor:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def human_bytes(n):
    return "-" if n is None else f"{n / 2 ** 30:.2f} GiB"


def report(doc):
    print(f"device      {doc['device']} (torch {doc['torch']}, {doc['dtype']})")
    if "seconds_per_step" in doc:
        print(f"model       {doc['peer']}, {doc['shape']}, random weights, built in {doc['build_seconds']:.1f} s, "
              f"warm-up step {doc['warmup_seconds']:.1f} s")
        print(f"shape       {doc['res']}x{doc['res']} output, {doc['image_tokens']} image + {doc['text_tokens']} text "
              f"tokens, batch {doc['batch']}")
        print(f"steps       {doc['steps']}: {doc['seconds_per_step'] * doc['steps']:.3f} s in all, "
              f"{doc['seconds_per_step'] * 1e3:.1f} ms per step (median {doc['seconds_per_step_median'] * 1e3:.1f} ms), "
              f"{doc['seconds_per_image']:.3f} s per image")
        print(f"flops       {scaled(doc['flops_per_step'], 'FLOP')} per step (design.md section 11), "
              f"{scaled(doc['flops_per_second'], 'FLOP/s')} achieved")
        if doc["mfu"] is not None:
            print(f"mfu         {100 * doc['mfu']:.1f}% of {doc['peak_flops_per_second'] / 1e12:.0f} TFLOP/s dense bf16")
        else:
            print("mfu         (no peak rate known for this device; --peak-tflops sets one)")
        print(f"gemm        {scaled(doc['gemm_flops_per_second'], 'FLOP/s')} measured ({doc['gemm_side']}^3); "
              f"the steps reach {100 * doc['fraction_of_gemm']:.1f}% of it")
        print(f"memory      peak {human_bytes(doc['memory_peak_bytes'])} (torch allocator), "
              f"{human_bytes(doc['memory_driver_used_bytes'])} in use (driver)")
    else:
        print(f"gemm        {scaled(doc['gemm_flops_per_second'], 'FLOP/s')} measured ({doc['gemm_side']}^3)")
    if doc.get("attention"):
        print(f"{'attention':<22} {'backend':<10} {'shape':<18} {'time':>10} {'achieved':>14}")
        for r in doc["attention"]:
            note = f"  ({r['note']})" if "note" in r else ""
            print(f"{r['kernel']:<22} {r['backend']:<10} {r['shape']:<18} {r['seconds'] * 1e3:>7.3f} ms "
                  f"{scaled(r['rate'], 'FLOP/s'):>14}{note}")
        print(f"(median of {doc['attention_iters']} runs each; fwd 4 L^2 d per head, bwd 2.5x that)")
    for s in doc.get("attention_skipped", []):
        print(f"skipped     sdpa {s}")


def load_json(path, what):
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as e:
        raise Failure(f"{what} {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise Failure(f"{what} {path}: not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise Failure(f"{what} {path}: expected a JSON object")
    return doc


def need(doc, key, path):
    if key not in doc:
        raise Failure(f"--compare {path}: key '{key}' missing")
    return doc[key]


def load_engine_docs(paths):
    """The engine's JSON files by kind, told apart by their keys: `engine bench --json` writes
    'flops_per_step', `engine kernels --json` writes 'kernels'."""
    bench = kernels = None
    for path in paths:
        doc = load_json(path, "--compare")
        if "flops_per_step" in doc:
            for key in ("shape", "res", "batch", "text_tokens", "steps", "seconds_per_step", "seconds_per_image"):
                need(doc, key, path)
            bench = (path, doc)
        elif "kernels" in doc:
            for i, row in enumerate(doc["kernels"]):
                for key in ("kernel", "shape", "seconds", "rate"):
                    if key not in row:
                        raise Failure(f"--compare {path}: kernels[{i}] has no '{key}'")
            kernels = (path, doc)
        else:
            raise Failure(f"--compare {path}: neither `engine bench --json` output (no 'flops_per_step') "
                          "nor `engine kernels --json` output (no 'kernels')")
    return bench, kernels


def check_same_work(bench, shape, res, batch, txt_tokens):
    """Ratios of different work mean nothing: the engine's run must match this one's shape."""
    path, doc = bench
    ours = {"shape": shape, "res": res, "batch": batch, "text_tokens": txt_tokens}
    diff = [f"{k} {doc[k]} (engine) vs {v} (peer)" for k, v in ours.items() if doc[k] != v]
    if diff:
        raise Failure(f"--compare {path}: the engine ran other work: {', '.join(diff)}; "
                      "rerun one side with matching --shape/--res/--batch/--txt-tokens")


def compare(doc, bench, kernels):
    """One table, engine beside peer. 'engine ahead' is peer/engine for times and memory and
    engine/peer for rates, so above 1 always means the engine does better."""
    rows = []  # (label, engine value, peer value, formatter, higher is better)

    def ms(x):
        return f"{x * 1e3:.2f} ms"

    def sec(x):
        return f"{x:.3f} s"

    def tflops(x):
        return scaled(x, "FLOP/s")

    def pct(x):
        return f"{100 * x:.1f}%"

    def gib(x):
        return f"{x / 2 ** 30:.2f} GiB"

    notes = []
    if bench and "seconds_per_step" in doc:
        path, e = bench
        check_same_work(bench, doc["shape"], doc["res"], doc["batch"], doc["text_tokens"])
        if e.get("flops_per_step") != doc["flops_per_step"]:
            notes.append(f"FLOP counts differ: engine {e.get('flops_per_step')}, peer {doc['flops_per_step']} "
                         "(design.md section 11 restated wrongly in peer_bench.py?)")
        rows += [("step (mean)", e["seconds_per_step"], doc["seconds_per_step"], ms, False),
                 ("step (median)", e.get("seconds_per_step_median"), doc["seconds_per_step_median"], ms, False)]
        if e["steps"] == doc["steps"]:
            rows.append((f"image ({doc['steps']} steps)", e["seconds_per_image"], doc["seconds_per_image"], sec, False))
        else:
            notes.append(f"per image left out: the engine ran {e['steps']} steps, the peer {doc['steps']}")
        rows += [("model FLOP/s", e.get("flops_per_second"), doc["flops_per_second"], tflops, True),
                 ("MFU", e.get("mfu"), doc["mfu"], pct, True),
                 ("of own GEMM", e.get("fraction_of_gemm"), doc["fraction_of_gemm"], pct, True),
                 ("memory peak (alloc)", e.get("memory_peak_bytes"), doc["memory_peak_bytes"], gib, False),
                 ("memory (driver)", e.get("memory_driver_used_bytes"), doc["memory_driver_used_bytes"], gib, False),
                 ("GEMM ceiling", e.get("gemm_flops_per_second"), doc["gemm_flops_per_second"], tflops, True)]
        if e.get("device") != doc["device"]:
            notes.append(f"devices differ: engine '{e.get('device')}', peer '{doc['device']}'")
    if kernels:
        path, k = kernels
        by_name = {r["kernel"]: r for r in k["kernels"]}
        gemm = by_name.get("gemm (ceiling)")
        if gemm and "seconds_per_step" not in doc:
            rows.append(("GEMM ceiling", gemm["rate"], doc["gemm_flops_per_second"], tflops, True))
        for direction in ("fwd", "bwd"):
            engine_attn = by_name.get(f"attention {direction}")
            for r in doc.get("attention", []):
                if not r["kernel"].endswith(f" {direction}"):
                    continue
                if engine_attn is None:
                    notes.append(f"{path}: no 'attention {direction}' row to set beside SDPA")
                    break
                if engine_attn["shape"] != r["shape"]:
                    notes.append(f"attention shapes differ: engine {engine_attn['shape']}, peer {r['shape']} "
                                 "(--attn-size must match `engine kernels --size`)")
                    break
                label = f"attn {direction} vs {r['kernel'][:-4]} ({r['backend']})"
                rows.append((label, engine_attn["rate"], r["rate"], tflops, True))
        if k.get("device") != doc["device"]:
            notes.append(f"devices differ: engine kernels '{k.get('device')}', peer '{doc['device']}'")
    if not rows:
        raise Failure("--compare: nothing to set side by side (a bench JSON needs the model run, a kernels "
                      "JSON the attention run)")

    print()
    print(f"engine vs {doc.get('peer', 'PyTorch')} on {doc['device']}")
    print(f"{'metric':<36} {'engine':>16} {'peer':>16} {'engine ahead':>13}")
    for label, e, p, fmt, higher in rows:
        if e is None or p is None:
            print(f"{label:<36} {'-' if e is None else fmt(e):>16} {'-' if p is None else fmt(p):>16} {'-':>13}")
            continue
        ratio = (e / p if higher else p / e) if e and p else float("nan")
        print(f"{label:<36} {fmt(e):>16} {fmt(p):>16} {ratio:>12.2f}x")
    print("(engine ahead: peer time / engine time, engine rate / peer rate; above 1 the engine does better)")
    for n in notes:
        print(f"note: {n}")


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="peer_bench.py",
        description="PyTorch + diffusers baseline for `engine bench` / `engine kernels`: the FLUX transformer "
                    "step (diffusers FluxTransformer2DModel, random weights, SDPA attention) and torch's SDPA "
                    "alone, on the same card and shapes, timed and counted the way the engine does, with "
                    "--compare to print the engine's JSON beside it as ratios.",
        epilog="GPU: peer_bench.py --shape flux-dev --res 1024 --steps 28 --json peer.json --compare bench.json "
               "--compare kernels.json.  CPU smoke test: peer_bench.py --shape flux-tiny --res 64 --txt-tokens 8 "
               "--steps 3 --device cpu --dtype f32.")
    ap.add_argument("--shape", choices=sorted(PRESETS), default="flux-dev",
                    help="model shape, the engine's presets of the same names (default flux-dev; FLUX.1-dev needs "
                         "a GPU: 24 GB of bf16 weights)")
    ap.add_argument("--res", type=int, default=1024,
                    help="output side in pixels, a multiple of 16: (res/16)^2 image tokens (default 1024)")
    ap.add_argument("--batch", type=int, default=1, help="images per step (default 1)")
    ap.add_argument("--steps", type=int, default=28, help="timed sampling steps after one warm-up (default 28)")
    ap.add_argument("--txt-tokens", type=int, default=512, help="text tokens (default 512, as FLUX.1-dev)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where to run (default cuda)")
    ap.add_argument("--dtype", choices=("bf16", "f32"), default="bf16",
                    help="weights and activations (default bf16; the engine runs bf16 on a GPU)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the transformer (default mode); compilation happens in the warm-up step")
    ap.add_argument("--attn-size", choices=sorted(ATTENTION_SIZES),
                    help="SDPA problem, as `engine kernels --size`: full = 24 heads x 4608 tokens x 128 (default "
                         "on cuda), small = 4 x 256 x 128 (default on cpu)")
    ap.add_argument("--iters", type=int, default=20,
                    help="timed SDPA runs per row, median reported (default 20, as `engine kernels`)")
    ap.add_argument("--peak-tflops", type=float,
                    help="the card's peak dense rate for MFU (default: by name, H100/H200 989, A100/A800 312)")
    ap.add_argument("--skip-model", action="store_true", help="leave out the transformer step")
    ap.add_argument("--skip-attention", action="store_true", help="leave out the SDPA microbenchmark")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    ap.add_argument("--compare", metavar="ENGINE_JSON", action="append", default=[],
                    help="an `engine bench --json` or `engine kernels --json` file to print beside the results "
                         "with ratios; may be given twice, once for each")
    ap.add_argument("--load", metavar="PEER_JSON",
                    help="run nothing: read a previous --json output of this script (with --compare)")
    args = ap.parse_args(argv)
    if args.res <= 0 or args.res % 16:
        ap.error(f"--res {args.res}: the output side must be a positive multiple of 16")
    for flag in ("batch", "steps", "txt_tokens", "iters"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        ap.error("--peak-tflops must be positive")
    if args.skip_model and args.skip_attention:
        ap.error("--skip-model and --skip-attention together leave nothing to run")
    if args.load and not args.compare:
        ap.error("--load only prints a comparison: give --compare ENGINE_JSON too")
    if args.shape == "flux-dev" and args.device == "cpu" and not args.skip_model and not args.load:
        ap.error("--shape flux-dev on the CPU needs 24 GB (bf16) to 48 GB (f32) for the weights: "
                 "use --shape flux-small or flux-tiny there")
    if args.attn_size is None:
        args.attn_size = "full" if args.device == "cuda" else "small"
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        # The engine's files are read and checked first, so a wrong path fails before minutes of GPU work.
        bench, kernels = load_engine_docs(args.compare)
        if args.load:
            doc = load_json(args.load, "--load")
            for key in ("device", "gemm_flops_per_second"):
                if key not in doc:
                    raise Failure(f"--load {args.load}: key '{key}' missing (not this script's --json output?)")
        else:
            if bench and not args.skip_model:
                check_same_work(bench, args.shape, args.res, args.batch, args.txt_tokens)
            doc = run(args)
            if args.json:
                try:
                    with open(args.json, "w") as f:
                        json.dump(doc, f, indent=2, sort_keys=True)
                        f.write("\n")
                except OSError as e:
                    raise Failure(f"--json {args.json}: {e.strerror}") from None
        report(doc)
        if bench or kernels:
            compare(doc, bench, kernels)
    except Failure as e:
        print(f"peer_bench.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
