//! Kernels on probation: written and compiled without a GPU, they run by default only after
//! agreeing at `CudaBackend` initialisation with a trusted kernel on a small probe, and an
//! environment variable can switch each off. Used by the Hopper attention forward
//! (`attention_hopper::SM90A`) and the tensor-core attention backward (`attention::MMA_BACKWARD`).

use super::CudaBackend;
use anyhow::{bail, Context, Result};
use std::sync::atomic::{AtomicBool, Ordering};

/// Normwise relative error allowed between the two kernels' outputs: both round P and the output
/// to bf16 (one rounding is 4e-3 relative) but sum in different orders.
const PROBE_TOLERANCE: f64 = 1e-2;

/// `max |a - b| / max |b|` over a start-up probe's outputs (a: the kernel on probation, b: the
/// one it must agree with), or why they disagree (one line).
pub(super) fn compare(what: &str, candidate: &[f32], reference: &[f32]) -> std::result::Result<f64, String> {
    if candidate.len() != reference.len() {
        return Err(format!("{what}: {} values against {}", candidate.len(), reference.len()));
    }
    if let Some(i) = candidate.iter().position(|x| !x.is_finite()) {
        // lse is -inf only for rows without keys, which the probes do not have.
        return Err(format!("{what}: non-finite value {} at index {i}", candidate[i]));
    }
    let scale = reference.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
    let (worst, at) = candidate
        .iter()
        .zip(reference)
        .enumerate()
        .map(|(i, (&a, &b))| ((a as f64 - b as f64).abs(), i))
        .fold((0f64, 0), |acc, x| if x.0 > acc.0 { x } else { acc });
    let rel = if scale > 0.0 { worst / scale } else { worst };
    if rel > PROBE_TOLERANCE {
        return Err(format!("{what}: max rel err {rel:.3e} > {PROBE_TOLERANCE:.0e} (index {at}: {} vs {})", candidate[at], reference[at]));
    }
    Ok(rel)
}

/// A kernel that runs only after agreeing with a trusted one on a start-up probe, and that an
/// environment variable can switch off (then it is neither probed, nor used, nor offered to the
/// self-test and `engine kernels`, so that a kernel that takes the GPU down can be kept away).
pub(super) struct Guarded {
    /// What is on probation, e.g. "sm90a attention kernel".
    pub kernel: &'static str,
    /// The variable that switches it off, e.g. "ENGINE_ATTENTION", with the value "auto" (or
    /// unset, or empty) allowing it and `off` (e.g. "portable") ruling it out.
    pub env: &'static str,
    pub off: &'static str,
    /// What `off` means, for the message about a bad value.
    pub off_means: &'static str,
    /// What runs instead, e.g. "the portable kernel".
    pub fallback: &'static str,
}

impl Guarded {
    /// Whether the variable allows the kernel now.
    pub fn allowed(&self) -> Result<bool> {
        self.allowed_by(std::env::var(self.env).ok().as_deref())
    }

    /// Whether the variable's `value` (None when unset) allows the kernel.
    pub fn allowed_by(&self, value: Option<&str>) -> Result<bool> {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") | Some("auto") => Ok(true),
            Some(v) if v == self.off => Ok(false),
            Some(other) => {
                bail!("{}={other:?} is not a choice: use `{}` ({}) or `auto` (the default)", self.env, self.off, self.off_means)
            }
        }
    }

    /// Acts on a probe's outcome: agreement sets `enabled`; a disagreement or a failed launch
    /// leaves it unset with one warning line on stderr, unless the failure left the GPU unusable
    /// (a fault inside a kernel is sticky), which fails the initialisation naming `skip`.
    pub fn settle(&self, b: &CudaBackend, outcome: std::result::Result<(), String>, enabled: &AtomicBool) -> Result<()> {
        match outcome {
            Ok(()) => enabled.store(true, Ordering::Relaxed),
            Err(reason) => {
                let probe = self.kernel.trim_end_matches(" kernel");
                b.stream().synchronize().with_context(|| {
                    format!("the {probe} probe left the GPU unusable ({reason}); set {}={} to skip it", self.env, self.off)
                })?;
                eprintln!("warning: {} disabled, {reason}; using {}", self.kernel, self.fallback);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn the_probe_comparison_accepts_rounding_and_rejects_nan_and_real_differences() {
        let reference: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.37).sin()).collect();
        let rounded: Vec<f32> = reference.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        assert!(compare("output", &rounded, &reference).unwrap() < 4e-3);
        let mut nan = rounded.clone();
        nan[17] = f32::NAN;
        assert!(compare("output", &nan, &reference).unwrap_err().contains("non-finite value NaN at index 17"));
        let mut off = rounded.clone();
        off[3] += 0.5;
        let e = compare("output", &off, &reference).unwrap_err();
        assert!(e.contains("index 3") && e.contains("max rel err"), "{e}");
        assert!(compare("lse", &rounded[..10], &reference).unwrap_err().contains("10 values against 1000"));
    }
}
