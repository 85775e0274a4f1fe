#!/usr/bin/env python3
"""Golden LoRA gradients for the FLUX transformer, made with PyTorch autograd through diffusers + peft.

    tools/.venv-golden/bin/python tools/golden/make_lora_grad_goldens.py --golden tests/golden

Run by `tools/golden.sh` after make_goldens.py, whose `guidance-b2` model (2 double + 2 single
blocks, guidance embedding; `<golden>/guidance-b2/transformer.diffusers.safetensors`) is the base
here, read back from that file rather than saved again so that this folder stays small.

Two adapters on every token-path linear the engine trains (x_embedder, context_embedder, every
block's attention / MLP projections, single blocks' to_q/to_k/to_v/proj_mlp/proj_out, proj_out),
each loaded through diffusers' own `FluxPipeline.load_lora_weights` (peft injection), both factors
random and non-zero so that every gradient is:

  peft     distinct lora_A per module and a per-module `alpha` (scale alpha / rank, mostly != 1):
           the general file the engine's loader reads.
  trainer  the layout `engine train` exports (`write_lora`): no alpha (scale 1), and the members
           of a fused BFL linear (to_q/to_k/to_v, add_*_proj, and single blocks' q/k/v/proj_mlp)
           share one lora_A, i.e. one fused adapter whose gradients the trainer's `LoraParams`
           names.

The model and its adapters run in float64 on the float32 values of the files (diffusers still
builds its sinusoidal timestep and rotary tables in float32, as the engine does), so the goldens
carry no f32 accumulation error of their own; loss = sum(out * g_out) with a fixed random g_out, and `loss.backward()` gives the gradient of every lora_A / lora_B. Checked
here: the peft gradients equal those of an independent explicit merge W + (alpha/rank) B @ A
differentiated with `torch.func.functional_call` (so the scale convention is pinned), and the
adapters change the output. Writes into `<golden>/lora-grads/`:

  inputs.safetensors        BFL forward arguments (as in the case folders), seeded
  lora.<kind>.safetensors   the adapter, diffusers/peft keys
  grads.<kind>.safetensors  `g_out` [B,L,Cout], `out` (the forward with the adapter) and, under
                            each lora_A / lora_B key of the adapter, d loss / d that tensor
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from safetensors.torch import load_file

import diffusers
import make_goldens as mg

BASE = "guidance-b2"
SEED = 5005
FOLDER = "lora-grads"
PROJ_OUT_ALPHA = 6.0

TOP_TARGETS = ["x_embedder", "context_embedder", "proj_out"]
# Modules that one fused BFL linear stacks: the trainer's adapter shares lora_A among them.
DOUBLE_FUSED = [["attn.to_q", "attn.to_k", "attn.to_v"], ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]]
SINGLE_FUSED = [["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]]


def base_case():
    return next(c for c in mg.CASES if c["name"] == BASE)


def targets(case):
    out = list(TOP_TARGETS)
    out += [f"transformer_blocks.{i}.{t}" for i in range(case["depth"]) for t in mg.DOUBLE_PEFT_TARGETS]
    out += [f"single_transformer_blocks.{i}.{t}" for i in range(case["depth_single"]) for t in mg.SINGLE_PEFT_TARGETS]
    return out


def fused_groups(case):
    groups = []
    for i in range(case["depth"]):
        groups += [[f"transformer_blocks.{i}.{m}" for m in g] for g in DOUBLE_FUSED]
    for i in range(case["depth_single"]):
        groups += [[f"single_transformer_blocks.{i}.{m}" for m in g] for g in SINGLE_FUSED]
    return groups


def make_lora(case, base_sd, gen, kind):
    """(file tensors, {module: (A, B, scale)})."""
    tensors, factors = {}, {}
    shared = {}  # module -> the module whose A it reuses (trainer layout)
    if kind == "trainer":
        for group in fused_groups(case):
            for m in group[1:]:
                shared[m] = group[0]
    # alpha / rank in {0.5, 1, 2, 3}: a scale applied twice, or not at all, cannot pass.
    alphas = [2.0, 4.0, 8.0, 12.0]
    for mod in targets(case):
        w = base_sd[f"{mod}.weight"]
        a, b = mg.lora_pair(gen, w.shape[0], w.shape[1], b_std=0.035)
        if mod in shared:
            a = factors[shared[mod]][0]
        tensors[f"transformer.{mod}.lora_A.weight"] = a.clone()
        tensors[f"transformer.{mod}.lora_B.weight"] = b
        if kind == "peft":
            alpha = alphas[int(torch.randint(len(alphas), (1,), generator=gen))]
            if mod.endswith("proj_out"):
                # diffusers passes per-module alphas to peft as `alpha_pattern` keyed by module
                # name, and peft matches a key as a dotted suffix, first key first: the top-level
                # `proj_out`'s alpha lands on every `single_transformer_blocks.N.proj_out` too.
                # One alpha (!= rank) for all of them keeps diffusers right.
                alpha = PROJ_OUT_ALPHA
            tensors[f"transformer.{mod}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
            scale = alpha / mg.LORA_RANK
        else:
            scale = 1.0
        factors[mod] = (a, b, scale)
    return tensors, factors


def call(model, inp, params=None):
    kwargs = dict(
        hidden_states=inp["img"],
        encoder_hidden_states=inp["txt"],
        pooled_projections=inp["y"],
        timestep=inp["timesteps"],
        img_ids=inp["img_ids"][0],
        txt_ids=inp["txt_ids"][0],
        guidance=inp.get("guidance"),
        return_dict=True,
    )
    if params is None:
        return model(**kwargs).sample
    return torch.func.functional_call(model, params, args=(), kwargs=kwargs).sample


def peft_gradients(case, base_sd, path, inp64, g_out64):
    """diffusers' loader + peft, in float64: the output and d loss / d every LoRA factor, by file key."""
    model = mg.load_with_diffusers(case, base_sd, path).to(torch.float64)
    lora = {}
    for name, p in model.named_parameters():
        is_lora = ".lora_" in name
        p.requires_grad_(is_lora)
        if is_lora:
            # peft: <module>.lora_A.<adapter>.weight -> file: transformer.<module>.lora_A.weight
            module, which, _adapter, leaf = name.rsplit(".", 3)
            if leaf != "weight":
                mg.fail(f"unexpected LoRA parameter {name}")
            lora[f"transformer.{module}.{which}.weight"] = p
    out = call(model, inp64)
    (out * g_out64).sum().backward()
    return out.detach(), {k: p.grad.detach().clone() for k, p in lora.items()}


def merged_gradients(case, base_sd, factors, inp64, g_out64):
    """Independent of peft: W + scale * B @ A in a plain model, differentiated wrt A and B."""
    model = mg.fresh_model(case, base_sd).to(torch.float64)
    for p in model.parameters():
        p.requires_grad_(False)
    params = dict(model.named_parameters())
    leaves = {}
    for mod, (a, b, scale) in factors.items():
        a64 = a.to(torch.float64).requires_grad_(True)
        b64 = b.to(torch.float64).requires_grad_(True)
        leaves[mod] = (a64, b64)
        params[f"{mod}.weight"] = params[f"{mod}.weight"] + scale * (b64 @ a64)
    out = call(model, inp64, params)
    (out * g_out64).sum().backward()
    grads = {}
    for mod, (a64, b64) in leaves.items():
        grads[f"transformer.{mod}.lora_A.weight"] = a64.grad
        grads[f"transformer.{mod}.lora_B.weight"] = b64.grad
    return out.detach(), grads


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def make_kind(kind, case, base_sd, inp, g_out, base_out, outdir, gen):
    tensors, factors = make_lora(case, base_sd, gen, kind)
    path = os.path.join(outdir, f"lora.{kind}.safetensors")
    mg.save(path, tensors)
    inp64 = {k: v.to(torch.float64) for k, v in inp.items()}
    g_out64 = g_out.to(torch.float64)

    out, grads = peft_gradients(case, base_sd, path, inp64, g_out64)
    want_keys = {k for k in tensors if not k.endswith(".alpha")}
    if set(grads) != want_keys:
        mg.fail(f"{kind}: peft trained {sorted(set(grads) ^ want_keys)} differently from the file")
    ref_out, ref_grads = merged_gradients(case, base_sd, factors, inp64, g_out64)
    out_err = rel(out, ref_out)
    grad_err = max(rel(grads[k], ref_grads[k]) for k in grads)
    if out_err > 1e-10 or grad_err > 1e-10:
        mg.fail(f"{kind}: peft differs from the explicit merge (output {out_err:.2e}, gradients {grad_err:.2e})")
    change = ((out - base_out).norm() / base_out.norm()).item()
    if change < 1e-2:
        mg.fail(f"{kind}: the adapter changes the output by only {change:.2e}")
    for k, g in grads.items():
        if not torch.isfinite(g).all() or g.abs().max() == 0:
            mg.fail(f"{kind}: gradient of {k} is zero or not finite")

    saved = {"g_out": g_out, "out": out.to(torch.float32)}
    saved.update({k: g.to(torch.float32) for k, g in grads.items()})
    mg.save(os.path.join(outdir, f"grads.{kind}.safetensors"), saved)
    print(f"  [{kind}] {len(grads)} LoRA tensors, output change {change:.3f}, "
          f"peft vs explicit merge: output {out_err:.1e}, gradients {grad_err:.1e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--golden", required=True, help="the golden folder (tests/golden), with make_goldens.py's output in it")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    diffusers.utils.logging.set_verbosity_error()

    case = base_case()
    base_sd = load_file(os.path.join(args.golden, BASE, "transformer.diffusers.safetensors"))
    outdir = os.path.join(args.golden, FOLDER)
    shutil.rmtree(outdir, ignore_errors=True)
    os.makedirs(outdir)
    print(f"lora gradients on {BASE}")

    gen = torch.Generator().manual_seed(SEED)
    inp = mg.make_inputs(case, gen)
    mg.save(os.path.join(outdir, "inputs.safetensors"), inp)
    model = mg.fresh_model(case, base_sd).to(torch.float64)
    with torch.no_grad():
        base_out = call(model, {k: v.to(torch.float64) for k, v in inp.items()})
    g_out = torch.randn(base_out.shape, generator=gen)
    for kind in ("peft", "trainer"):
        make_kind(kind, case, base_sd, inp, g_out, base_out, outdir, gen)
    print("LoRA gradient goldens written and verified")


if __name__ == "__main__":
    main()
