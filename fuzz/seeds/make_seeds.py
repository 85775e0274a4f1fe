"""Writes the fuzz seeds in this folder: small valid files of each layout the target maps
(diffusers and BFL transformers, peft and kohya LoRAs), so that libFuzzer starts past the header
checks. Headers are built by hand, independently of the loaders crate.

    python3 fuzz/seeds/make_seeds.py fuzz/seeds/checkpoint
"""
import json, struct, sys, os
def st(tensors, meta=None):
    # tensors: list of (name, dtype, shape, bytes)
    hdr = {}
    if meta: hdr["__metadata__"] = meta
    off = 0; data = b""
    for n, dt, shape, b in tensors:
        hdr[n] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(b)]}
        off += len(b); data += b
    h = json.dumps(hdr, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h)) + h + data
def f32(n, start=0.0): return struct.pack("<%df" % n, *[start + i * 0.5 for i in range(n)])
def bf16(n): return b"".join(struct.pack("<H", 0x3f80 + i) for i in range(n))
h = 4
d = "transformer."
diff = [(d+"x_embedder.weight","F32",[h,2],f32(h*2)), (d+"x_embedder.bias","F32",[h],f32(h))]
for m in ["to_q","to_k","to_v"]:
    diff += [(d+"transformer_blocks.0.attn."+m+".weight","F32",[h,h],f32(h*h)), (d+"transformer_blocks.0.attn."+m+".bias","F32",[h],f32(h))]
diff += [(d+"transformer_blocks.0.attn.norm_q.weight","F32",[2],f32(2))]
for m in ["attn.to_q","attn.to_k","attn.to_v"]:
    diff += [(d+"single_transformer_blocks.0."+m+".weight","F32",[h,h],f32(h*h))]
diff += [(d+"single_transformer_blocks.0.proj_mlp.weight","F32",[2*h,h],f32(2*h*h))]
diff += [(d+"norm_out.linear.weight","F32",[2*h,h],f32(2*h*h)), (d+"norm_out.linear.bias","F32",[2*h],f32(2*h))]
bfl = [("double_blocks.0.img_attn.qkv.weight","BF16",[3*h,h],bf16(3*h*h)), ("double_blocks.0.img_attn.norm.key_norm.scale","F16",[2],b"\x00\x3c\x00\x40"),
       ("single_blocks.0.linear1.weight","BF16",[4,h],bf16(4*h)), ("img_in.weight","F32",[h,2],f32(h*2))]
peft = [(d+"transformer_blocks.0.attn.to_k.lora_A.weight","F32",[2,h],f32(2*h)), (d+"transformer_blocks.0.attn.to_k.lora_B.weight","F32",[h,2],f32(2*h)),
        (d+"norm_out.linear.lora_A.weight","F32",[2,h],f32(2*h)), (d+"norm_out.linear.lora_B.weight","F32",[2*h,2],f32(4*h)), (d+"norm_out.linear.alpha","F32",[],f32(1, 4.0))]
meta = {"format":"pt","lora_adapter_metadata": json.dumps({"r":2,"lora_alpha":4,"rank_pattern":{},"alpha_pattern":{"to_k":1}})}
kohya = [("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight","BF16",[2,h],bf16(2*h)), ("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight","BF16",[3*h,2],bf16(6*h)),
         ("lora_unet_double_blocks_0_img_attn_qkv.alpha","F32",[],f32(1,2.0))]
out = sys.argv[1]
for name, blob in [("diffusers", st(diff)), ("bfl", st(bfl)), ("peft_lora", st(peft, meta)), ("kohya_lora", st(kohya))]:
    open(os.path.join(out, name + ".safetensors"), "wb").write(blob)
