mod common;

use common::{f32_file, iota, message, raw};
use loaders::lora::{LoraAdapter, LoraLayout, LoraPart};
use loaders::safetensors::Checkpoint;

const HIDDEN: usize = 4;

fn adapter(tensors: &[(&str, &[usize], &[f32])], metadata: &[(&str, &str)]) -> loaders::Result<LoraAdapter> {
    LoraAdapter::from_checkpoint(&Checkpoint::from_bytes("a.safetensors", f32_file(tensors, metadata))?, HIDDEN)
}

fn part<'a>(a: &'a LoraAdapter, source: &str) -> &'a LoraPart {
    a.parts.iter().find(|p| p.source == source).unwrap_or_else(|| panic!("no part from {source}"))
}

fn err(tensors: &[(&str, &[usize], &[f32])]) -> String {
    message(adapter(tensors, &[]), "a.safetensors")
}

#[test]
fn peft_parts_land_at_offsets_inside_fused_targets() {
    let d = "transformer.single_transformer_blocks.2.";
    let a = adapter(
        &[
            (&format!("{d}attn.to_q.lora_A.weight"), &[2, 4], &iota(8, 0.0)),
            (&format!("{d}attn.to_q.lora_B.weight"), &[4, 2], &iota(8, 10.0)),
            (&format!("{d}attn.to_v.lora_A.weight"), &[2, 4], &iota(8, 20.0)),
            (&format!("{d}attn.to_v.lora_B.weight"), &[4, 2], &iota(8, 30.0)),
            (&format!("{d}attn.to_v.alpha"), &[], &[6.0]),
            (&format!("{d}proj_mlp.lora_A.weight"), &[2, 4], &iota(8, 40.0)),
            (&format!("{d}proj_mlp.lora_B.weight"), &[16, 2], &iota(32, 50.0)),
            ("transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight", &[1, 4], &iota(4, 0.0)),
            ("transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight", &[4, 1], &iota(4, 0.0)),
            ("transformer_blocks.0.attn.to_out.0.lora_A.weight", &[1, 4], &iota(4, 0.0)),
            ("transformer_blocks.0.attn.to_out.0.lora_B.weight", &[4, 1], &iota(4, 0.0)),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(a.layout, LoraLayout::Peft);
    assert_eq!(a.layout.to_string(), "diffusers/peft");
    let q = part(&a, &format!("{d}attn.to_q"));
    assert_eq!((q.target.as_str(), q.out_offset, q.scale), ("single_blocks.2.linear1", 0, 1.0));
    assert_eq!(q.down.to_f32(), iota(8, 0.0));
    assert_eq!(q.up.to_f32(), iota(8, 10.0));
    let v = part(&a, &format!("{d}attn.to_v"));
    assert_eq!((v.target.as_str(), v.out_offset, v.scale), ("single_blocks.2.linear1", 2 * HIDDEN, 3.0));
    let mlp = part(&a, &format!("{d}proj_mlp"));
    assert_eq!((mlp.target.as_str(), mlp.out_offset, mlp.out_len()), ("single_blocks.2.linear1", 3 * HIDDEN, 16));
    let k = part(&a, "transformer.transformer_blocks.0.attn.add_k_proj");
    assert_eq!((k.target.as_str(), k.out_offset), ("double_blocks.0.txt_attn.qkv", HIDDEN));
    let proj = part(&a, "transformer_blocks.0.attn.to_out.0");
    assert_eq!((proj.target.as_str(), proj.out_offset), ("double_blocks.0.img_attn.proj", 0));

    assert_eq!(a.rank(), 2);
    // Hand count: three rank-2 parts (8 + 8, 8 + 8, 8 + 32) and two rank-1 parts (4 + 4 each).
    assert_eq!(a.parameter_count(), 16 + 16 + 40 + 8 + 8);
}

#[test]
fn peft_final_modulation_swaps_up_rows_and_bias() {
    let a = adapter(
        &[
            ("base_model.model.norm_out.linear.lora_A.weight", &[1, 2], &[1.0, 2.0]),
            ("base_model.model.norm_out.linear.lora_B.weight", &[4, 1], &[10.0, 11.0, 12.0, 13.0]),
            ("base_model.model.norm_out.linear.lora_B.bias", &[4], &[20.0, 21.0, 22.0, 23.0]),
        ],
        &[],
    )
    .unwrap();
    let p = &a.parts[0];
    assert_eq!((p.target.as_str(), p.out_offset), ("final_layer.adaLN_modulation.1", 0));
    assert_eq!(p.up.to_f32(), [12.0, 13.0, 10.0, 11.0]);
    assert_eq!(p.up_bias.as_ref().unwrap().to_f32(), [22.0, 23.0, 20.0, 21.0]);
}

fn peft_pair(module: &str, rank: usize) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    vec![
        (format!("transformer.{module}.lora_A.weight"), vec![rank, 4], vec![0.5; rank * 4]),
        (format!("transformer.{module}.lora_B.weight"), vec![4, rank], vec![0.25; rank * 4]),
    ]
}

fn with_metadata(modules: &[(&str, usize)], config: &str) -> loaders::Result<LoraAdapter> {
    let tensors: Vec<_> = modules.iter().flat_map(|(m, r)| peft_pair(m, *r)).collect();
    let refs: Vec<(&str, &[usize], &[f32])> = tensors.iter().map(|(n, s, v)| (n.as_str(), s.as_slice(), v.as_slice())).collect();
    adapter(&refs, &[("format", "pt"), ("lora_adapter_metadata", config)])
}

#[test]
fn peft_scale_comes_from_the_saved_config_and_its_patterns() {
    let modules = [("transformer_blocks.0.attn.to_q", 4), ("transformer_blocks.0.attn.to_k", 2), ("transformer_blocks.1.attn.to_k", 4)];
    let config = r#"{"r": 4, "lora_alpha": 8, "rank_pattern": {"transformer_blocks.0.attn.to_k": 2}, "alpha_pattern": {"to_k": 1.0}, "target_modules": ["to_q", "to_k"], "use_dora": false}"#;
    let a = with_metadata(&modules, config).unwrap();
    assert_eq!(part(&a, "transformer.transformer_blocks.0.attn.to_q").scale, 2.0);
    assert_eq!(part(&a, "transformer.transformer_blocks.0.attn.to_k").scale, 0.5);
    assert_eq!(part(&a, "transformer.transformer_blocks.1.attn.to_k").scale, 0.25);

    // A pipeline's save_lora_weights prefixes each field with the component.
    let pipeline = r#"{"transformer.r": 4, "transformer.lora_alpha": 2, "transformer.use_rslora": true, "text_encoder.r": 99}"#;
    let a = with_metadata(&modules[..1], pipeline).unwrap();
    assert_eq!(a.parts[0].scale, 1.0, "rsLoRA: 2 / sqrt(4)");
}

#[test]
fn peft_config_that_contradicts_the_tensors_is_an_error() {
    let msg = message(with_metadata(&[("transformer_blocks.0.attn.to_q", 2)], r#"{"r": 4, "lora_alpha": 4}"#), "a.safetensors");
    assert!(msg.contains("rank 2") && msg.contains("r = 4") && msg.contains("to_q.lora_A.weight"), "{msg}");
    let msg = message(with_metadata(&[("transformer_blocks.0.attn.to_q", 2)], r#"{"r": 2, "use_dora": true}"#), "a.safetensors");
    assert!(msg.contains("DoRA"), "{msg}");
    let msg =
        message(with_metadata(&[("transformer_blocks.0.attn.to_q", 2)], r#"{"r": 2, "rank_pattern": {"^to_.*": 2}}"#), "a.safetensors");
    assert!(msg.contains("regular expression"), "{msg}");
    let msg = message(with_metadata(&[("transformer_blocks.0.attn.to_q", 2)], "not json"), "a.safetensors");
    assert!(msg.contains("lora_adapter_metadata"), "{msg}");
}

#[test]
fn kohya_names_and_alpha() {
    let a = adapter(
        &[
            ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", &[4, 3], &iota(12, 0.0)),
            ("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight", &[9, 4], &iota(36, 0.0)),
            ("lora_unet_double_blocks_0_img_attn_qkv.alpha", &[], &[2.0]),
            ("lora_unet_single_blocks_11_linear1.lora_down.weight", &[2, 3], &iota(6, 0.0)),
            ("lora_unet_single_blocks_11_linear1.lora_up.weight", &[21, 2], &iota(42, 0.0)),
            ("lora_unet_final_layer_adaLN_modulation_1.lora_down.weight", &[1, 3], &[1.0, 2.0, 3.0]),
            ("lora_unet_final_layer_adaLN_modulation_1.lora_up.weight", &[2, 1], &[5.0, 6.0]),
            ("lora_unet_final_layer_adaLN_modulation_1.alpha", &[1], &[3.0]),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(a.layout, LoraLayout::Kohya);
    let qkv = part(&a, "lora_unet_double_blocks_0_img_attn_qkv");
    assert_eq!((qkv.target.as_str(), qkv.out_offset, qkv.scale), ("double_blocks.0.img_attn.qkv", 0, 0.5));
    let l1 = part(&a, "lora_unet_single_blocks_11_linear1");
    assert_eq!((l1.target.as_str(), l1.scale), ("single_blocks.11.linear1", 1.0));
    // Already in BFL order: no swap.
    let fin = part(&a, "lora_unet_final_layer_adaLN_modulation_1");
    assert_eq!((fin.target.as_str(), fin.scale), ("final_layer.adaLN_modulation.1", 3.0));
    assert_eq!(fin.up.to_f32(), [5.0, 6.0]);
    assert_eq!(a.rank(), 4);
}

#[test]
fn bfl_adapters_with_bias_and_prefix() {
    let a = adapter(
        &[
            ("diffusion_model.double_blocks.1.txt_mlp.2.lora_A.weight", &[2, 3], &iota(6, 0.0)),
            ("diffusion_model.double_blocks.1.txt_mlp.2.lora_B.weight", &[3, 2], &iota(6, 0.0)),
            ("diffusion_model.double_blocks.1.txt_mlp.2.lora_B.bias", &[3], &[7.0, 8.0, 9.0]),
            ("model.diffusion_model.final_layer.adaLN_modulation.1.lora_A.weight", &[1, 3], &[0.0; 3]),
            ("model.diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight", &[2, 1], &[1.0, 2.0]),
            ("double_blocks.1.txt_attn.norm.key_norm.scale", &[2], &[0.5, 1.5]),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(a.layout, LoraLayout::Bfl);
    let mlp = part(&a, "diffusion_model.double_blocks.1.txt_mlp.2");
    assert_eq!((mlp.target.as_str(), mlp.scale), ("double_blocks.1.txt_mlp.2", 1.0));
    assert_eq!(mlp.up_bias.as_ref().unwrap().to_f32(), [7.0, 8.0, 9.0]);
    let fin = part(&a, "model.diffusion_model.final_layer.adaLN_modulation.1");
    assert_eq!(fin.up.to_f32(), [1.0, 2.0], "BFL order needs no swap");
    assert_eq!(a.parameter_count(), 6 + 6 + 3 + 3 + 2);
    assert_eq!(a.replacements.len(), 1);
    assert_eq!(a.replacements[0].0, "double_blocks.1.txt_attn.norm.key_norm.scale");
    assert_eq!(a.replacements[0].1.to_f32(), [0.5, 1.5]);
}

#[test]
fn missing_halves_name_the_missing_key() {
    let msg = err(&[("transformer.x_embedder.lora_A.weight", &[1, 2], &[0.0; 2])]);
    assert!(msg.contains("'transformer.x_embedder.lora_B.weight' is missing"), "{msg}");
    let msg = err(&[("lora_unet_img_in.lora_up.weight", &[2, 1], &[0.0; 2]), ("lora_unet_img_in.alpha", &[], &[1.0])]);
    assert!(msg.contains("'lora_unet_img_in.lora_down.weight' is missing"), "{msg}");
}

#[test]
fn malformed_adapters_are_errors_naming_the_key() {
    let msg = err(&[("img_in.lora_A.weight", &[2, 3], &[0.0; 6]), ("img_in.lora_B.weight", &[3, 1], &[0.0; 3])]);
    assert!(msg.contains("'img_in.lora_A.weight' is [2, 3] and 'img_in.lora_B.weight' is [3, 1]"), "{msg}");
    let msg = err(&[("img_in.lora_A.weight", &[0, 3], &[]), ("img_in.lora_B.weight", &[3, 0], &[])]);
    assert!(msg.contains("non-zero rank"), "{msg}");
    let msg = err(&[
        ("img_in.lora_A.weight", &[1, 3], &[0.0; 3]),
        ("img_in.lora_B.weight", &[3, 1], &[0.0; 3]),
        ("img_in.lora_B.bias", &[2], &[0.0; 2]),
    ]);
    assert!(msg.contains("'img_in.lora_B.bias' is [2]; expected [3]"), "{msg}");
    let msg = err(&[
        ("lora_unet_img_in.lora_down.weight", &[1, 3], &[0.0; 3]),
        ("lora_unet_img_in.lora_up.weight", &[3, 1], &[0.0; 3]),
        ("lora_unet_img_in.alpha", &[2], &[1.0, 2.0]),
    ]);
    assert!(msg.contains("'lora_unet_img_in.alpha' has shape [2]"), "{msg}");
    let msg = err(&[
        ("lora_unet_img_in.lora_down.weight", &[1, 3], &[0.0; 3]),
        ("lora_unet_img_in.lora_up.weight", &[3, 1], &[0.0; 3]),
        ("lora_unet_img_in.alpha", &[], &[f32::INFINITY]),
    ]);
    assert!(msg.contains("'lora_unet_img_in.alpha' is inf"), "{msg}");
    let msg = err(&[
        ("lora_unet_double_blocks_0_img_attn_qkx.lora_down.weight", &[1, 3], &[0.0; 3]),
        ("lora_unet_double_blocks_0_img_attn_qkx.lora_up.weight", &[3, 1], &[0.0; 3]),
    ]);
    assert!(msg.contains("'lora_unet_double_blocks_0_img_attn_qkx' is not a FLUX transformer module (kohya layout)"), "{msg}");
    let msg = err(&[
        ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", &[1, 3], &[0.0; 3]),
        ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", &[3, 1], &[0.0; 3]),
    ]);
    assert!(msg.contains("text encoder"), "{msg}");
    let msg = err(&[
        ("transformer.transformer_blocks.0.attn.norm_q.lora_A.weight", &[1, 3], &[0.0; 3]),
        ("transformer.transformer_blocks.0.attn.norm_q.lora_B.weight", &[3, 1], &[0.0; 3]),
    ]);
    assert!(msg.contains("is a norm, not a linear layer"), "{msg}");
    let msg =
        err(&[("transformer.pos_embed.lora_A.weight", &[1, 3], &[0.0; 3]), ("transformer.pos_embed.lora_B.weight", &[3, 1], &[0.0; 3])]);
    assert!(msg.contains("'transformer.pos_embed.lora_A.weight' adapts no FLUX transformer module"), "{msg}");
    let msg = err(&[
        ("img_in.lora_A.weight", &[1, 3], &[0.0; 3]),
        ("img_in.lora_B.weight", &[3, 1], &[0.0; 3]),
        ("img_in.weight", &[3], &[0.0; 3]),
    ]);
    assert!(msg.contains("unexpected tensor 'img_in.weight'"), "{msg}");
    let msg = err(&[("img_in.lora_A.weight", &[1, 3], &[0.0; 3]), ("lora_unet_img_in.lora_up.weight", &[3, 1], &[0.0; 3])]);
    assert!(msg.contains("mixes lora_A/lora_B and lora_down/lora_up"), "{msg}");
    let msg = err(&[
        ("img_in.lora_A.weight", &[1, 3], &[0.0; 3]),
        ("img_in.lora_B.weight", &[3, 1], &[0.0; 3]),
        ("x_embedder.lora_A.weight", &[1, 3], &[0.0; 3]),
        ("x_embedder.lora_B.weight", &[3, 1], &[0.0; 3]),
    ]);
    assert!(msg.contains("mixes BFL ('img_in.lora_A.weight') and diffusers ('x_embedder.lora_A.weight')"), "{msg}");
}

#[test]
fn only_control_lora_layouts_may_replace_norm_scales() {
    let msg = err(&[
        ("lora_unet_img_in.lora_down.weight", &[1, 3], &[0.0; 3]),
        ("lora_unet_img_in.lora_up.weight", &[3, 1], &[0.0; 3]),
        ("double_blocks.0.img_attn.norm.query_norm.scale", &[3], &[0.0; 3]),
    ]);
    let expected = "unexpected tensor 'double_blocks.0.img_attn.norm.query_norm.scale' in a kohya LoRA adapter";
    assert!(msg.contains(expected), "{msg}");
    // In diffusers' layout a norm is replaced through its diffusers name only.
    let msg = err(&[
        ("x_embedder.lora_A.weight", &[1, 3], &[0.0; 3]),
        ("x_embedder.lora_B.weight", &[3, 1], &[0.0; 3]),
        ("transformer_blocks.0.attn.norm_q.scale", &[3], &[0.0; 3]),
    ]);
    assert!(msg.contains("unexpected tensor 'transformer_blocks.0.attn.norm_q.scale' in a diffusers/peft LoRA adapter"), "{msg}");
}

#[test]
fn a_file_without_lora_keys_says_so() {
    let msg = err(&[("img_in.weight", &[1], &[0.0])]);
    assert_eq!(
        msg,
        "a.safetensors: no LoRA tensors found (expected lora_A/lora_B or lora_down/lora_up keys, or a control LoRA's QK-norm scales)"
    );
}

#[test]
fn half_precision_adapters_keep_their_dtype() {
    let header = r#"{"img_in.lora_A.weight":{"dtype":"BF16","shape":[1,2],"data_offsets":[0,4]},"img_in.lora_B.weight":{"dtype":"F16","shape":[1,1],"data_offsets":[4,6]}}"#;
    // bf16 1.0, 2.0; f16 0.5
    let ckpt = Checkpoint::from_bytes("h.safetensors", raw(header, &[0x80, 0x3F, 0x00, 0x40, 0x00, 0x38])).unwrap();
    let a = LoraAdapter::from_checkpoint(&ckpt, HIDDEN).unwrap();
    assert_eq!(a.parts[0].down.dtype(), loaders::DType::BF16);
    assert_eq!(a.parts[0].down.to_f32(), [1.0, 2.0]);
    assert_eq!(a.parts[0].up.to_f32(), [0.5]);
}

#[test]
fn kohya_text_encoder_parts_are_skipped_and_listed() {
    let a = adapter(
        &[
            ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", &[1, 3], &[0.5; 3]),
            ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", &[3, 1], &[0.5; 3]),
            ("lora_unet_double_blocks_0_img_attn_proj.lora_down.weight", &[1, HIDDEN], &iota(HIDDEN, 1.0)),
            ("lora_unet_double_blocks_0_img_attn_proj.lora_up.weight", &[HIDDEN, 1], &iota(HIDDEN, 2.0)),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(a.skipped, vec!["lora_te1_text_model_encoder_layers_0_mlp_fc1".to_string()]);
    assert_eq!(a.parts.len(), 1);
    assert_eq!(a.parts[0].target, "double_blocks.0.img_attn.proj");
}

#[test]
fn control_lora_norm_scales_load_alone_or_beside_pairs_in_both_namings() {
    // A BFL control LoRA cut down to its norm scales (any subset of its keys loads).
    let a = adapter(&[("double_blocks.0.img_attn.norm.query_norm.scale", &[4], &iota(4, 1.0))], &[]).unwrap();
    assert_eq!((a.layout, a.parts.len()), (LoraLayout::Bfl, 0));
    assert_eq!(a.replacements[0].0, "double_blocks.0.img_attn.norm.query_norm.scale");
    // diffusers' form: peft pairs, x_embedder on the widened input, norms as full weights.
    let a = adapter(
        &[
            ("transformer.x_embedder.lora_A.weight", &[1, 8], &iota(8, 0.0)),
            ("transformer.x_embedder.lora_B.weight", &[4, 1], &iota(4, 0.0)),
            ("transformer.single_transformer_blocks.1.attn.norm_k.weight", &[4], &iota(4, 2.0)),
            ("transformer.transformer_blocks.0.attn.norm_added_q.weight", &[4], &iota(4, 3.0)),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(a.layout, LoraLayout::Peft);
    let img_in = part(&a, "transformer.x_embedder");
    assert_eq!((img_in.target.as_str(), img_in.down.shape.as_slice()), ("img_in", &[1, 8][..]));
    let replaced: std::collections::BTreeMap<&str, Vec<f32>> = a.replacements.iter().map(|(n, t)| (n.as_str(), t.to_f32())).collect();
    assert_eq!(replaced["double_blocks.0.txt_attn.norm.query_norm.scale"], iota(4, 3.0));
    assert_eq!(replaced["single_blocks.1.norm.key_norm.scale"], iota(4, 2.0));
    assert_eq!(replaced.len(), 2);
    let a = adapter(&[("transformer.transformer_blocks.0.attn.norm_q.weight", &[4], &iota(4, 1.0))], &[]).unwrap();
    assert_eq!((a.layout, a.replacements[0].0.as_str()), (LoraLayout::Peft, "double_blocks.0.img_attn.norm.query_norm.scale"));
    // A lone tensor that is no norm scale is still no adapter.
    assert!(err(&[("double_blocks.0.img_attn.qkv.weight", &[4], &iota(4, 1.0))]).contains("no LoRA tensors found"));
}

#[test]
fn the_peft_writer_splits_fused_targets_and_adds_biases_everywhere_once_one_has_one() {
    use loaders::lora::{full_rank_pair, write_peft, AdapterPart};
    use loaders::HostTensor;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let t = |shape: &[usize], base: f32| HostTensor::from_f32(shape.to_vec(), iota(shape.iter().product(), base));
    // linear1 of hidden 4, MLP 8: rows q 0..4, k 4..8, v 8..12, mlp 12..20.
    let (down, up) = (t(&[2, 4], 0.0), t(&[20, 2], 100.0));
    let (identity, delta) = full_rank_pair(&t(&[4, 3], 0.0));
    assert_eq!(identity.to_f32(), [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]);
    let bias = t(&[4], 7.0);
    let (mod_down, mod_up) = (t(&[1, 4], 0.0), t(&[8, 1], 0.0));
    let parts = [
        AdapterPart { target: "single_blocks.3.linear1", down: &down, up: &up, up_bias: None },
        AdapterPart { target: "img_in", down: &identity, up: &delta, up_bias: Some(&bias) },
        AdapterPart { target: "final_layer.adaLN_modulation.1", down: &mod_down, up: &mod_up, up_bias: None },
    ];
    write_peft(&path, &parts, false).unwrap();
    let ckpt = Checkpoint::open(&path).unwrap();
    let read = |k: &str| ckpt.read(k).unwrap().to_f32();
    let s = "transformer.single_transformer_blocks.3.";
    for (i, m) in ["attn.to_q", "attn.to_k", "attn.to_v"].iter().enumerate() {
        assert_eq!(read(&format!("{s}{m}.lora_A.weight")), iota(8, 0.0), "{m} shares A");
        assert_eq!(read(&format!("{s}{m}.lora_B.weight")), iota(8, 100.0 + 8.0 * i as f32), "{m} rows");
        assert_eq!(read(&format!("{s}{m}.lora_B.bias")), [0.0; 4], "{m} zero bias");
    }
    assert_eq!(read(&format!("{s}proj_mlp.lora_B.weight")), iota(16, 124.0));
    assert_eq!(read("transformer.x_embedder.lora_B.bias"), iota(4, 7.0));
    // diffusers' norm_out is (scale, shift): B's row halves swapped.
    assert_eq!(read("transformer.norm_out.linear.lora_B.weight"), [4.0, 5.0, 6.0, 7.0, 0.0, 1.0, 2.0, 3.0]);
    // Read back, the parts are the ones written (scale 1, fused rows at their offsets).
    let back = LoraAdapter::from_checkpoint(&ckpt, 4).unwrap();
    let v = part(&back, "transformer.single_transformer_blocks.3.attn.to_v");
    assert_eq!((v.target.as_str(), v.out_offset, v.scale, v.up.to_f32()), ("single_blocks.3.linear1", 8, 1.0, iota(8, 116.0)));
    let img_in = part(&back, "transformer.x_embedder");
    assert_eq!((img_in.up.to_f32(), img_in.up_bias.as_ref().unwrap().to_f32()), (iota(12, 0.0), iota(4, 7.0)));
    let norm_out = part(&back, "transformer.norm_out.linear");
    assert_eq!(norm_out.up.to_f32(), iota(8, 0.0), "swapped back");
    // Without any bias, none is written.
    write_peft(&path, &parts[..1], true).unwrap();
    assert!(Checkpoint::open(&path).unwrap().names().all(|n| !n.ends_with(".bias")));
    assert!(write_peft(&path, &parts[..1], false).unwrap_err().to_string().contains("already exists"));
}
