//! The world of ranks started by an MPI launcher (`mpirun`, `srun` through PMI), through rsmpi.
//!
//! Only the main thread calls MPI (`Threading::Funneled`); the watchdog thread never does. Every
//! exchange blocks under the watchdog. Buffers larger than MPI's `int` counts go in chunks.

use super::{LauncherTasks, Watchdog, World};
use anyhow::{bail, ensure, Result};
use mpi::collective::SystemOperation;
use mpi::datatype::{Equivalence, PartitionMut};
use mpi::environment::{Threading, Universe};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Count;
use std::time::Duration;

/// Elements per MPI call: well inside a C `int`.
const CHUNK: usize = 1 << 28;
/// Tags of the step's check-in: (step, stop) to rank 0, and its verdict back.
const CHECK_IN: mpi::Tag = 17;
const VERDICT: mpi::Tag = 18;

pub struct MpiWorld {
    comm: SimpleCommunicator,
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    watchdog: Watchdog,
    /// The watchdog of a rank other than 0 waiting for rank 0's verdict at a check-in: longer,
    /// so that rank 0, which knows whom it waits for, names a late rank first.
    patient: Watchdog,
    /// Last: dropping it finalises MPI, after everything above is gone.
    _universe: Universe,
}

impl MpiWorld {
    /// Initialises MPI in a process the launcher says is one of `tasks`.
    pub fn init(timeout: Duration, tasks: LauncherTasks) -> Result<Self> {
        let Some((universe, _)) = mpi::initialize_with_threading(Threading::Funneled) else {
            bail!("MPI was initialised twice in one process");
        };
        let comm = universe.world();
        let (rank, size) = (comm.rank() as usize, comm.size() as usize);
        if size == 1 && tasks.count > 1 {
            bail!(
                "{}={} tasks were started, but MPI sees this one alone: with srun, pass --mpi=pmix (or pmi2) so that \
                 the tasks join one MPI world",
                tasks.variable,
                tasks.count
            );
        }
        let node = comm.split_shared(rank as i32);
        let (local_rank, local_size) = (node.rank() as usize, node.size() as usize);
        drop(node);
        let patient = Watchdog::new(rank, timeout + timeout / 2 + Duration::from_secs(5));
        Ok(MpiWorld { comm, rank, size, local_rank, local_size, watchdog: Watchdog::new(rank, timeout), patient, _universe: universe })
    }

    fn seconds(&self) -> u64 {
        self.watchdog.limit().as_secs()
    }

    /// A collective's `f` under the watchdog, named `what` for the error.
    fn collective<T>(&self, what: &str, f: impl FnOnce() -> T) -> T {
        let message = format!("{what} did not finish within {} s: a rank died or hangs", self.seconds());
        self.watchdog.watch(message, f)
    }

    fn sum<T: Equivalence + Copy>(&self, values: &mut [T]) -> Result<()> {
        self.collective("a sum over the ranks", || {
            for chunk in values.chunks_mut(CHUNK) {
                let send = chunk.to_vec();
                self.comm.all_reduce_into(&send[..], chunk, SystemOperation::sum());
            }
        });
        Ok(())
    }
}

impl World for MpiWorld {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn local_rank(&self) -> usize {
        self.local_rank
    }

    fn local_size(&self) -> usize {
        self.local_size
    }

    fn describe(&self) -> String {
        let version = mpi::environment::library_version().unwrap_or_default();
        match version.split([',', '\n']).next().map(str::trim).filter(|v| !v.is_empty()) {
            Some(v) => v.to_string(),
            None => "MPI".into(),
        }
    }

    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()> {
        let root = self.comm.process_at_rank(0);
        self.collective("a broadcast from rank 0", || {
            let mut len = bytes.len() as u64;
            root.broadcast_into(&mut len);
            bytes.resize(len as usize, 0);
            for chunk in bytes.chunks_mut(CHUNK) {
                root.broadcast_into(chunk);
            }
        });
        Ok(())
    }

    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        ensure!(bytes.len() < CHUNK, "an all-gather of {} bytes: too large", bytes.len());
        let gathered = self.collective("an all-gather", || {
            let mut counts = vec![0 as Count; self.size];
            self.comm.all_gather_into(&(bytes.len() as Count), &mut counts[..]);
            let displs: Vec<Count> = counts.iter().scan(0, |at, &n| Some(std::mem::replace(at, *at + n))).collect();
            let mut all = vec![0u8; counts.iter().map(|&n| n as usize).sum()];
            self.comm.all_gather_varcount_into(bytes, &mut PartitionMut::new(&mut all[..], &counts[..], &displs[..]));
            (all, counts, displs)
        });
        let (all, counts, displs) = gathered;
        Ok(counts.iter().zip(&displs).map(|(&n, &at)| all[at as usize..(at + n) as usize].to_vec()).collect())
    }

    fn sum_f32(&self, values: &mut [f32]) -> Result<()> {
        self.sum(values)
    }

    fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        self.sum(values)
    }

    /// Rank 0 receives each rank's (step, stop) in rank order, so that it knows whom it waits
    /// for, then sends every rank the common stop.
    fn check_in(&self, step: u64, stop: bool) -> Result<bool> {
        let seconds = self.seconds();
        if self.rank == 0 {
            let mut any_stop = stop;
            for r in 1..self.size {
                let mut message = [0u64; 2];
                let what = format!("rank {r} did not reach step {step} within {seconds} s: it died or hangs; stopping the run");
                self.watchdog.watch(what, || self.comm.process_at_rank(r as i32).receive_into_with_tag(&mut message[..], CHECK_IN));
                ensure!(message[0] == step, "rank {r} is at step {} while rank 0 is at step {step}", message[0]);
                any_stop |= message[1] != 0;
            }
            for r in 1..self.size {
                self.comm.process_at_rank(r as i32).send_with_tag(&[any_stop as u64][..], VERDICT);
            }
            Ok(any_stop)
        } else {
            let root = self.comm.process_at_rank(0);
            let mut verdict = [0u64; 1];
            let what = format!(
                "rank 0 did not answer at step {step} within {} s: it died or hangs; stopping the run",
                self.patient.limit().as_secs()
            );
            self.patient.watch(what, || {
                root.send_with_tag(&[step, stop as u64][..], CHECK_IN);
                root.receive_into_with_tag(&mut verdict[..], VERDICT);
            });
            Ok(verdict[0] != 0)
        }
    }

    fn watchdog(&self) -> Option<&Watchdog> {
        Some(&self.watchdog)
    }

    fn abort(&self, code: i32) -> ! {
        self.comm.abort(code)
    }
}
