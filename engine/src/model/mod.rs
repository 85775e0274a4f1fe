//! The FLUX transformer: config, blocks, weights and the forward pass.

pub mod backward;
pub mod config;
pub mod flux;
pub mod layers;
pub mod params;
pub mod positions;
pub mod trainable;
pub mod weights;

pub use config::{FluxParams, PartialFluxParams};
pub use flux::{Conditioning, Flux, FluxInputs};
pub use trainable::{Adapters, Trainable};
pub use weights::{LoraMode, WeightSource};

use crate::backend::Backend;
use anyhow::Result;
use loaders::flux::FluxCheckpoint;
use loaders::lora::LoraAdapter;
use std::path::Path;

/// Opens a FLUX checkpoint (either layout), infers its config (completed or checked by what
/// `given` states), and builds the model with the given LoRA adapters. Also returns
/// warnings for the user (adapter parts left out).
pub fn load_flux<B: Backend>(
    b: &B,
    checkpoint: &Path,
    given: &PartialFluxParams,
    loras: &[&Path],
    mode: LoraMode,
) -> Result<(Flux<B>, Vec<String>)> {
    let ckpt = FluxCheckpoint::open(checkpoint)?;
    let params = FluxParams::infer(&ckpt.shapes(), given).map_err(|e| anyhow::anyhow!("{}: {e}", ckpt.origin()))?;
    let adapters = loras.iter().map(|p| LoraAdapter::open(p, params.hidden_size)).collect::<Result<Vec<_>, _>>()?;
    let warnings = adapters
        .iter()
        .filter(|a| !a.skipped.is_empty())
        .map(|a| {
            format!(
                "{}: skipped {} text-encoder modules (the text embedding is fixed), e.g. '{}'",
                a.path.display(),
                a.skipped.len(),
                a.skipped[0]
            )
        })
        .collect();
    let mut w = weights::WeightLoader::new(b, &ckpt).with_lora(adapters, mode);
    let model = Flux::build(&params, &mut w)?;
    w.finish()?;
    Ok((model, warnings))
}
