//! The memory planner: every non-weight buffer of an op trace gets a lifetime and an offset in one
//! arena, so that a run needs one allocation of known size instead of an allocator's guesswork.
//!
//! - Lifetime: `[start, end)` in event indices, from the op that creates the buffer to its free
//!   event (the end of the trace when it is never freed). Two buffers conflict when their
//!   lifetimes intersect; an op's inputs and outputs are live at the op, so they never share.
//! - Sizes are rounded up to `ALIGNMENT` (256 bytes, enough for any vectorised GPU access) and
//!   offsets are multiples of it.
//! - Packing: the classic greedy for offline dynamic storage allocation: buffers sorted by size
//!   (largest first; ties by start, then id, so plans are reproducible), each placed at the lowest
//!   offset where it overlaps no already-placed buffer with an intersecting lifetime. Large
//!   buffers first leaves the small ones to fill the gaps; O(n^2) over a few thousand buffers.
//! - Lower bound: the most aligned bytes live at any one event. No packing can use less, so the
//!   ratio arena / lower bound shows the packing's quality (the greedy reaches the bound on a
//!   chain; FLUX's traces come close).
//! - Peak: weights (resident, outside the arena, at their exact size) + arena + a fixed GEMM
//!   workspace.

use super::meta::{BufferKind, Event, StorageId, Trace};
use std::collections::HashMap;

/// Alignment of every buffer's offset and size in the arena.
pub const ALIGNMENT: u64 = 256;

/// The cuBLASLt workspace recommended for Hopper GPUs (32 MiB).
pub const HOPPER_CUBLASLT_WORKSPACE: u64 = 32 << 20;

/// `bytes` rounded up to a multiple of `ALIGNMENT`.
pub fn aligned(bytes: u64) -> u64 {
    bytes.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// One buffer of the arena: its aligned size and its lifetime `[start, end)` in event indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifetime {
    pub id: StorageId,
    pub bytes: u64,
    pub start: usize,
    pub end: usize,
}

impl Lifetime {
    pub fn overlaps(&self, other: &Lifetime) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// Bytes of all weights in the trace, unaligned (each is its own resident allocation).
pub fn weight_bytes(trace: &Trace) -> u64 {
    trace.buffers().filter(|b| b.kind == BufferKind::Weight).map(|b| b.bytes()).sum()
}

/// The lifetime of every non-weight buffer (inputs, uploaded tables, activations), in creation
/// order.
pub fn lifetimes(trace: &Trace) -> Vec<Lifetime> {
    let mut open: HashMap<StorageId, usize> = HashMap::new();
    let mut out: Vec<Lifetime> = Vec::new();
    for (i, event) in trace.events.iter().enumerate() {
        match event {
            Event::Op(op) => {
                for b in op.outputs.iter().filter(|b| b.kind != BufferKind::Weight) {
                    open.insert(b.id, out.len());
                    out.push(Lifetime { id: b.id, bytes: aligned(b.bytes()), start: i, end: trace.events.len() });
                }
            }
            Event::Free(id) => {
                if let Some(k) = open.remove(id) {
                    out[k].end = i;
                }
            }
        }
    }
    out
}

/// The most aligned bytes live at any one event.
pub fn lower_bound(lifetimes: &[Lifetime]) -> u64 {
    let len = lifetimes.iter().map(|l| l.end).max().unwrap_or(0);
    let mut delta = vec![0i128; len + 1];
    for l in lifetimes {
        delta[l.start] += l.bytes as i128;
        delta[l.end] -= l.bytes as i128;
    }
    let mut live = 0i128;
    delta
        .iter()
        .map(|d| {
            live += d;
            live
        })
        .max()
        .unwrap_or(0) as u64
}

/// Offsets (parallel to the lifetimes given) and the arena size they need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packing {
    pub offsets: Vec<u64>,
    pub arena: u64,
}

/// Places every buffer (see the module docs for the greedy).
pub fn pack(lifetimes: &[Lifetime]) -> Packing {
    let mut order: Vec<usize> = (0..lifetimes.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lifetimes[i].bytes), lifetimes[i].start, lifetimes[i].id));
    let mut offsets = vec![0u64; lifetimes.len()];
    let mut placed: Vec<usize> = Vec::with_capacity(lifetimes.len());
    let mut arena = 0;
    for i in order {
        let l = &lifetimes[i];
        let mut taken: Vec<(u64, u64)> =
            placed.iter().filter(|&&j| lifetimes[j].overlaps(l)).map(|&j| (offsets[j], offsets[j] + lifetimes[j].bytes)).collect();
        taken.sort_unstable();
        // The lowest gap that fits: walk the conflicting ranges by offset.
        let mut offset = 0;
        for (begin, end) in taken {
            if begin >= offset + l.bytes {
                break;
            }
            offset = offset.max(end);
        }
        offsets[i] = offset;
        arena = arena.max(offset + l.bytes);
        placed.push(i);
    }
    Packing { offsets, arena }
}

/// Device memory for one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryPlan {
    pub weights: u64,
    /// The packed activation arena.
    pub arena: u64,
    /// The most bytes live at once: no arena can be smaller.
    pub lower_bound: u64,
    pub workspace: u64,
}

impl MemoryPlan {
    /// Plans a trace's buffers with their own lifetimes.
    pub fn of(trace: &Trace, workspace: u64) -> Self {
        Self::from_lifetimes(weight_bytes(trace), &lifetimes(trace), workspace)
    }

    pub fn from_lifetimes(weights: u64, lifetimes: &[Lifetime], workspace: u64) -> Self {
        MemoryPlan { weights, arena: pack(lifetimes).arena, lower_bound: lower_bound(lifetimes), workspace }
    }

    /// `weights + arena + workspace`.
    pub fn peak(&self) -> u64 {
        self.weights + self.arena + self.workspace
    }
}

/// Test check: every pair of simultaneously-live buffers occupies disjoint ranges, offsets are
/// aligned, and all fit in the arena.
#[cfg(test)]
pub(crate) fn assert_valid(lifetimes: &[Lifetime], p: &Packing) {
    assert_eq!(p.offsets.len(), lifetimes.len());
    for (i, a) in lifetimes.iter().enumerate() {
        assert_eq!(p.offsets[i] % ALIGNMENT, 0, "buffer {} at {}", a.id, p.offsets[i]);
        assert!(p.offsets[i] + a.bytes <= p.arena, "buffer {} ends past the arena", a.id);
        for (j, b) in lifetimes.iter().enumerate().skip(i + 1) {
            if a.overlaps(b) {
                let (ra, rb) = (p.offsets[i]..p.offsets[i] + a.bytes, p.offsets[j]..p.offsets[j] + b.bytes);
                assert!(ra.end <= rb.start || rb.end <= ra.start, "buffers {} {ra:?} and {} {rb:?} are live together", a.id, b.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn life(id: usize, bytes: u64, start: usize, end: usize) -> Lifetime {
        Lifetime { id, bytes, start, end }
    }

    #[test]
    fn sizes_round_up_to_the_alignment() {
        assert_eq!([aligned(0), aligned(1), aligned(256), aligned(257)], [0, 256, 256, 512]);
    }

    #[test]
    fn a_chain_packs_to_its_lower_bound() {
        // x0 -> x1 -> ... where each buffer dies right after the next is made: only neighbours
        // are ever live together, so the bound is the largest neighbouring pair.
        let sizes = [3, 1, 4, 1, 5, 9, 2, 6].map(|s| s * ALIGNMENT);
        let chain: Vec<Lifetime> = sizes.iter().enumerate().map(|(i, &s)| life(i, s, 2 * i, 2 * i + 3)).collect();
        assert!(chain[0].overlaps(&chain[1]) && !chain[0].overlaps(&chain[2]));
        let p = pack(&chain);
        assert_valid(&chain, &p);
        assert_eq!(lower_bound(&chain), (5 + 9) * ALIGNMENT);
        assert_eq!(p.arena, lower_bound(&chain));
    }

    #[test]
    fn freed_space_is_reused_and_live_space_is_not() {
        // a dies before c is made, so c takes a's place; b overlaps both and sits above them.
        let ls = [life(0, 512, 0, 2), life(1, 256, 1, 5), life(2, 512, 3, 6)];
        let p = pack(&ls);
        assert_valid(&ls, &p);
        assert_eq!(p.offsets, vec![0, 512, 0]);
        assert_eq!((p.arena, lower_bound(&ls)), (768, 768));
    }

    #[test]
    fn the_bound_counts_buffers_live_at_the_same_event_only() {
        // [0, 2) and [2, 4) touch but never coexist.
        let ls = [life(0, 1024, 0, 2), life(1, 1024, 2, 4), life(2, 256, 1, 3)];
        assert_eq!(lower_bound(&ls), 1280);
        let p = pack(&ls);
        assert_valid(&ls, &p);
        assert_eq!(p.arena, 1280);
    }

    #[test]
    fn the_arena_never_undercuts_the_bound() {
        // A deterministic pseudo-random mix of sizes and lifetimes.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = |m: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % m
        };
        let ls: Vec<Lifetime> = (0..300)
            .map(|id| {
                let start = next(400) as usize;
                life(id, aligned(1 + next(1 << 20)), start, start + 1 + next(60) as usize)
            })
            .collect();
        let p = pack(&ls);
        assert_valid(&ls, &p);
        let bound = lower_bound(&ls);
        assert!(p.arena >= bound);
        assert!(p.arena <= bound * 3 / 2, "arena {} vs bound {bound}", p.arena);
    }

    #[test]
    fn peak_is_weights_arena_and_workspace() {
        let plan = MemoryPlan::from_lifetimes(1000, &[life(0, 512, 0, 1)], HOPPER_CUBLASLT_WORKSPACE);
        assert_eq!(plan.peak(), 1000 + 512 + (32 << 20));
    }
}
