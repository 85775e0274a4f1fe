#!/usr/bin/env python3
"""Golden files for importing a pretrained FLUX.1 (`engine model import`), made with the reference
implementation: diffusers (pipeline saving, FluxTransformer2DModel, FluxControlPipeline's LoRA
loading) and transformers (T5EncoderModel, CLIPTextModel).

    tools/.venv-golden/bin/python tools/golden/make_import_goldens.py --out tests/golden/import

Writes (see tests/golden/README.md, "Import"):

  pipeline/                   a small random FLUX pipeline saved by diffusers: transformer/ and
                              text_encoder_2/ (T5) sharded through their index files, vae/,
                              text_encoder/ (CLIP), scheduler/, model_index.json (no tokenizers)
  text.safetensors            the empty prompt as FLUX pipelines encode it: txt [TOKENS, ctx]
                              (T5 on [eos, pad, ...], no mask) and y [vec] (CLIP's pooled output of
                              [bos, eos, eos, ...], 77 tokens)
  encoders.safetensors        both encoders on other ids (float32 ids): t5_ids, t5_out, clip_ids,
                              clip_hidden, clip_pooled
  forward.inputs.safetensors  BFL forward arguments with img = [noisy, LQ] on channels
  forward.out.safetensors     diffusers' base transformer on the noisy half alone
  control-lora.*              control LoRAs (BFL's full and partial form, diffusers' form) and
                              what diffusers computes with them on forward.inputs
  adapter.*                   the adapter format `engine train` writes for an imported model:
                              trained values, the file, and FluxControlPipeline's output with it
  flux-dev-shapes.json        FLUX.1-dev's transformer (BFL keys), autoencoder, T5-XXL and CLIP-L:
                              names, shapes and configs at full size, from the meta device
  schnell.bfl.safetensors     a transformer without guidance in BFL's single-file layout (bf16),
                              with schnell.inputs/out.safetensors (txt, y: the empty prompt)

Everything is float32 on the CPU, single-threaded, seeded; the script fails loudly when a
reference check fails. The only code of ours on the reference path is the random initialisation,
the BFL-layout export (checked against diffusers' converter, as in make_goldens.py) and the
adapter file written the way the format is documented (loaded by diffusers, and its output
cross-checked against an explicit merge).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from safetensors.torch import save_file

import diffusers
import transformers
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxControlPipeline, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

import make_goldens as mg  # BFL export and its check, the patched converters (hidden 64)

HIDDEN, HEADS, HEAD_DIM, AXES = mg.HIDDEN, mg.HEADS, mg.HEAD_DIM, mg.AXES_DIM
Z = 4  # latent channels of the small autoencoder: the transformer takes 4 Z = 16, widened to 32
CTX = 32  # T5's d_model = the transformer's context_in_dim
VEC = 16  # CLIP's hidden size = the transformer's vec_in_dim
TOKENS = 512  # T5 tokens of the empty prompt (FLUX.1-dev's max_sequence_length)
RANK = 4


def fail(msg):
    raise SystemExit(f"IMPORT GOLDEN GENERATION FAILED: {msg}")


def save(path, tensors):
    save_file({k: v.detach().to(torch.float32).clone().contiguous() for k, v in tensors.items()}, path)
    os.chmod(path, 0o644)


def randomise(module, gen, norm_jitter=0.2):
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:  # norm weights
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * norm_jitter)


def transformer(guidance, depth, single):
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * Z, out_channels=4 * Z, num_layers=depth, num_single_layers=single,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=CTX,
        pooled_projection_dim=VEC, guidance_embeds=guidance, axes_dims_rope=tuple(AXES)).eval()


def t5(gen):
    config = T5Config(vocab_size=64, d_model=CTX, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                      eos_token_id=1, pad_token_id=0, decoder_start_token_id=0)
    model = T5EncoderModel(config).eval()
    randomise(model, gen, norm_jitter=0.3)
    with torch.no_grad():  # a bias with some range, so that a wrong bucket shows
        model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(4.0)
    return model


def clip(gen, legacy_eos):
    # CLIP's BPE vocabulary ends with <|startoftext|>, <|endoftext|>; CLIP-L's config keeps the
    # pre-2023 eos_token_id 2 (transformers then pools at the highest id).
    vocab = 520
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=VEC, intermediate_size=40, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5, bos_token_id=0 if legacy_eos else vocab - 2,
                            eos_token_id=2 if legacy_eos else vocab - 1, pad_token_id=1)
    model = CLIPTextModel(config).eval()
    randomise(model, gen)
    return model


def vae(gen):
    model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                          act_fn="silu", latent_channels=Z, norm_num_groups=4, sample_size=32,
                          scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                          mid_block_add_attention=True).eval()
    randomise(model, gen)
    return model


def empty_ids(t5_model, clip_model):
    t5_ids = torch.full((1, TOKENS), t5_model.config.pad_token_id)
    t5_ids[0, 0] = t5_model.config.eos_token_id
    vocab = clip_model.config.vocab_size
    clip_ids = torch.full((1, 77), vocab - 1)
    clip_ids[0, 0] = vocab - 2
    return t5_ids, clip_ids


@torch.no_grad()
def encode(t5_model, clip_model, t5_ids, clip_ids):
    """As FluxPipeline's _get_t5_prompt_embeds / _get_clip_prompt_embeds: no attention mask."""
    txt = t5_model(t5_ids, output_hidden_states=False)[0][0]
    out = clip_model(clip_ids, output_hidden_states=False)
    return txt, out.last_hidden_state[0], out.pooler_output[0]


def forward_inputs(gen, guidance, batch=2, rows=4, cols=6, txt_len=8, control=True):
    L = rows * cols
    img_ids = torch.zeros(L, 3)
    img_ids[:, 1] = (torch.arange(L) // cols).float()
    img_ids[:, 2] = (torch.arange(L) % cols).float()
    noisy = torch.randn(batch, L, 4 * Z, generator=gen)
    lq = torch.randn(batch, L, 4 * Z, generator=gen)
    inp = {
        "img": torch.cat([noisy, lq], dim=2) if control else noisy,
        "img_ids": img_ids[None].repeat(batch, 1, 1),
        "txt": torch.randn(batch, txt_len, CTX, generator=gen),
        "txt_ids": torch.zeros(batch, txt_len, 3),
        "timesteps": 0.05 + 0.9 * torch.rand(batch, generator=gen),
        "y": torch.randn(batch, VEC, generator=gen),
    }
    if guidance:
        inp["guidance"] = torch.tensor([3.5, 4.5][:batch])
    return inp


@torch.no_grad()
def run(model, inp, img=None):
    return model(hidden_states=inp["img"] if img is None else img, encoder_hidden_states=inp["txt"],
                 pooled_projections=inp["y"], timestep=inp["timesteps"], img_ids=inp["img_ids"][0],
                 txt_ids=inp["txt_ids"][0], guidance=inp.get("guidance"), return_dict=True).sample.contiguous()


def widened(base_sd):
    sd = {k: v.clone() for k, v in base_sd.items()}
    w = sd["x_embedder.weight"]
    sd["x_embedder.weight"] = torch.cat([w, torch.zeros_like(w)], dim=1)
    return sd


def widened_model(base_sd, guidance, depth, single):
    model = transformer(guidance, depth, single)
    model.x_embedder = torch.nn.Linear(8 * Z, HIDDEN)
    model.register_to_config(in_channels=8 * Z)
    model.load_state_dict(widened(base_sd), strict=True)
    return model.eval()


def control_pipeline(base_sd, guidance, depth, single):
    model = transformer(guidance, depth, single)
    model.load_state_dict(base_sd, strict=True)
    return FluxControlPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                               tokenizer_2=None, transformer=model)


def close(got, want, label, tol=2e-5):
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    if err > tol:
        fail(f"{label}: relative error {err:.2e} against the explicit merge")
    return err


def merged_bfl(base_bfl, deltas, replace, guidance, depth, single):
    """Explicit merge in BFL space (on the widened base), then diffusers' single-file converter."""
    sd = {k: v.clone() for k, v in base_bfl.items()}
    w = sd["img_in.weight"]
    sd["img_in.weight"] = torch.cat([w, torch.zeros_like(w)], dim=1)
    for k, d in deltas.items():
        if sd[k].shape != d.shape:
            fail(f"merge: {k} {tuple(sd[k].shape)} vs delta {tuple(d.shape)}")
        sd[k] = sd[k] + d
    for k, v in replace.items():
        sd[k] = v.clone()
    model = transformer(guidance, depth, single)
    model.x_embedder = torch.nn.Linear(8 * Z, HIDDEN)
    model.load_state_dict(mg.bfl_to_diffusers_via_diffusers(sd), strict=True)
    return model.eval()


def bfl_linears(depth, single, guidance):
    names = ["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer"]
    if guidance:
        names += ["guidance_in.in_layer", "guidance_in.out_layer"]
    for i in range(depth):
        for s in ("img", "txt"):
            names += [f"double_blocks.{i}.{s}_{m}" for m in ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2")]
    for i in range(single):
        names += [f"single_blocks.{i}.{m}" for m in ("modulation.lin", "linear1", "linear2")]
    return names + ["final_layer.linear", "final_layer.adaLN_modulation.1"]


def control_lora_bfl(base_bfl, names, gen, with_norms=True):
    """BFL's control-LoRA layout (FLUX.1-Canny/Depth-dev-lora): img_in's pair takes the widened
    input, a lora_B bias on every pair, no alpha (scale 1), new QK-norm scales."""
    tensors, deltas, replace = {}, {}, {}
    for name in names:
        out_f, in_f = base_bfl[f"{name}.weight"].shape
        in_f = 8 * Z if name == "img_in" else in_f
        a = torch.randn(RANK, in_f, generator=gen) / math.sqrt(in_f)
        if name == "final_layer.adaLN_modulation.1":
            a = torch.cat([a[: RANK // 2], a[: RANK // 2]])  # diffusers also swaps A's halves; see make_goldens.py
        b = torch.randn(out_f, RANK, generator=gen) * 0.05
        bias = torch.randn(out_f, generator=gen) * 0.05
        tensors.update({f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b, f"{name}.lora_B.bias": bias})
        deltas[f"{name}.weight"] = b @ a
        deltas[f"{name}.bias"] = bias
    if with_norms:
        for k, v in base_bfl.items():
            if k.endswith("_norm.scale"):
                replace[k] = v * (1.0 + 0.05 * torch.randn(v.shape, generator=gen))
                tensors[k] = replace[k]
    return tensors, deltas, replace


def control_loras(out, base_sd, base_bfl, inp, gen, depth, single):
    report = {}
    # a. BFL's full control LoRA, loaded by FluxControlPipeline (which widens x_embedder first).
    t, deltas, replace = control_lora_bfl(base_bfl, bfl_linears(depth, single, True), gen)
    path = os.path.join(out, "control-lora.bfl.safetensors")
    save(path, t)
    pipe = control_pipeline(base_sd, True, depth, single)
    with mg.lora_converters_patched(depth, single):
        pipe.load_lora_weights(path, adapter_name="control")
    if pipe.transformer.x_embedder.in_features != 8 * Z:
        fail("FluxControlPipeline did not widen x_embedder")
    got = run(pipe.transformer, inp)
    report["bfl"] = close(got, run(merged_bfl(base_bfl, deltas, replace, True, depth, single), inp), "control-lora.bfl")
    save(os.path.join(out, "out.control-lora.bfl.safetensors"), {"out": got})

    # b. A partial BFL file (img_in's pair, two other linears, one norm scale): diffusers' BFL
    # converter needs every key, so the reference is the explicit merge run by diffusers.
    names = ["img_in", "double_blocks.0.img_attn.qkv", f"single_blocks.{single - 1}.linear2"]
    t, deltas, _ = control_lora_bfl(base_bfl, names, gen, with_norms=False)
    key = "double_blocks.0.txt_attn.norm.key_norm.scale"
    replace = {key: base_bfl[key] * 1.1}
    t[key] = replace[key]
    save(os.path.join(out, "control-lora.partial.safetensors"), t)
    got = run(merged_bfl(base_bfl, deltas, replace, True, depth, single), inp)
    save(os.path.join(out, "out.control-lora.partial.safetensors"), {"out": got})

    # c. diffusers' form: peft names, x_embedder with the widened input, a few other modules, no
    # biases, full norm replacements under transformer.*.norm_q / norm_added_k.
    t, ref = {}, widened(base_sd)
    for mod in ["x_embedder", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.ff_context.net.2",
                f"single_transformer_blocks.{single - 1}.proj_mlp", "proj_out"]:
        out_f, in_f = ref[f"{mod}.weight"].shape
        a = torch.randn(RANK, in_f, generator=gen) / math.sqrt(in_f)
        b = torch.randn(out_f, RANK, generator=gen) * 0.05
        t[f"transformer.{mod}.lora_A.weight"], t[f"transformer.{mod}.lora_B.weight"] = a, b
        ref[f"{mod}.weight"] = ref[f"{mod}.weight"] + b @ a
    for mod in ["transformer_blocks.0.attn.norm_q", f"single_transformer_blocks.{single - 1}.attn.norm_k"]:
        new = base_sd[f"{mod}.weight"] * (1.0 + 0.05 * torch.randn(HEAD_DIM, generator=gen))
        t[f"transformer.{mod}.weight"] = ref[f"{mod}.weight"] = new
    path = os.path.join(out, "control-lora.diffusers.safetensors")
    save(path, t)
    pipe = control_pipeline(base_sd, True, depth, single)
    pipe.load_lora_weights(path, adapter_name="control")
    got = run(pipe.transformer, inp)
    merged = widened_model(base_sd, True, depth, single)
    merged.load_state_dict(ref, strict=True)
    report["diffusers"] = close(got, run(merged, inp), "control-lora.diffusers")
    save(os.path.join(out, "out.control-lora.diffusers.safetensors"), {"out": got})
    return report


# The adapter `engine train` writes for an imported model (README, "Fine-tune FLUX.1-dev"):
# diffusers/peft names under `transformer.`, lora_A [r, in] / lora_B [out, r], no alpha (scale 1);
# a fused BFL linear as its diffusers members sharing A; img_in's trained full delta as a
# rank-(in) pair A = I, B = delta with the bias delta on lora_B; then every module has a lora_B
# bias (zeros elsewhere), since peft gives all modules one as soon as one has it.
PEFT_MEMBERS = {  # BFL linear (within its block) -> diffusers members, in row order
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"], "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"], "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"], "txt_mlp.2": ["ff_context.net.2"],
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"],
}


def adapter(out, base_sd, base_bfl, inp, gen, depth, single):
    values, deltas = {}, {}
    targets = ["txt_in", "final_layer.linear"]
    targets += [f"double_blocks.{i}.{m}" for i in range(depth) for m in PEFT_MEMBERS if not m.startswith("linear")]
    targets += [f"single_blocks.{i}.{m}" for i in range(single) for m in ("linear1", "linear2")]
    for name in targets:
        out_f, in_f = base_bfl[f"{name}.weight"].shape
        values[f"{name}.lora_down"] = torch.randn(RANK, in_f, generator=gen) / math.sqrt(in_f)
        values[f"{name}.lora_up"] = torch.randn(out_f, RANK, generator=gen) * 0.05
        deltas[f"{name}.weight"] = values[f"{name}.lora_up"] @ values[f"{name}.lora_down"]
    # img_in, trained in full on the widened input (its LQ columns start at zero).
    values["img_in.delta_weight"] = torch.randn(HIDDEN, 8 * Z, generator=gen) * 0.05
    values["img_in.delta_bias"] = torch.randn(HIDDEN, generator=gen) * 0.05
    deltas["img_in.weight"], deltas["img_in.bias"] = values["img_in.delta_weight"], values["img_in.delta_bias"]
    save(os.path.join(out, "adapter.values.safetensors"), values)

    def module(name):
        top = {"txt_in": ["context_embedder"], "final_layer.linear": ["proj_out"], "img_in": ["x_embedder"]}
        if name in top:
            return top[name]
        kind, i, rest = name.split(".", 2)
        block = "transformer_blocks" if kind == "double_blocks" else "single_transformer_blocks"
        return [f"{block}.{i}.{m}" for m in PEFT_MEMBERS[rest]]

    f = {}
    for name in targets:
        down, up = values[f"{name}.lora_down"], values[f"{name}.lora_up"]
        members = module(name)
        start = 0
        for j, m in enumerate(members):
            rows = HIDDEN if j + 1 < len(members) else up.shape[0] - start
            f[f"transformer.{m}.lora_A.weight"] = down
            f[f"transformer.{m}.lora_B.weight"] = up[start:start + rows]
            f[f"transformer.{m}.lora_B.bias"] = torch.zeros(rows)
            start += rows
    f["transformer.x_embedder.lora_A.weight"] = torch.eye(8 * Z)
    f["transformer.x_embedder.lora_B.weight"] = values["img_in.delta_weight"]
    f["transformer.x_embedder.lora_B.bias"] = values["img_in.delta_bias"]
    path = os.path.join(out, "adapter.peft.safetensors")
    save(path, f)
    pipe = control_pipeline(base_sd, True, depth, single)
    pipe.load_lora_weights(path, adapter_name="trained")
    if pipe.transformer.x_embedder.in_features != 8 * Z:
        fail("FluxControlPipeline did not widen x_embedder for the adapter")
    for n, p in pipe.transformer.named_parameters():
        if p.device.type != "cpu":
            fail(f"adapter: {n} not materialised by diffusers ({p.device})")
    got = run(pipe.transformer, inp)
    err = close(got, run(merged_bfl(base_bfl, deltas, {}, True, depth, single), inp), "adapter")
    save(os.path.join(out, "out.adapter.safetensors"), {"out": got})
    return err


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (tests/golden/import)")
    ap.add_argument("--seed", type=int, default=6006)
    ap.add_argument("--transformer-shard", default="300KB", help="max_shard_size of transformer/")
    ap.add_argument("--t5-shard", default="30KB", help="max_shard_size of text_encoder_2/")
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--clip-eos", choices=["legacy", "end-token"], default="legacy")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    gen = torch.Generator().manual_seed(args.seed)
    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)

    flux = transformer(True, args.depth, args.single)
    mg.randomise(flux, gen)
    base_sd = {k: v.detach().clone().contiguous() for k, v in flux.state_dict().items()}
    case = dict(depth=args.depth, depth_single=args.single, guidance=True)
    base_bfl = mg.diffusers_to_bfl(base_sd, case)
    mg.verify_bfl_export(base_bfl, base_sd, "import")
    t5_model, clip_model, vae_model = t5(gen), clip(gen, args.clip_eos == "legacy"), vae(gen)

    pipe_dir = os.path.join(out, "pipeline")
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), vae=vae_model,
                        text_encoder=clip_model, tokenizer=None, text_encoder_2=t5_model, tokenizer_2=None, transformer=flux)
    pipe.save_pretrained(pipe_dir, safe_serialization=True)
    # Sharded as diffusers and transformers shard FLUX.1-dev's transformer and T5-XXL.
    for name, model, size in [("transformer", flux, args.transformer_shard), ("text_encoder_2", t5_model, args.t5_shard)]:
        shutil.rmtree(os.path.join(pipe_dir, name))
        model.save_pretrained(os.path.join(pipe_dir, name), safe_serialization=True, max_shard_size=size)
        index = [f for f in os.listdir(os.path.join(pipe_dir, name)) if f.endswith(".index.json")]
        if len(index) != 1:
            fail(f"{name} was not sharded at {size}: {sorted(os.listdir(os.path.join(pipe_dir, name)))}")
    for root, _, files in os.walk(pipe_dir):
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)

    # The empty prompt and other ids, through the encoders read back from the saved folder.
    t5_back = T5EncoderModel.from_pretrained(os.path.join(pipe_dir, "text_encoder_2")).eval()
    clip_back = CLIPTextModel.from_pretrained(os.path.join(pipe_dir, "text_encoder")).eval()
    t5_ids, clip_ids = empty_ids(t5_back, clip_back)
    txt, _, y = encode(t5_back, clip_back, t5_ids, clip_ids)
    if txt.abs().min(dim=1).values.max() == 0 or not torch.isfinite(txt).all():
        fail("degenerate T5 output")
    save(os.path.join(out, "text.safetensors"), {"txt": txt, "y": y})
    other_t5 = torch.randint(0, 64, (1, 200), generator=gen)
    other_clip = torch.randint(0, 518, (1, 30), generator=gen)
    other_clip[0, 0], other_clip[0, 20] = 518, 519  # bos, and eos inside the sequence
    t5_out, clip_hidden, clip_pooled = encode(t5_back, clip_back, other_t5, other_clip)
    save(os.path.join(out, "encoders.safetensors"), {
        "t5_ids": other_t5[0].float(), "t5_out": t5_out, "clip_ids": other_clip[0].float(),
        "clip_hidden": clip_hidden, "clip_pooled": clip_pooled})

    # Import's promise: the widened model on [noisy, LQ] is the base on noisy alone.
    inp = forward_inputs(gen, True)
    save(os.path.join(out, "forward.inputs.safetensors"), inp)
    base_out = run(flux, inp, img=inp["img"][:, :, : 4 * Z])
    if (run(widened_model(base_sd, True, args.depth, args.single), inp) - base_out).abs().max() > 1e-5:
        fail("zero-padded x_embedder changed the output")
    save(os.path.join(out, "forward.out.safetensors"), {"out": base_out})

    report = {"control": control_loras(out, base_sd, base_bfl, inp, gen, args.depth, args.single)}
    report["adapter"] = adapter(out, base_sd, base_bfl, inp, gen, args.depth, args.single)

    # FLUX.1-schnell's shape: no guidance embedding, one BFL single file in bf16 (as BFL ships
    # it); the reference runs on the same rounded weights in f32.
    schnell = transformer(False, 1, 1)
    mg.randomise(schnell, gen)
    s_sd = {k: v.detach().to(torch.bfloat16).to(torch.float32) for k, v in schnell.state_dict().items()}
    schnell.load_state_dict(s_sd, strict=True)
    s_bfl = mg.diffusers_to_bfl(s_sd, dict(case, depth=1, depth_single=1, guidance=False))
    mg.verify_bfl_export(s_bfl, s_sd, "schnell")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in s_bfl.items()}, os.path.join(out, "schnell.bfl.safetensors"))
    s_inp = forward_inputs(gen, False, batch=1, rows=3, cols=5, txt_len=TOKENS)
    s_inp["txt"], s_inp["y"] = txt[None], y[None]
    save(os.path.join(out, "schnell.inputs.safetensors"), s_inp)
    save(os.path.join(out, "schnell.out.safetensors"), {"out": run(schnell, s_inp, img=s_inp["img"][:, :, : 4 * Z])})
    flux_dev_shapes(os.path.join(out, "flux-dev-shapes.json"))
    print(f"  {json.dumps(report)}")
    print("import goldens written and verified")


def flux_dev_shapes(path):
    """Names, shapes and configs of FLUX.1-dev's parts at their real sizes, from diffusers' and
    transformers' own classes on the meta device (nothing allocated): the transformer in BFL's
    single-file layout (flux1-dev.safetensors), the autoencoder in diffusers' (vae/), T5-XXL and
    CLIP-L as transformers saves them. Tests build sparse files of these shapes."""
    with torch.device("meta"):
        flux = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                      attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                      pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024,
                            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                            mid_block_add_attention=True)
        t5_config = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                             feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
        t5_model = T5EncoderModel(t5_config)
        clip_config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                     bos_token_id=0, eos_token_id=2, pad_token_id=1)
        clip_model = CLIPTextModel(clip_config)
    bfl = mg.diffusers_to_bfl(flux.state_dict(), dict(depth=19, depth_single=38, guidance=True))
    shapes = lambda sd: {k: list(v.shape) for k, v in sorted(sd.items())}
    doc = {
        "transformer": shapes(bfl),
        "vae": shapes(vae.state_dict()),
        "vae_config": {k: v for k, v in vae.config.items() if not k.startswith("_")},
        "t5": shapes(t5_model.state_dict()),
        "t5_config": {k: t5_config.to_dict()[k] for k in ("d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                                                           "relative_attention_max_distance", "feed_forward_proj",
                                                           "layer_norm_epsilon", "eos_token_id", "pad_token_id")},
        "clip": shapes(clip_model.state_dict()),
        "clip_config": {k: clip_config.to_dict()[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                               "num_attention_heads", "max_position_embeddings",
                                                               "hidden_act", "layer_norm_eps", "eos_token_id")},
    }
    params = sum(math.prod(s) for s in doc["transformer"].values())
    if params != 11_901_408_320:
        fail(f"FLUX.1-dev has 11,901,408,320 parameters, the meta model {params}")
    with open(path, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    os.chmod(path, 0o644)


if __name__ == "__main__":
    main()
