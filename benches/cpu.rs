//! CPU benchmarks: the f32 GEMM behind every linear layer (compare with numpy through
//! `tools/numpy-gemm.py`), one `flux-small` transformer forward, and one 128x128 -> 512x512
//! upscale with a `flux-small` transformer on a pixel-shuffle(8) autoencoder.
//!
//! `cargo bench -p engine --bench cpu`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use engine::ae::PixelShuffle;
use engine::backend::cpu::matmul::{matmul, Rhs};
use engine::model::weights::WeightLoader;
use engine::model::{Flux, FluxInputs, FluxParams};
use engine::sr::model_dir::{zero_text, AeConfig, ConditioningMode, FlowData, Prediction, SrConfig, SrModel};
use engine::sr::upscaler::UpscaleOptions;
use engine::CpuBackend;
use loaders::image::Image;
use std::hint::black_box;

fn gemm(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm_f32");
    g.sample_size(10);
    // (m, n, k): a FLUX-like linear (tokens x out x in) and the numpy comparison shape.
    for (m, n, k) in [(1024, 3072, 3072), (256, 768, 768)] {
        let lhs: Vec<f32> = (0..m * k).map(|i| ((i % 251) as f32 - 125.0) / 125.0).collect();
        let rhs: Vec<f32> = (0..n * k).map(|i| ((i % 241) as f32 - 120.0) / 120.0).collect();
        let mut dst = vec![0f32; m * n];
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        g.bench_function(BenchmarkId::from_parameter(format!("{m}x{n}x{k}")), |bch| {
            bch.iter(|| matmul(black_box(&mut dst), &lhs, &rhs, m, n, k, Rhs::Transposed, false, true))
        });
    }
    g.finish();
}

fn flux_small_forward(c: &mut Criterion) {
    let b = CpuBackend::new();
    let params = FluxParams::preset("flux-small").unwrap();
    let mut w = WeightLoader::random(&b, 0);
    let model = Flux::build(&params, &mut w).unwrap();
    // A 16x16 grid of packed latent patches (a 512x512 image through FLUX's autoencoder) and
    // 32 text tokens.
    let (rows, cols, lt) = (16, 16, 32);
    let l = rows * cols;
    let inputs = FluxInputs::random(&params, 1, (rows, cols), lt, 0);
    let mut g = c.benchmark_group("flux_small_forward");
    g.sample_size(10);
    g.bench_function(format!("{l}img+{lt}txt_tokens"), |bch| bch.iter(|| model.forward_host(&b, black_box(&inputs)).unwrap()));
    g.finish();
}

fn upscale_128_to_512(c: &mut Criterion) {
    let b = CpuBackend::new();
    // Pixel-shuffle 8: 192 latent channels, 768 packed; a 512x512 output is 32x32 = 1024 tokens.
    let factor = 8;
    let latent = 3 * factor * factor;
    let transformer = FluxParams { in_channels: 8 * latent, out_channels: 4 * latent, ..FluxParams::preset("flux-small").unwrap() };
    let config = SrConfig {
        scale: 4,
        conditioning: ConditioningMode::Concat,
        flow: FlowData::Latent,
        prediction: Prediction::Velocity,
        autoencoder: AeConfig::PixelShuffle { factor },
        transformer,
        steps: 28,
        average: 1,
        detail: 1.0,
        guidance: 3.5,
        text_tokens: 1,
        base: None,
        adapters: Vec::new(),
    };
    let mut w = WeightLoader::random(&b, 0);
    let flux = Flux::build(&config.transformer, &mut w).unwrap();
    let (txt, y) = zero_text(&config);
    let model = SrModel { config, flux, ae: Box::new(PixelShuffle::new(factor)), ae_tiling: Default::default(), txt, y };
    let lq = Image::new(128, 128, 3, (0..128 * 128 * 3).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect());
    let mut g = c.benchmark_group("upscale_128_to_512");
    g.sample_size(10);
    for steps in [1, 4] {
        let opts = UpscaleOptions { steps, seed: 0, tile: 512, batch: 1, average: 1, shift: false, detail: 1.0 };
        g.bench_function(format!("{steps}_steps"), |bch| bch.iter(|| model.upscale(&b, black_box(&lq), &opts, &mut |_, _| ()).unwrap()));
    }
    g.finish();
}

criterion_group!(benches, gemm, flux_small_forward, upscale_128_to_512);
criterion_main!(benches);
