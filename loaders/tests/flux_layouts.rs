mod common;

use common::{f32_file, iota, message, raw};
use loaders::flux::{FluxCheckpoint, Layout};
use loaders::safetensors::{Checkpoint, FileDType};

const H: usize = 2;

fn flux(name: &str, bytes: Vec<u8>) -> loaders::Result<FluxCheckpoint> {
    FluxCheckpoint::from_checkpoint(Checkpoint::from_bytes(name, bytes)?)
}

/// A one-block diffusers transformer at hidden 2, every tensor with its own value range
/// (tensor k holds 100k, 100k + 1, ...), so each element's origin is known.
fn diffusers_tensors() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let specs: [(&str, &[usize]); 16] = [
        ("x_embedder.weight", &[H, 3]),
        ("transformer_blocks.0.attn.to_q.weight", &[H, H]),
        ("transformer_blocks.0.attn.to_k.weight", &[H, H]),
        ("transformer_blocks.0.attn.to_v.weight", &[H, H]),
        ("transformer_blocks.0.attn.to_q.bias", &[H]),
        ("transformer_blocks.0.attn.to_k.bias", &[H]),
        ("transformer_blocks.0.attn.to_v.bias", &[H]),
        ("transformer_blocks.0.attn.norm_added_k.weight", &[1]),
        ("transformer_blocks.0.ff_context.net.0.proj.weight", &[4 * H, H]),
        ("single_transformer_blocks.0.attn.to_q.weight", &[H, H]),
        ("single_transformer_blocks.0.attn.to_k.weight", &[H, H]),
        ("single_transformer_blocks.0.attn.to_v.weight", &[H, H]),
        ("single_transformer_blocks.0.proj_mlp.weight", &[4 * H, H]),
        ("norm_out.linear.weight", &[2 * H, H]),
        ("norm_out.linear.bias", &[2 * H]),
        ("proj_out.weight", &[3, H]),
    ];
    specs
        .iter()
        .enumerate()
        .map(|(k, (name, shape))| (format!("transformer.{name}"), shape.to_vec(), iota(shape.iter().product(), 100.0 * k as f32)))
        .collect()
}

fn file_of(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let refs: Vec<(&str, &[usize], &[f32])> = tensors.iter().map(|(n, s, v)| (n.as_str(), s.as_slice(), v.as_slice())).collect();
    f32_file(&refs, &[])
}

#[test]
fn diffusers_names_map_to_bfl() {
    let f = flux("d.safetensors", file_of(&diffusers_tensors())).unwrap();
    assert_eq!(f.layout(), Layout::Diffusers);
    assert_eq!(f.layout().to_string(), "diffusers");
    let names: Vec<&str> = f.names().collect();
    assert_eq!(
        names,
        [
            "double_blocks.0.img_attn.qkv.bias",
            "double_blocks.0.img_attn.qkv.weight",
            "double_blocks.0.txt_attn.norm.key_norm.scale",
            "double_blocks.0.txt_mlp.0.weight",
            "final_layer.adaLN_modulation.1.bias",
            "final_layer.adaLN_modulation.1.weight",
            "final_layer.linear.weight",
            "img_in.weight",
            "single_blocks.0.linear1.weight",
        ]
    );
    assert_eq!(f.dtype("img_in.weight"), Some(FileDType::F32));
    assert_eq!(f.shape("no.such"), None);
}

#[test]
fn split_projections_fuse_in_q_k_v_order() {
    let f = flux("d.safetensors", file_of(&diffusers_tensors())).unwrap();
    // Tensors 1, 2, 3 are to_q, to_k, to_v (base 100, 200, 300): row r of the fused [6, 2]
    // comes from part r / 2, its own row r % 2.
    let qkv = f.load("double_blocks.0.img_attn.qkv.weight").unwrap();
    assert_eq!(qkv.shape, [3 * H, H]);
    assert_eq!(f.shape("double_blocks.0.img_attn.qkv.weight").unwrap(), qkv.shape);
    let mut expected = Vec::new();
    for r in 0..3 * H {
        for c in 0..H {
            expected.push(100.0 * (1 + r / H) as f32 + ((r % H) * H + c) as f32);
        }
    }
    assert_eq!(qkv.to_f32(), expected);
    assert_eq!(f.load("double_blocks.0.img_attn.qkv.bias").unwrap().to_f32(), [400.0, 401.0, 500.0, 501.0, 600.0, 601.0]);
    assert_eq!(
        f.source("double_blocks.0.img_attn.qkv.weight").unwrap(),
        "transformer.transformer_blocks.0.attn.to_q.weight + attn.to_k + attn.to_v"
    );

    // linear1 = rows of q, k, v (2 each) then the 8 rows of proj_mlp (tensors 9..=12).
    let linear1 = f.load("single_blocks.0.linear1.weight").unwrap();
    assert_eq!(linear1.shape, [3 * H + 4 * H, H]);
    let v = linear1.to_f32();
    assert_eq!(&v[..2], [900.0, 901.0]);
    assert_eq!(&v[4..6], [1000.0, 1001.0]);
    assert_eq!(&v[8..10], [1100.0, 1101.0]);
    assert_eq!(&v[12..], iota(4 * H * H, 1200.0));
}

#[test]
fn final_modulation_halves_are_swapped() {
    let f = flux("d.safetensors", file_of(&diffusers_tensors())).unwrap();
    // norm_out.linear is tensor 13: rows (scale0, scale1, shift0, shift1) of 2 values each.
    let w = f.load("final_layer.adaLN_modulation.1.weight").unwrap();
    assert_eq!(w.shape, [2 * H, H]);
    assert_eq!(w.to_f32(), [1304.0, 1305.0, 1306.0, 1307.0, 1300.0, 1301.0, 1302.0, 1303.0]);
    let b = f.load("final_layer.adaLN_modulation.1.bias").unwrap();
    assert_eq!(b.to_f32(), [1402.0, 1403.0, 1400.0, 1401.0]);
    assert_eq!(f.source("final_layer.adaLN_modulation.1.bias").unwrap(), "transformer.norm_out.linear.bias (halves swapped)");
    // Plain renames keep their values.
    assert_eq!(f.load("final_layer.linear.weight").unwrap().to_f32(), iota(3 * H, 1500.0));
    assert_eq!(f.load("double_blocks.0.txt_attn.norm.key_norm.scale").unwrap().to_f32(), [700.0]);
}

#[test]
fn bfl_files_keep_their_names_without_the_comfyui_prefix() {
    let bytes = f32_file(
        &[
            ("model.diffusion_model.double_blocks.3.img_attn.qkv.weight", &[6, 2], &iota(12, 0.0)),
            ("model.diffusion_model.double_blocks.3.img_attn.norm.query_norm.scale", &[2], &[1.0, 2.0]),
            ("model.diffusion_model.single_blocks.0.modulation.lin.bias", &[6], &iota(6, 50.0)),
        ],
        &[],
    );
    let f = flux("bfl.safetensors", bytes).unwrap();
    assert_eq!(f.layout(), Layout::Bfl);
    assert_eq!(
        f.names().collect::<Vec<_>>(),
        ["double_blocks.3.img_attn.norm.query_norm.scale", "double_blocks.3.img_attn.qkv.weight", "single_blocks.0.modulation.lin.bias"]
    );
    assert_eq!(f.load("double_blocks.3.img_attn.qkv.weight").unwrap().to_f32(), iota(12, 0.0));
    assert_eq!(f.source("single_blocks.0.modulation.lin.bias").unwrap(), "model.diffusion_model.single_blocks.0.modulation.lin.bias");
}

fn err(tensors: &[(&str, &[usize], &[f32])]) -> String {
    message(flux("bad.safetensors", f32_file(tensors, &[])), "bad.safetensors")
}

#[test]
fn unmappable_keys_are_errors() {
    let msg = err(&[("transformer_blocks.0.attn.to_x.weight", &[1], &[0.0]), ("x_embedder.weight", &[1], &[0.0])]);
    assert!(msg.contains("unexpected tensor 'transformer_blocks.0.attn.to_x.weight' (diffusers layout)"), "{msg}");
    let msg = err(&[("double_blocks.0.img_attn.qkv.scale", &[1], &[0.0])]);
    assert!(msg.contains("unexpected tensor 'double_blocks.0.img_attn.qkv.scale' (BFL layout)"), "{msg}");
    let msg = err(&[("transformer_blocks.0.attn.norm_q.bias", &[1], &[0.0])]);
    assert!(msg.contains("unexpected tensor 'transformer_blocks.0.attn.norm_q.bias'"), "{msg}");
    let msg = err(&[("img_in.weight", &[1], &[0.0]), ("x_embedder.weight", &[1], &[0.0])]);
    assert!(msg.contains("mixes BFL ('img_in.weight') and diffusers ('x_embedder.weight')"), "{msg}");
    let msg = err(&[("encoder.conv_in.weight", &[1], &[0.0])]);
    assert!(msg.contains("not a FLUX transformer") && msg.contains("'encoder.conv_in.weight'"), "{msg}");
    let msg = err(&[("img_in.weight", &[1], &[0.0]), ("model.diffusion_model.img_in.weight", &[1], &[0.0])]);
    assert!(msg.contains("both map to 'img_in.weight'"), "{msg}");
}

#[test]
fn lora_files_are_pointed_to_the_lora_flag() {
    let msg = err(&[("transformer.x_embedder.lora_A.weight", &[1, 1], &[0.0]), ("transformer.x_embedder.lora_B.weight", &[1, 1], &[0.0])]);
    assert!(msg.contains("--lora"), "{msg}");
}

#[test]
fn incomplete_or_mismatched_groups_name_the_keys() {
    let msg = err(&[
        ("transformer.transformer_blocks.1.attn.to_q.weight", &[2, 2], &[0.0; 4]),
        ("transformer.transformer_blocks.1.attn.to_v.weight", &[2, 2], &[0.0; 4]),
    ]);
    assert!(msg.contains("'transformer.transformer_blocks.1.attn.to_k.weight' is missing"), "{msg}");
    assert!(msg.contains("double_blocks.1.img_attn.qkv.weight"), "{msg}");

    let msg = err(&[
        ("single_transformer_blocks.0.attn.to_q.weight", &[2, 2], &[0.0; 4]),
        ("single_transformer_blocks.0.attn.to_k.weight", &[2, 3], &[0.0; 6]),
        ("single_transformer_blocks.0.attn.to_v.weight", &[2, 2], &[0.0; 4]),
        ("single_transformer_blocks.0.proj_mlp.weight", &[8, 2], &[0.0; 16]),
    ]);
    assert!(msg.contains("'single_transformer_blocks.0.attn.to_q.weight' (F32 [2, 2])"), "{msg}");
    assert!(msg.contains("'single_transformer_blocks.0.attn.to_k.weight' (F32 [2, 3])"), "{msg}");

    let msg = err(&[("norm_out.linear.weight", &[3, 2], &[0.0; 6]), ("x_embedder.weight", &[1], &[0.0])]);
    assert!(msg.contains("'norm_out.linear.weight' has shape [3, 2]"), "{msg}");
}

#[test]
fn fused_parts_must_share_a_dtype() {
    let q = r#""transformer_blocks.0.attn.to_q.bias":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#;
    let k = r#""transformer_blocks.0.attn.to_k.bias":{"dtype":"BF16","shape":[2],"data_offsets":[8,12]}"#;
    let v = r#""transformer_blocks.0.attn.to_v.bias":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}"#;
    let msg = message(flux("dt.safetensors", raw(&format!("{{{q},{k},{v}}}"), &[0; 20])), "dt.safetensors");
    assert!(msg.contains("(BF16 [2])") && msg.contains("cannot fuse"), "{msg}");
}

#[test]
fn unsupported_dtypes_fail_at_load_naming_the_key() {
    let header = r#"{"img_in.weight":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}}"#;
    let f = flux("fp8.safetensors", raw(header, &[0, 0])).unwrap();
    assert_eq!(f.dtype("img_in.weight"), Some(FileDType::F8_E4M3));
    let msg = message(f.load("img_in.weight"), "fp8.safetensors");
    assert!(msg.contains("'img_in.weight'") && msg.contains("F8_E4M3"), "{msg}");
}
