//! Any bytes through the whole loading path: header validation, every tensor read, the FLUX layout
//! mapping with its fused loads, and the LoRA reader. Errors are fine; a panic, an abort or an
//! allocation sized by the header rather than the file is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loaders::flux::FluxCheckpoint;
use loaders::lora::LoraAdapter;
use loaders::safetensors::Checkpoint;

fuzz_target!(|data: &[u8]| {
    let Ok(ckpt) = Checkpoint::from_bytes("fuzz.safetensors", data.to_vec()) else {
        return;
    };
    for name in ckpt.names() {
        let _ = ckpt.read(name);
    }
    let _ = LoraAdapter::from_checkpoint(&ckpt, 64);
    if let Ok(flux) = FluxCheckpoint::from_checkpoint(ckpt) {
        for name in flux.names() {
            let _ = flux.source(name);
            if let Ok(t) = flux.load(name) {
                assert_eq!(Some(t.shape), flux.shape(name), "load disagrees with shape for {name}");
            }
        }
    }
});
