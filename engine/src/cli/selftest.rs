//! `engine selftest`: the backend against the CPU reference, op by op and whole forwards.

use anyhow::{ensure, Result};
use engine::backend::device::Device;
use engine::backend::training::TrainingOps;
use engine::selftest::{render_table, run_all, training_checks};
use std::time::Instant;

/// Check a backend against the CPU reference: every op on fresh random inputs (outputs poisoned
/// with NaN first, every element compared), then whole `flux-tiny` and `flux-small` forwards,
/// every training backward op and a `flux-tiny` training backward, then the training kernels
/// (AdamW, the Sobolev operator, S-DPO).
/// Prints one table and exits non-zero if any check fails.
#[derive(clap::Args)]
pub struct Args {
    /// Backend to test: cuda (the point of this command), cpu (the reference against itself, a
    /// smoke test of the harness) or auto.
    #[arg(long, value_enum, default_value = "cuda")]
    device: Device,
    /// Seed of the random inputs and weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(a: Args) -> Result<()> {
    engine::on_backend!(a.device, b => selftest(b, a.seed))
}

fn selftest<B: TrainingOps>(b: &B, seed: u64) -> Result<()> {
    println!("device  {}", b.name());
    let t0 = Instant::now();
    let mut checks = run_all(b, seed)?;
    checks.extend(training_checks(b, seed)?);
    print!("{}", render_table(&checks));
    println!("time    {:.1} s", t0.elapsed().as_secs_f64());
    let failed = checks.iter().filter(|c| !c.passed()).count();
    ensure!(failed == 0, "selftest: {failed} of {} checks failed on {}", checks.len(), b.name());
    Ok(())
}
