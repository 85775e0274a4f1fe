#!/usr/bin/env python3
"""Golden files for the FLUX transformer, made with the reference implementation (diffusers + peft).

Run through `tools/golden.sh` (which pins the versions in tools/golden/requirements.txt):

    tools/golden.sh            # == tools/.venv-golden/bin/python tools/golden/make_goldens.py --out tests/golden

Everything is float32 on CPU, single-threaded, with fixed seeds. See tests/golden/README.md for what
each file holds.

Design rule: the numbers in out*.safetensors come from diffusers' own code only (model forward,
single-file checkpoint converter, LoRA converters and peft injection). The only code of ours on
the reference path is (1) the random initialisation, (2) the BFL-layout export, which is checked
tensor-by-tensor against diffusers' BFL->diffusers converter, and (3) a textual patch of the
FLUX.1-dev sizes (19 / 38 blocks, hidden 3072) that diffusers hard-codes in three converters, so
that they accept a tiny model (see `patched()`). Every LoRA output is additionally cross-checked
against an independent explicit weight merge (W += alpha/rank * B @ A) to pin down the semantics.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shutil
import sys
from contextlib import contextmanager

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # FluxPipeline imports transformers

import torch
from safetensors.torch import save_file

import diffusers
import peft
import safetensors
import numpy
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.loaders import lora_conversion_utils, lora_pipeline, single_file_utils

HIDDEN = 64
HEADS = 2
HEAD_DIM = 32
AXES_DIM = [4, 14, 14]
CTX_DIM = 32
VEC_DIM = 16
MLP_RATIO = 4.0
MLP_HIDDEN = int(HIDDEN * MLP_RATIO)
LORA_RANK = 4

CASES = [
    dict(name="guidance-b2", in_channels=64, out_channels=64, guidance=True, depth=2, depth_single=2,
         batch=2, rows=4, cols=6, txt_len=8, random_ids=False, seed=1001, extras=True),
    dict(name="control-ch128", in_channels=128, out_channels=64, guidance=True, depth=1, depth_single=1,
         batch=1, rows=5, cols=3, txt_len=5, random_ids=False, seed=2002, extras=False),
    dict(name="noguid-b3", in_channels=64, out_channels=64, guidance=False, depth=1, depth_single=1,
         batch=3, rows=2, cols=7, txt_len=4, random_ids=True, seed=3003, extras=False),
]


def fail(msg: str):
    raise SystemExit(f"GOLDEN GENERATION FAILED: {msg}")


# --------------------------------------------------------------------------------------------
# Patching diffusers' hard-coded FLUX.1-dev sizes
# --------------------------------------------------------------------------------------------

def patched(func, replacements):
    """Re-compile `func` from its own source with exact textual replacements.

    Each (old, new, count) must occur exactly `count` times, so that a change in diffusers makes
    this fail loudly rather than silently patch something else.
    """
    src = inspect.getsource(func)
    for old, new, count in replacements:
        n = src.count(old)
        if n != count:
            fail(f"patching {func.__name__}: expected {count} occurrence(s) of {old!r}, found {n}")
        src = src.replace(old, new)
    namespace = dict(func.__globals__)
    exec(compile(src, inspect.getsourcefile(func), "exec"), namespace)
    return namespace[func.__name__]


def single_file_converter():
    return patched(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers,
                   [("inner_dim = 3072", f"inner_dim = {HIDDEN}", 1)])


def bfl_lora_converter(depth, depth_single):
    return patched(lora_conversion_utils._convert_bfl_flux_control_lora_to_diffusers,
                   [("num_layers = 19", f"num_layers = {depth}", 1),
                    ("num_single_layers = 38", f"num_single_layers = {depth_single}", 1),
                    ("inner_dim = 3072", f"inner_dim = {HIDDEN}", 1)])


def kohya_lora_converter():
    # range(19) / range(38) are harmless there (missing blocks are skipped); only the split sizes of
    # single_blocks.N.linear1 are hard-coded.
    return patched(lora_conversion_utils._convert_kohya_flux_lora_to_diffusers,
                   [("dims=[3072, 3072, 3072, 12288]",
                     f"dims=[{HIDDEN}, {HIDDEN}, {HIDDEN}, {MLP_HIDDEN}]", 1)])


@contextmanager
def lora_converters_patched(depth, depth_single):
    saved = (lora_pipeline._convert_bfl_flux_control_lora_to_diffusers,
             lora_pipeline._convert_kohya_flux_lora_to_diffusers)
    lora_pipeline._convert_bfl_flux_control_lora_to_diffusers = bfl_lora_converter(depth, depth_single)
    lora_pipeline._convert_kohya_flux_lora_to_diffusers = kohya_lora_converter()
    try:
        yield
    finally:
        (lora_pipeline._convert_bfl_flux_control_lora_to_diffusers,
         lora_pipeline._convert_kohya_flux_lora_to_diffusers) = saved


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def make_model(case) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=case["in_channels"],
        out_channels=case["out_channels"],
        num_layers=case["depth"],
        num_single_layers=case["depth_single"],
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=CTX_DIM,
        pooled_projection_dim=VEC_DIM,
        guidance_embeds=case["guidance"],
        axes_dims_rope=tuple(AXES_DIM),
    ).eval()


def randomise(model: torch.nn.Module, gen: torch.Generator):
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 2:  # linear weight [out, in]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif name.endswith(".weight") and p.ndim == 1:  # RMSNorm scales (the only 1-D weights)
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.2)
            else:
                fail(f"unexpected parameter {name} {tuple(p.shape)}")


def fresh_model(case, state_dict) -> FluxTransformer2DModel:
    m = make_model(case)
    m.load_state_dict(state_dict, strict=True)
    return m


def config_json(case):
    return {
        "in_channels": case["in_channels"],
        "out_channels": case["out_channels"],
        "vec_in_dim": VEC_DIM,
        "context_in_dim": CTX_DIM,
        "hidden_size": HIDDEN,
        "mlp_ratio": MLP_RATIO,
        "num_heads": HEADS,
        "depth": case["depth"],
        "depth_single_blocks": case["depth_single"],
        "axes_dim": AXES_DIM,
        "theta": 10000,
        "qkv_bias": True,
        "guidance_embed": case["guidance"],
    }


# --------------------------------------------------------------------------------------------
# BFL layout export (ours) + verification with diffusers' converter (theirs)
# --------------------------------------------------------------------------------------------

def swap_halves(t):
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def diffusers_to_bfl(sd, case):
    out = {}

    def lin(dst, src):
        out[f"{dst}.weight"] = sd[f"{src}.weight"]
        out[f"{dst}.bias"] = sd[f"{src}.bias"]

    def cat(dst, srcs):
        out[f"{dst}.weight"] = torch.cat([sd[f"{s}.weight"] for s in srcs], dim=0)
        out[f"{dst}.bias"] = torch.cat([sd[f"{s}.bias"] for s in srcs], dim=0)

    lin("img_in", "x_embedder")
    lin("txt_in", "context_embedder")
    lin("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    lin("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    lin("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    lin("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if case["guidance"]:
        lin("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        lin("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    for i in range(case["depth"]):
        d, b = f"double_blocks.{i}", f"transformer_blocks.{i}"
        lin(f"{d}.img_mod.lin", f"{b}.norm1.linear")
        lin(f"{d}.txt_mod.lin", f"{b}.norm1_context.linear")
        cat(f"{d}.img_attn.qkv", [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"])
        cat(f"{d}.txt_attn.qkv", [f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"])
        out[f"{d}.img_attn.norm.query_norm.scale"] = sd[f"{b}.attn.norm_q.weight"]
        out[f"{d}.img_attn.norm.key_norm.scale"] = sd[f"{b}.attn.norm_k.weight"]
        out[f"{d}.txt_attn.norm.query_norm.scale"] = sd[f"{b}.attn.norm_added_q.weight"]
        out[f"{d}.txt_attn.norm.key_norm.scale"] = sd[f"{b}.attn.norm_added_k.weight"]
        lin(f"{d}.img_attn.proj", f"{b}.attn.to_out.0")
        lin(f"{d}.txt_attn.proj", f"{b}.attn.to_add_out")
        lin(f"{d}.img_mlp.0", f"{b}.ff.net.0.proj")
        lin(f"{d}.img_mlp.2", f"{b}.ff.net.2")
        lin(f"{d}.txt_mlp.0", f"{b}.ff_context.net.0.proj")
        lin(f"{d}.txt_mlp.2", f"{b}.ff_context.net.2")
    for i in range(case["depth_single"]):
        s, b = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        cat(f"{s}.linear1", [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp"])
        lin(f"{s}.linear2", f"{b}.proj_out")
        out[f"{s}.norm.query_norm.scale"] = sd[f"{b}.attn.norm_q.weight"]
        out[f"{s}.norm.key_norm.scale"] = sd[f"{b}.attn.norm_k.weight"]
        lin(f"{s}.modulation.lin", f"{b}.norm.linear")
    lin("final_layer.linear", "proj_out")
    out["final_layer.adaLN_modulation.1.weight"] = swap_halves(sd["norm_out.linear.weight"])
    out["final_layer.adaLN_modulation.1.bias"] = swap_halves(sd["norm_out.linear.bias"])
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def bfl_to_diffusers_via_diffusers(bfl_sd):
    """BFL -> diffusers with diffusers' single-file converter (sizes patched)."""
    ckpt = {k: v.clone() for k, v in bfl_sd.items()}
    conv = single_file_converter()(ckpt)
    if ckpt:
        fail(f"diffusers' converter left BFL keys unconsumed: {sorted(ckpt)}")
    return conv


def verify_bfl_export(bfl_sd, diff_sd, label):
    conv = bfl_to_diffusers_via_diffusers(bfl_sd)
    if set(conv) != set(diff_sd):
        fail(f"{label}: key sets differ: only converted {sorted(set(conv) - set(diff_sd))}, "
             f"only original {sorted(set(diff_sd) - set(conv))}")
    for k, v in diff_sd.items():
        if conv[k].shape != v.shape or conv[k].dtype != v.dtype or not torch.equal(conv[k], v):
            fail(f"{label}: tensor {k} differs after BFL -> diffusers conversion")
    print(f"  [{label}] BFL export verified with diffusers' converter: {len(conv)} tensors identical")


# --------------------------------------------------------------------------------------------
# Inputs and forward
# --------------------------------------------------------------------------------------------

def make_inputs(case, gen):
    B, R, C, Lt = case["batch"], case["rows"], case["cols"], case["txt_len"]
    L = R * C
    img = torch.randn(B, L, case["in_channels"], generator=gen)
    txt = torch.randn(B, Lt, CTX_DIM, generator=gen)
    y = torch.randn(B, VEC_DIM, generator=gen)
    if case["random_ids"]:
        img_ids = torch.rand(L, 3, generator=gen) * 12.0 - 3.0
        txt_ids = torch.rand(Lt, 3, generator=gen) * 12.0 - 3.0
    else:
        img_ids = torch.zeros(L, 3)
        idx = torch.arange(L)
        img_ids[:, 1] = (idx // C).float()
        img_ids[:, 2] = (idx % C).float()
        txt_ids = torch.zeros(Lt, 3)
    timesteps = (0.05 + 0.9 * torch.rand(B, generator=gen)).float()
    inputs = {
        "img": img,
        "img_ids": img_ids[None].repeat(B, 1, 1),
        "txt": txt,
        "txt_ids": txt_ids[None].repeat(B, 1, 1),
        "timesteps": timesteps,
        "y": y,
    }
    if case["guidance"]:
        inputs["guidance"] = torch.tensor([3.5, 5.0, 1.5][:B], dtype=torch.float32)
    return {k: v.to(torch.float32).contiguous() for k, v in inputs.items()}


@torch.no_grad()
def forward(model, inp):
    out = model(
        hidden_states=inp["img"],
        encoder_hidden_states=inp["txt"],
        pooled_projections=inp["y"],
        timestep=inp["timesteps"],
        img_ids=inp["img_ids"][0],
        txt_ids=inp["txt_ids"][0],
        guidance=inp.get("guidance"),
        return_dict=True,
    ).sample
    return out.detach().to(torch.float32).contiguous()


def check_output(out, label, shape):
    if tuple(out.shape) != tuple(shape):
        fail(f"{label}: output shape {tuple(out.shape)} != {tuple(shape)}")
    if not torch.isfinite(out).all():
        fail(f"{label}: non-finite output")
    std = out.std().item()
    if not (0.05 < std < 20.0):
        fail(f"{label}: degenerate output, std {std}")
    return std


def rel_diff(a, b):
    return ((a - b).norm() / b.norm()).item()


def save(path, tensors):
    for k, v in tensors.items():
        if v.dtype not in (torch.float32, torch.bfloat16):
            fail(f"{path}: tensor {k} has dtype {v.dtype}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    os.chmod(path, 0o644)


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------

DOUBLE_PEFT_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                       "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                       "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
SINGLE_PEFT_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"]


def lora_pair(gen, out_f, in_f, b_std=0.05):
    a = torch.randn(LORA_RANK, in_f, generator=gen) / math.sqrt(in_f)
    b = torch.randn(out_f, LORA_RANK, generator=gen) * b_std
    return a, b


def load_with_diffusers(case, base_sd, path):
    """Fresh copy of the base model, LoRA loaded through diffusers' FluxPipeline.load_lora_weights
    (= FluxLoraLoaderMixin.lora_state_dict(..., return_alphas=True) with its format conversions,
    then load_lora_into_transformer -> transformer.load_lora_adapter (peft), plus the norm-layer
    handling for BFL control LoRAs)."""
    model = fresh_model(case, base_sd)
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=model)
    with lora_converters_patched(case["depth"], case["depth_single"]):
        pipe.load_lora_weights(path, adapter_name="golden")
    n_lora = sum(1 for n, _ in model.named_parameters() if ".lora_" in n)
    if n_lora == 0:
        fail(f"diffusers loaded no LoRA parameters from {path}")
    for n, p in model.named_parameters():
        if p.device.type != "cpu" or not torch.isfinite(p).all():
            fail(f"{path}: parameter {n} not materialised / not finite after LoRA load ({p.device}, {p.flatten()[:3]})")
    return model


def merged_forward_diffusers_space(case, base_sd, deltas, inp):
    """Independent check: W += delta on the diffusers state dict, plain forward."""
    sd = {k: v.clone() for k, v in base_sd.items()}
    for k, d in deltas.items():
        if k not in sd or sd[k].shape != d.shape:
            fail(f"merge check: bad target {k}")
        sd[k] = sd[k] + d
    return forward(fresh_model(case, sd), inp)


def merged_forward_bfl_space(case, base_bfl, deltas, replace, inp):
    """Independent check in BFL space: fused W += delta, then diffusers' single-file converter."""
    sd = {k: v.clone() for k, v in base_bfl.items()}
    for k, d in deltas.items():
        if k not in sd or sd[k].shape != d.shape:
            fail(f"merge check: bad BFL target {k} {tuple(d.shape)}")
        sd[k] = sd[k] + d
    for k, v in replace.items():
        if k not in sd or sd[k].shape != v.shape:
            fail(f"merge check: bad BFL replacement {k}")
        sd[k] = v.clone()
    return forward(fresh_model(case, bfl_to_diffusers_via_diffusers(sd)), inp)


def assert_close(got, want, label, tol=2e-5):
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    if err > tol * max(1.0, scale):
        fail(f"{label}: diffusers' LoRA output differs from the explicit merge by {err} (max |out| {scale})")
    return err


def make_lora_peft(case, base_sd, gen):
    """diffusers/peft layout, per-module alpha (mostly == rank, some 2.0 / 8.0)."""
    tensors, deltas = {}, {}
    targets = [f"transformer_blocks.{i}.{t}" for i in range(case["depth"]) for t in DOUBLE_PEFT_TARGETS]
    targets += [f"single_transformer_blocks.{i}.{t}" for i in range(case["depth_single"])
                for t in SINGLE_PEFT_TARGETS]
    special = {0: 2.0, 3: 8.0, 7: 2.0, 13: 8.0, 20: 2.0, len(targets) - 1: 8.0}
    for j, mod in enumerate(targets):
        w = base_sd[f"{mod}.weight"]
        a, b = lora_pair(gen, w.shape[0], w.shape[1], b_std=0.035)
        alpha = special.get(j, float(LORA_RANK))
        tensors[f"transformer.{mod}.lora_A.weight"] = a
        tensors[f"transformer.{mod}.lora_B.weight"] = b
        tensors[f"transformer.{mod}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        deltas[f"{mod}.weight"] = (alpha / LORA_RANK) * (b @ a)
    return tensors, deltas


def make_lora_kohya(case, base_bfl, gen, alpha=2.0):
    tensors, deltas = {}, {}
    names = []
    for i in range(case["depth"]):
        for s in ("img", "txt"):
            for part, bfl in (("attn_qkv", "attn.qkv"), ("attn_proj", "attn.proj"), ("mlp_0", "mlp.0"),
                              ("mlp_2", "mlp.2"), ("mod_lin", "mod.lin")):
                names.append((f"lora_unet_double_blocks_{i}_{s}_{part}", f"double_blocks.{i}.{s}_{bfl}"))
    for i in range(case["depth_single"]):
        for part, bfl in (("linear1", "linear1"), ("linear2", "linear2"), ("modulation_lin", "modulation.lin")):
            names.append((f"lora_unet_single_blocks_{i}_{part}", f"single_blocks.{i}.{bfl}"))
    for kname, bname in names:
        w = base_bfl[f"{bname}.weight"]
        a, b = lora_pair(gen, w.shape[0], w.shape[1], b_std=0.05)
        tensors[f"{kname}.lora_down.weight"] = a
        tensors[f"{kname}.lora_up.weight"] = b
        tensors[f"{kname}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        deltas[f"{bname}.weight"] = (alpha / LORA_RANK) * (b @ a)
    return tensors, deltas


def make_lora_bfl(case, base_bfl, gen):
    """BFL layout as accepted by diffusers' `_convert_bfl_flux_control_lora_to_diffusers`: every
    linear of the model (embedders, modulations, fused qkv / linear1, projections, MLPs, final
    layer) plus full replacement values for every QK-RMSNorm scale (`...query_norm.scale`)."""
    tensors, deltas, replace = {}, {}, {}
    linears = ["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
               "vector_in.out_layer"]
    if case["guidance"]:
        linears += ["guidance_in.in_layer", "guidance_in.out_layer"]
    for i in range(case["depth"]):
        for s in ("img", "txt"):
            linears += [f"double_blocks.{i}.{s}_mod.lin", f"double_blocks.{i}.{s}_attn.qkv",
                        f"double_blocks.{i}.{s}_attn.proj", f"double_blocks.{i}.{s}_mlp.0",
                        f"double_blocks.{i}.{s}_mlp.2"]
    for i in range(case["depth_single"]):
        linears += [f"single_blocks.{i}.modulation.lin", f"single_blocks.{i}.linear1",
                    f"single_blocks.{i}.linear2"]
    linears += ["final_layer.linear", "final_layer.adaLN_modulation.1"]
    # diffusers/peft turn `lora_bias` on for ALL LoRA modules as soon as one `lora_B.bias` exists;
    # a module without one is left with an un-materialised (meta) bias. So: a bias on every module.
    for name in linears:
        w = base_bfl[f"{name}.weight"]
        a, b = lora_pair(gen, w.shape[0], w.shape[1], b_std=0.015)
        if name == "final_layer.adaLN_modulation.1":
            # diffusers' converter applies its (shift, scale) -> (scale, shift) row swap to lora_A as
            # well as to lora_B; on lora_A that permutes the rank rows (A[0:r/2] <-> A[r/2:r])
            # without permuting B's columns, i.e. it changes B @ A. Make the two halves of A's rows
            # equal so that this swap is a no-op and diffusers' result is the mathematically
            # correct one (swap the rows of B @ A, i.e. of B and of the bias, only).
            a = torch.cat([a[: LORA_RANK // 2], a[: LORA_RANK // 2]], dim=0)
        tensors[f"{name}.lora_A.weight"] = a
        tensors[f"{name}.lora_B.weight"] = b
        deltas[f"{name}.weight"] = b @ a  # no alpha in this layout: scale 1
        bb = torch.randn(w.shape[0], generator=gen) * 0.015
        tensors[f"{name}.lora_B.bias"] = bb
        deltas[f"{name}.bias"] = bb
    for k, v in base_bfl.items():
        if k.endswith("_norm.scale"):
            new = v * (1.0 + 0.05 * torch.randn(v.shape, generator=gen))
            tensors[k] = new
            replace[k] = new
    return tensors, deltas, replace


def lora_cases(case, base_sd, base_bfl, inp, base_out, outdir, gen):
    report = {}

    # a. peft / diffusers layout with per-module alpha
    t, deltas = make_lora_peft(case, base_sd, gen)
    path = os.path.join(outdir, "lora.peft.safetensors")
    save(path, t)
    out = forward(load_with_diffusers(case, base_sd, path), inp)
    ref = merged_forward_diffusers_space(case, base_sd, deltas, inp)
    err = assert_close(out, ref, "lora.peft")
    # alpha must matter: merge with alpha == rank everywhere must NOT match
    no_alpha = {}
    for k in deltas:
        mod = k[: -len(".weight")]
        no_alpha[k] = t[f"transformer.{mod}.lora_B.weight"] @ t[f"transformer.{mod}.lora_A.weight"]
    ref_noalpha = merged_forward_diffusers_space(case, base_sd, no_alpha, inp)
    if rel_diff(out, ref_noalpha) < 1e-3:
        fail("lora.peft: per-module alpha had no effect in diffusers")
    check_output(out, "lora.peft", base_out.shape)
    save(os.path.join(outdir, "out.lora-peft.safetensors"), {"out": out})
    report["peft"] = dict(rel_change=rel_diff(out, base_out), merge_err=err,
                          alpha_effect=rel_diff(out, ref_noalpha))

    # b. kohya sd-scripts layout
    t, deltas = make_lora_kohya(case, base_bfl, gen)
    path = os.path.join(outdir, "lora.kohya.safetensors")
    save(path, t)
    out = forward(load_with_diffusers(case, base_sd, path), inp)
    ref = merged_forward_bfl_space(case, base_bfl, deltas, {}, inp)
    err = assert_close(out, ref, "lora.kohya")
    check_output(out, "lora.kohya", base_out.shape)
    save(os.path.join(outdir, "out.lora-kohya.safetensors"), {"out": out})
    report["kohya"] = dict(rel_change=rel_diff(out, base_out), merge_err=err)

    # c. BFL layout (control-LoRA style, the only BFL LoRA layout diffusers converts)
    t, deltas, replace = make_lora_bfl(case, base_bfl, gen)
    path = os.path.join(outdir, "lora.bfl.safetensors")
    save(path, t)
    out = forward(load_with_diffusers(case, base_sd, path), inp)
    ref = merged_forward_bfl_space(case, base_bfl, deltas, replace, inp)
    err = assert_close(out, ref, "lora.bfl")
    check_output(out, "lora.bfl", base_out.shape)
    save(os.path.join(outdir, "out.lora-bfl.safetensors"), {"out": out})
    report["bfl"] = dict(rel_change=rel_diff(out, base_out), merge_err=err)
    return report


# --------------------------------------------------------------------------------------------

def make_case(case, root):
    print(f"case {case['name']}")
    outdir = os.path.join(root, case["name"])
    shutil.rmtree(outdir, ignore_errors=True)  # no stale files from an older version of this script
    os.makedirs(outdir)
    gen = torch.Generator().manual_seed(case["seed"])

    model = make_model(case)
    randomise(model, gen)
    base_sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    bfl_sd = diffusers_to_bfl(base_sd, case)
    verify_bfl_export(bfl_sd, base_sd, case["name"])

    inp = make_inputs(case, gen)
    out = forward(model, inp)
    B, L = inp["img"].shape[:2]
    std = check_output(out, case["name"], (B, L, case["out_channels"]))
    # determinism: a second forward on a fresh copy must agree bit for bit
    if not torch.equal(out, forward(fresh_model(case, base_sd), inp)):
        fail(f"{case['name']}: forward is not deterministic")

    with open(os.path.join(outdir, "config.json"), "w") as f:
        json.dump(config_json(case), f, indent=2)
        f.write("\n")
    os.chmod(os.path.join(outdir, "config.json"), 0o644)
    save(os.path.join(outdir, "transformer.diffusers.safetensors"), base_sd)
    save(os.path.join(outdir, "transformer.bfl.safetensors"), bfl_sd)
    save(os.path.join(outdir, "inputs.safetensors"), inp)
    save(os.path.join(outdir, "out.safetensors"), {"out": out})
    info = dict(out_std=std)

    if case["extras"]:
        bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in bfl_sd.items()}
        save(os.path.join(outdir, "transformer.bfl.bf16.safetensors"), bf16)
        rounded_sd = {k: v.to(torch.bfloat16).to(torch.float32) for k, v in base_sd.items()}
        verify_bfl_export({k: v.to(torch.float32) for k, v in bf16.items()}, rounded_sd, case["name"] + "/bf16")
        out_bf16 = forward(fresh_model(case, rounded_sd), inp)
        check_output(out_bf16, "bf16", out.shape)
        save(os.path.join(outdir, "out.bf16.safetensors"), {"out": out_bf16})
        info["bf16_rel_change"] = rel_diff(out_bf16, out)
        info["lora"] = lora_cases(case, base_sd, bfl_sd, inp, out, outdir, gen)
    print(f"  {json.dumps(info)}")
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (tests/golden)")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)
    diffusers.utils.logging.set_verbosity_error()

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, "
          f"safetensors {safetensors.__version__}, numpy {numpy.__version__}")
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for case in CASES:
        results[case["name"]] = make_case(case, args.out)
    print("all goldens written and verified")


if __name__ == "__main__":
    main()
