//! The model's parameters by name: every linear on the token path (the image and text tokens'
//! way through the blocks, where LoRA adapters go) and on the vec path (the embedders and every
//! modulation linear), the tensors full training trains, and the whole model downloaded as a
//! checkpoint. The names are the BFL checkpoint's, as `Flux::build` reads them.

use super::layers::{Linear, QkNorm};
use super::Flux;
use crate::backend::Backend;
use crate::tensor::Tensor;
use anyhow::{bail, Result};
use loaders::HostTensor;
use std::collections::BTreeMap;

/// Every linear of a `Flux` as two lists, the token path's and the vec path's. A macro so that
/// one list, which must hold every linear `Flux::build` makes, serves shared and mutable
/// access: `linears!(flux, iter, as_ref)` or `linears!(flux, iter_mut, as_mut, mut)`.
macro_rules! linears {
    ($flux:expr, $iter:ident, $as_opt:ident $(, $m:tt)?) => {{
        let f = $flux;
        let mut token = vec![&$($m)? f.img_in, &$($m)? f.txt_in];
        let mut vec_path = Vec::new();
        for e in [Some(&$($m)? f.time_in), Some(&$($m)? f.vector_in), f.guidance_in.$as_opt()].into_iter().flatten() {
            vec_path.push(&$($m)? e.in_layer);
            vec_path.push(&$($m)? e.out_layer);
        }
        for block in f.double_blocks.$iter() {
            for s in [&$($m)? block.img, &$($m)? block.txt] {
                vec_path.push(&$($m)? s.modulation.lin);
                token.push(&$($m)? s.attn.qkv);
                token.push(&$($m)? s.attn.proj);
                token.push(&$($m)? s.mlp.fc1);
                token.push(&$($m)? s.mlp.fc2);
            }
        }
        for block in f.single_blocks.$iter() {
            token.push(&$($m)? block.linear1);
            token.push(&$($m)? block.linear2);
            vec_path.push(&$($m)? block.modulation.lin);
        }
        token.push(&$($m)? f.final_layer.linear);
        vec_path.push(&$($m)? f.final_layer.ada_ln_modulation);
        (token, vec_path)
    }};
}

/// The linears on the token path, which LoRA training adapts: `img_in`, `txt_in`, each block's
/// qkv, proj and MLP linears (linear1 and linear2 in single blocks) and `final_layer.linear`.
pub fn token_path<B: Backend>(flux: &Flux<B>) -> Vec<&Linear<B>> {
    linears!(flux, iter, as_ref).0
}

/// Every linear, the token path's first.
pub fn linears<B: Backend>(flux: &Flux<B>) -> Vec<&Linear<B>> {
    let (mut token, vec_path) = linears!(flux, iter, as_ref);
    token.extend(vec_path);
    token
}

/// Every tensor full training trains, by checkpoint key (`img_in.weight`, `img_in.bias`,
/// `time_in.in_layer.weight`, ...): each linear's weight and bias, the keys of
/// `FluxGrads::base`, so that a trainer can put each optimiser step's result in place.
/// Unmerged adapters and the QK-norm scales are not listed.
pub fn base_parameters_mut<B: Backend>(flux: &mut Flux<B>) -> Vec<(String, &mut Tensor<B>)> {
    let (token, vec_path) = linears!(flux, iter_mut, as_mut, mut);
    let mut out = Vec::new();
    for Linear { name, weight, bias, .. } in token.into_iter().chain(vec_path) {
        out.push((format!("{name}.weight"), weight));
        if let Some(bias) = bias {
            out.push((format!("{name}.bias"), bias));
        }
    }
    out
}

/// Every tensor of the model downloaded in f32 under its checkpoint key: exactly the tensors
/// `Flux::build` reads (the linears' weights and biases and the frozen QK-norm scales), so
/// that written as safetensors they load back as a BFL-layout transformer. Refuses a model
/// with unmerged adapters, which the file could not hold.
pub fn download_weights<B: Backend>(b: &B, flux: &Flux<B>) -> Result<BTreeMap<String, HostTensor>> {
    let mut tensors: Vec<(String, &Tensor<B>)> = Vec::new();
    for lin in linears(flux) {
        if !lin.lora.is_empty() {
            bail!("'{}' carries an unmerged LoRA, which a transformer checkpoint cannot hold (merge it first)", lin.name);
        }
        tensors.push((format!("{}.weight", lin.name), &lin.weight));
        if let Some(bias) = &lin.bias {
            tensors.push((format!("{}.bias", lin.name), bias));
        }
    }
    let mut norms: Vec<(String, &QkNorm<B>)> = Vec::new();
    for (i, block) in flux.double_blocks.iter().enumerate() {
        norms.push((format!("double_blocks.{i}.img_attn.norm"), &block.img.attn.norm));
        norms.push((format!("double_blocks.{i}.txt_attn.norm"), &block.txt.attn.norm));
    }
    for (i, block) in flux.single_blocks.iter().enumerate() {
        norms.push((format!("single_blocks.{i}.norm"), &block.norm));
    }
    for (name, norm) in norms {
        tensors.push((format!("{name}.query_norm.scale"), &norm.query_norm));
        tensors.push((format!("{name}.key_norm.scale"), &norm.key_norm));
    }
    tensors.into_iter().map(|(name, t)| Ok((name, b.download(t)?))).collect()
}
