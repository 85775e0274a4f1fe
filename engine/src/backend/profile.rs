//! Op-class timing for `engine bench`: while it is on, each backend op's time is attributed to its
//! class (GEMM, LoRA, attention, norms and elementwise, ...), measured on the backend's own clock
//! (CUDA events on the GPU, so asynchronous launches are timed where they run; the wall clock on
//! the CPU, whose ops are done when they return).
//!
//! An op that calls other ops through the trait (a fused op built from simpler ones) is one span:
//! only the outermost call is timed, so no time is counted twice. The spans' marks are read only
//! when the profile is taken, after the backend has synchronised, so timing adds two event records
//! per op and no synchronisation.

use anyhow::Result;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// What an op is, for FLOP accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OpClass {
    /// A linear over token rows: `2 M N K` for M rows, N outputs, K inputs.
    Gemm,
    /// The two matmuls of an unmerged LoRA update of rank r: `2 M r K + 2 M N r`.
    Lora,
    /// Softmax attention: `4 Lq Lk d` per head and sample (QK^T and PV, 2 Lq Lk d each).
    Attention,
    /// A 2-D convolution (the autoencoder): `2 out_elems C_in kh kw`.
    Conv,
    /// A linear on per-sample vectors `[batch, features]` (embedders, adaLN modulation): not
    /// counted (design.md section 11).
    PerSample,
    /// Norms, activations, residuals, embeddings, scaling: not counted.
    Elementwise,
    /// Copies that only move data (concat, narrow, transpose, pixel (un)shuffle, upsampling): not
    /// counted.
    Layout,
    /// Host to device and back: uploads, model inputs, weight placeholders, downloads.
    Transfer,
    /// The training math beside the model (`TrainingOps`: losses, the Sobolev operator, AdamW):
    /// not counted.
    Training,
}

impl OpClass {
    /// A linear's class by the rank of its input: per-sample vectors `[batch, features]`, or
    /// token rows.
    pub fn of_linear(x_rank: usize) -> OpClass {
        if x_rank <= 2 {
            OpClass::PerSample
        } else {
            OpClass::Gemm
        }
    }

    /// A LoRA update's class by the rank of its input, like `of_linear`.
    pub fn of_lora(x_rank: usize) -> OpClass {
        match OpClass::of_linear(x_rank) {
            OpClass::Gemm => OpClass::Lora,
            class => class,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            OpClass::Gemm => "gemm",
            OpClass::Lora => "lora",
            OpClass::Attention => "attention",
            OpClass::Conv => "conv",
            OpClass::PerSample => "per-sample linear",
            OpClass::Elementwise => "norm/elementwise",
            OpClass::Layout => "layout",
            OpClass::Transfer => "transfer",
            OpClass::Training => "training math",
        }
    }
}

/// A backend's clock: a mark is a point in the stream of ops.
pub trait Clock {
    type Mark;
    fn mark(&self) -> Result<Self::Mark>;
    /// Seconds from `start` to `end`; called only after every op has finished.
    fn seconds(&self, start: &Self::Mark, end: &Self::Mark) -> Result<f64>;
}

/// The time and number of the ops of one class.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ClassTime {
    pub seconds: f64,
    pub ops: usize,
}

/// Time per op class since timing started.
pub type OpTimes = BTreeMap<OpClass, ClassTime>;

/// The spans recorded while timing is on.
pub struct OpProfiler<M> {
    state: Mutex<State<M>>,
}

struct State<M> {
    on: bool,
    /// How many timed ops are running (nested calls through the trait).
    depth: usize,
    open: Option<(OpClass, M)>,
    spans: Vec<(OpClass, M, M)>,
}

impl<M> Default for OpProfiler<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M> OpProfiler<M> {
    pub const fn new() -> Self {
        OpProfiler { state: Mutex::new(State { on: false, depth: 0, open: None, spans: Vec::new() }) }
    }

    /// Starts timing, dropping any spans not yet taken.
    pub fn start(&self) {
        let mut s = self.state.lock().unwrap();
        s.on = true;
        s.spans.clear();
    }

    /// Runs `op`, timing it as `class` when timing is on and no timed op encloses it.
    pub fn time<R>(&self, clock: &impl Clock<Mark = M>, class: OpClass, op: impl FnOnce() -> Result<R>) -> Result<R> {
        {
            let mut s = self.state.lock().unwrap();
            if s.on {
                if s.depth == 0 {
                    s.open = Some((class, clock.mark()?));
                }
                s.depth += 1;
            }
        }
        // The lock is not held while the op runs: it may call other timed ops.
        let result = op();
        let mut s = self.state.lock().unwrap();
        if s.depth == 0 {
            return result; // timing was off when the op started
        }
        s.depth -= 1;
        if s.depth == 0 {
            if let Some((class, start)) = s.open.take() {
                let end = clock.mark()?;
                s.spans.push((class, start, end));
            }
        }
        result
    }

    /// Stops timing and sums the spans by class. The caller synchronises the backend first.
    pub fn take(&self, clock: &impl Clock<Mark = M>) -> Result<OpTimes> {
        let spans = {
            let mut s = self.state.lock().unwrap();
            s.on = false;
            std::mem::take(&mut s.spans)
        };
        let mut times = OpTimes::new();
        for (class, start, end) in &spans {
            let t = times.entry(*class).or_default();
            t.seconds += clock.seconds(start, end)?;
            t.ops += 1;
        }
        Ok(times)
    }
}

/// The wall clock, for backends whose ops finish before they return.
pub struct WallClock;

impl Clock for WallClock {
    type Mark = std::time::Instant;

    fn mark(&self) -> Result<std::time::Instant> {
        Ok(std::time::Instant::now())
    }

    fn seconds(&self, start: &std::time::Instant, end: &std::time::Instant) -> Result<f64> {
        Ok(end.duration_since(*start).as_secs_f64())
    }
}

/// Bytes moved between the host and a backend's memory (`Backend::bytes_moved`).
#[derive(Debug, Default)]
pub struct TransferMeter {
    to_device: AtomicU64,
    to_host: AtomicU64,
}

impl TransferMeter {
    pub const fn new() -> Self {
        TransferMeter { to_device: AtomicU64::new(0), to_host: AtomicU64::new(0) }
    }

    pub fn up(&self, bytes: usize) {
        self.to_device.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn down(&self, bytes: usize) {
        self.to_host.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// (to the device, to the host) so far.
    pub fn read(&self) -> (u64, u64) {
        (self.to_device.load(Ordering::Relaxed), self.to_host.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A clock that advances one tick per mark, so each span's length counts the marks taken
    /// inside it.
    struct Ticks(Cell<u64>);

    impl Clock for Ticks {
        type Mark = u64;
        fn mark(&self) -> Result<u64> {
            self.0.set(self.0.get() + 1);
            Ok(self.0.get())
        }
        fn seconds(&self, start: &u64, end: &u64) -> Result<f64> {
            Ok((end - start) as f64)
        }
    }

    #[test]
    fn spans_are_summed_by_class_and_nested_ops_count_once() {
        let clock = Ticks(Cell::new(0));
        let p = OpProfiler::new();
        // Off: not recorded, and an op may call another (the lock is not held while it runs).
        p.time(&clock, OpClass::Gemm, || p.time(&clock, OpClass::Gemm, || Ok(()))).unwrap();
        p.start();
        p.time(&clock, OpClass::Gemm, || Ok(())).unwrap();
        p.time(&clock, OpClass::Gemm, || Ok(())).unwrap();
        // A fused op calling another op: one attention span; the inner GEMM takes no marks.
        p.time(&clock, OpClass::Attention, || p.time(&clock, OpClass::Gemm, || Ok(()))).unwrap();
        let times = p.take(&clock).unwrap();
        assert_eq!(times[&OpClass::Gemm], ClassTime { seconds: 2.0, ops: 2 });
        assert_eq!(times[&OpClass::Attention], ClassTime { seconds: 1.0, ops: 1 });
        assert_eq!(times.len(), 2);
        // Taking stops timing.
        p.time(&clock, OpClass::Layout, || Ok(())).unwrap();
        assert!(p.take(&clock).unwrap().is_empty());
    }

    #[test]
    fn a_failing_op_is_still_closed_and_its_error_returned() {
        let clock = Ticks(Cell::new(0));
        let p = OpProfiler::new();
        p.start();
        let err = p.time(&clock, OpClass::Elementwise, || -> Result<()> { anyhow::bail!("bad shape") }).unwrap_err();
        assert_eq!(err.to_string(), "bad shape");
        p.time(&clock, OpClass::Gemm, || Ok(())).unwrap();
        let times = p.take(&clock).unwrap();
        assert_eq!(times[&OpClass::Elementwise].ops, 1);
        assert_eq!(times[&OpClass::Gemm].ops, 1, "depth must return to 0 after a failure");
    }
}
