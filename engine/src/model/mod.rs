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

/// Opens a FLUX checkpoint (either layout; a file, a sharded checkpoint's index or a folder
/// holding one), infers its config (completed or checked by what `given` states), and builds the
/// model with the given LoRA adapters. Also returns warnings for the user (adapter parts left out).
pub fn load_flux<B: Backend>(
    b: &B,
    checkpoint: &Path,
    given: &PartialFluxParams,
    loras: &[&Path],
    mode: LoraMode,
) -> Result<(Flux<B>, Vec<String>)> {
    load_flux_from(b, &FluxCheckpoint::open(checkpoint)?, given, loras, mode)
}

/// `load_flux` from weights already open. An `img_in` narrower than `given.in_channels` or than
/// an adapter's img_in pair needs (a control LoRA on the 64-input base) is widened with zero
/// columns first (`WidenedInput`).
pub fn load_flux_from<B: Backend>(
    b: &B,
    source: &dyn WeightSource,
    given: &PartialFluxParams,
    loras: &[&Path],
    mode: LoraMode,
) -> Result<(Flux<B>, Vec<String>)> {
    let shapes = source.shapes();
    let stored = PartialFluxParams { in_channels: None, ..given.clone() };
    let params = FluxParams::infer(&shapes, &stored).map_err(|e| anyhow::anyhow!("{}: {e}", source.origin()))?;
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
    let width = given.in_channels.into_iter().chain(weights::adapter_input_width(&adapters)).max().unwrap_or(0);
    let widened = weights::WidenedInput { source, in_channels: width };
    let source: &dyn WeightSource = if width > params.in_channels { &widened } else { source };
    let params = FluxParams::infer(&source.shapes(), given).map_err(|e| anyhow::anyhow!("{}: {e}", source.origin()))?;
    let mut w = weights::WeightLoader::new(b, source).with_lora(adapters, mode);
    let model = Flux::build(&params, &mut w)?;
    w.finish()?;
    Ok((model, warnings))
}
