#!/usr/bin/env python3
"""Golden files for the FLUX autoencoder, made with diffusers' `AutoencoderKL` (the reference).

    tools/.venv-golden/bin/python tools/golden/make_ae_goldens.py --out tests/golden/ae

A small random model shaped like FLUX's AE (no quant convs, mid-block attention, GroupNorm eps 1e-6,
scale 0.3611 / shift 0.1159), float32 on CPU, single-threaded, fixed seed. Writes:

  ae.diffusers.safetensors  the model's own state dict (diffusers layout)
  ae.bfl.safetensors        the same weights under BFL's keys (flux/modules/autoencoder.py), checked
                            tensor by tensor against diffusers' LDM->diffusers VAE converter
  config.json               BFL AutoEncoderParams field names (+ norm_num_groups, 32 in FLUX)
  io.safetensors            image [2,3,24,40] in [-1,1]; latent = scale * (posterior.mean - shift);
                            decoded = vae.decode(latent / scale + shift)

The only code of ours on the reference path is the random initialisation and the BFL export.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from safetensors.torch import save_file

from diffusers import AutoencoderKL
from diffusers.loaders import single_file_utils

CH = 16
CH_MULT = [1, 2]
NUM_RES_BLOCKS = 1
Z_CHANNELS = 4
GROUPS = 8
SCALE = 0.3611
SHIFT = 0.1159
BATCH, HEIGHT, WIDTH = 2, 24, 40
SEED = 4242


def fail(msg: str):
    raise SystemExit(f"AE GOLDEN GENERATION FAILED: {msg}")


def build() -> AutoencoderKL:
    levels = len(CH_MULT)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(CH * m for m in CH_MULT),
        layers_per_block=NUM_RES_BLOCKS,
        act_fn="silu",
        latent_channels=Z_CHANNELS,
        norm_num_groups=GROUPS,
        sample_size=HEIGHT,
        scaling_factor=SCALE,
        shift_factor=SHIFT,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    ).eval()
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return vae


def to_bfl(sd: dict, levels: int) -> dict:
    """diffusers AutoencoderKL keys -> BFL keys (inverse of diffusers' convert_ldm_vae_checkpoint)."""
    out = {}
    for key, t in sd.items():
        k = key
        for side in ("encoder", "decoder"):
            k = k.replace(f"{side}.conv_norm_out.", f"{side}.norm_out.")
            k = k.replace(f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.")
            k = k.replace(f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.")
            if f"{side}.mid_block.attentions.0." in k:
                k = k.replace(f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.")
                k = (k.replace("group_norm.", "norm.").replace("to_q.", "q.").replace("to_k.", "k.")
                     .replace("to_v.", "v.").replace("to_out.0.", "proj_out."))
                if k.endswith("weight") and t.ndim == 2:
                    t = t[:, :, None, None]
        for i in range(levels):
            k = k.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            k = k.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            j = levels - 1 - i
            k = k.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{j}.block.")
            k = k.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{j}.upsample.")
        k = k.replace("conv_shortcut.", "nin_shortcut.")
        out[k] = t.contiguous().clone()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (tests/golden/ae)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)

    vae = build()
    sd = {k: v.detach().contiguous().clone() for k, v in vae.state_dict().items()}
    if any(k.startswith(("quant_conv", "post_quant_conv")) for k in sd):
        fail("quant convs present; FLUX's AE has none")
    bfl = to_bfl(sd, len(CH_MULT))

    # Our BFL export must be exactly what diffusers' own LDM/BFL VAE converter maps back to sd.
    back = single_file_utils.convert_ldm_vae_checkpoint(bfl, dict(vae.config))
    if set(back) != set(sd):
        fail(f"converter keys differ: only ours {sorted(set(sd) - set(back))[:5]}, only converted {sorted(set(back) - set(sd))[:5]}")
    for k in sd:
        if back[k].shape != sd[k].shape or not torch.equal(back[k], sd[k]):
            fail(f"converter disagrees on {k}")
    # And the converted weights load into a fresh model (strict).
    fresh = build()
    fresh.load_state_dict(back, strict=True)

    gen = torch.Generator().manual_seed(SEED + 1)
    image = torch.rand((BATCH, 3, HEIGHT, WIDTH), generator=gen) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(image).latent_dist.mean
        latent = SCALE * (mean - SHIFT)
        decoded = vae.decode(latent / SCALE + SHIFT).sample
    f = 2 ** (len(CH_MULT) - 1)
    assert latent.shape == (BATCH, Z_CHANNELS, HEIGHT // f, WIDTH // f), latent.shape

    save_file(sd, os.path.join(args.out, "ae.diffusers.safetensors"))
    save_file(bfl, os.path.join(args.out, "ae.bfl.safetensors"))
    save_file({"image": image.contiguous(), "latent": latent.contiguous(), "decoded": decoded.contiguous()},
              os.path.join(args.out, "io.safetensors"))
    config = dict(resolution=HEIGHT, in_channels=3, ch=CH, out_ch=3, ch_mult=CH_MULT, num_res_blocks=NUM_RES_BLOCKS,
                  z_channels=Z_CHANNELS, scale_factor=SCALE, shift_factor=SHIFT, norm_num_groups=GROUPS)
    with open(os.path.join(args.out, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
        fh.write("\n")
    print(f"ae goldens: {len(sd)} tensors, latent {tuple(latent.shape)} |{latent.abs().max():.3f}|, "
          f"decoded {tuple(decoded.shape)} |{decoded.abs().max():.3f}| -> {args.out}")


if __name__ == "__main__":
    main()
