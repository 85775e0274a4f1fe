//! The ranks of a data-parallel run: which one this process is, and how the ranks talk.
//!
//! `mpirun -np N engine train ...` or `srun engine train ...` starts N processes; each opens its
//! [`World`]: rank r of N, with its rank on its node (which picks its GPU). In a build with the
//! `mpi` feature and a launcher's variables in the environment the world is MPI's (`mpi.rs`);
//! otherwise it is one rank alone ([`Solo`]), and a build without MPI refuses to run as one of
//! several tasks rather than let N copies write one output.
//!
//! What goes through the world is small and on the host: settings and start-up verdicts, the
//! step's check-in, the NCCL id, the logged scalars and, for CPU ranks, the gradients themselves
//! (`backend::collective`). GPU ranks reduce their gradients through NCCL on the device.
//!
//! Failure: no rank waits forever. Every blocking exchange runs under a [`Watchdog`]: when it
//! has not finished within the timeout, the rank prints one line naming what it waited for (at
//! a step's check-in, the rank that did not arrive) and exits, which makes the launcher stop the
//! others. Rank 0 alone writes files, each atomically, so nothing is left half-written.

pub mod watchdog;

#[cfg(feature = "mpi")]
mod mpi;

use anyhow::{bail, Result};
use std::fmt;
use std::time::Duration;
pub use watchdog::Watchdog;

/// How long a rank waits for the others by default: long enough for a slow rank's step, a
/// checkpoint save on rank 0, or a model load at start-up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// The ranks of a run, as this process sees them. Every exchange must be entered by every rank,
/// in the same order.
pub trait World {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// This process's rank among the ranks on its node: its GPU.
    fn local_rank(&self) -> usize;
    /// How many ranks share this node.
    fn local_size(&self) -> usize;
    /// What launched the ranks, for messages: "one process", "MPI".
    fn describe(&self) -> String;
    /// Rank 0's `bytes` on every rank.
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()>;
    /// Every rank's `bytes`, in rank order, on every rank.
    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Each value replaced by its sum over the ranks, on every rank.
    fn sum_f32(&self, values: &mut [f32]) -> Result<()>;
    fn sum_f64(&self, values: &mut [f64]) -> Result<()>;
    /// The ranks meet before `step`'s exchange: each says whether it was asked to stop, and all
    /// learn whether any was. A rank that does not arrive within the timeout is named.
    fn check_in(&self, step: u64, stop: bool) -> Result<bool>;
    /// The guard of this world's blocking exchanges; None for one rank, which never waits.
    fn watchdog(&self) -> Option<&Watchdog>;
    /// Ends every rank of the run at once (after a failure on this one), without the orderly
    /// shutdown that would wait for the others.
    fn abort(&self, code: i32) -> !;
}

/// One process alone: rank 0 of 1.
pub struct Solo;

impl World for Solo {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn local_rank(&self) -> usize {
        0
    }

    fn local_size(&self) -> usize {
        1
    }

    fn describe(&self) -> String {
        "one process".into()
    }

    fn broadcast(&self, _: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }

    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![bytes.to_vec()])
    }

    fn sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }

    fn sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn check_in(&self, _: u64, stop: bool) -> Result<bool> {
        Ok(stop)
    }

    fn watchdog(&self) -> Option<&Watchdog> {
        None
    }

    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// The world this process was started into: MPI's when a launcher started it (and the build has
/// MPI), else [`Solo`]. `timeout` bounds every wait for another rank.
pub fn open(timeout: Duration) -> Result<Box<dyn World>> {
    let launched = launcher_tasks();
    #[cfg(feature = "mpi")]
    if let Some(tasks) = launched {
        return Ok(Box::new(mpi::MpiWorld::init(timeout, tasks)?));
    }
    let _ = timeout;
    if let Some(tasks) = launched.filter(|t| t.count > 1) {
        bail!(
            "started as one of {} tasks ({}={}), but this engine was built without MPI: build it with \
             `cargo build --release --features mpi` to train on several ranks",
            tasks.count,
            tasks.variable,
            tasks.count
        );
    }
    Ok(Box::new(Solo))
}

/// What a launcher says about the tasks it started.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LauncherTasks {
    pub count: usize,
    /// The environment variable that said so.
    pub variable: &'static str,
}

/// The task count set by mpirun (Open MPI), a PMI launcher (MPICH's hydra, `srun --mpi=pmi2`)
/// or srun; None when no launcher started this process.
pub fn launcher_tasks() -> Option<LauncherTasks> {
    launcher_tasks_in(|name| std::env::var(name).ok())
}

fn launcher_tasks_in(var: impl Fn(&str) -> Option<String>) -> Option<LauncherTasks> {
    const COUNTS: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"];
    for variable in COUNTS {
        if let Some(count) = var(variable).and_then(|v| v.trim().parse().ok()) {
            return Some(LauncherTasks { count, variable });
        }
    }
    // PMIx (Open MPI 5's launcher, `srun --mpi=pmix`) names the rank, not the count.
    var("PMIX_RANK").map(|_| LauncherTasks { count: 0, variable: "PMIX_RANK" })
}

/// A start-up failure that every rank knows about (the same verdict on all of them): rank 0
/// reports it and every rank exits in order, instead of each aborting the run on its own.
#[derive(Debug)]
pub struct Agreed(pub String);

impl fmt::Display for Agreed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Agreed {}

/// Every rank's `local` outcome of one start-up step, made common: Ok where all succeeded, else
/// on every rank an [`Agreed`] error, the first failing rank's (named unless all failed alike).
pub fn agree<T>(world: &dyn World, local: Result<T>) -> Result<T> {
    if world.size() == 1 {
        return local;
    }
    // One byte of verdict, then the message.
    let mine = match &local {
        Ok(_) => vec![0u8],
        Err(e) => [&[1u8][..], format!("{e:#}").as_bytes()].concat(),
    };
    let failures: Vec<(usize, String)> = world
        .all_gather(&mine)?
        .into_iter()
        .enumerate()
        .filter(|(_, v)| v.first() == Some(&1))
        .map(|(rank, v)| (rank, String::from_utf8_lossy(&v[1..]).into_owned()))
        .collect();
    let Some((rank, message)) = failures.first() else { return local };
    let alike = failures.len() == world.size() && failures.iter().all(|(_, m)| m == message);
    Err(Agreed(if alike { message.clone() } else { format!("rank {rank}: {message}") }).into())
}

/// A 128-byte id made by rank 0 (`make`) and known to every rank: how NCCL's ranks find each
/// other (its documented bootstrap: `ncclGetUniqueId` on rank 0, broadcast over MPI).
pub fn shared_id(world: &dyn World, make: impl FnOnce() -> Result<[u8; 128]>) -> Result<[u8; 128]> {
    let mut bytes = match world.rank() {
        0 => make()?.to_vec(),
        _ => Vec::new(),
    };
    world.broadcast(&mut bytes)?;
    bytes.try_into().map_err(|b: Vec<u8>| anyhow::anyhow!("the shared id from rank 0 has {} bytes, not 128", b.len()))
}

/// The GPU of a rank: its rank on the node, modulo the GPUs the node shows it (a launcher that
/// gives each task one GPU through CUDA_VISIBLE_DEVICES shows one).
pub fn gpu_of(local_rank: usize, gpus: usize) -> usize {
    local_rank % gpus.max(1)
}

/// `f` under `world`'s watchdog, which ends the process with `what` (a sentence saying who did
/// not answer) if it has not returned within the timeout.
pub fn watched<T>(world: &dyn World, what: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
    match world.watchdog() {
        Some(w) => w.watch(what(), f),
        None => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launchers_are_recognised_by_their_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        assert_eq!(launcher_tasks_in(env(&[])), None);
        assert_eq!(
            launcher_tasks_in(env(&[("OMPI_COMM_WORLD_SIZE", "4")])),
            Some(LauncherTasks { count: 4, variable: "OMPI_COMM_WORLD_SIZE" })
        );
        assert_eq!(launcher_tasks_in(env(&[("SLURM_STEP_NUM_TASKS", "8"), ("PMI_SIZE", "8")])).unwrap().variable, "PMI_SIZE");
        assert_eq!(launcher_tasks_in(env(&[("PMIX_RANK", "0")])).unwrap().variable, "PMIX_RANK");
        assert_eq!(launcher_tasks_in(env(&[("SLURM_STEP_NUM_TASKS", "x")])), None);
    }

    #[test]
    fn each_rank_of_a_node_takes_its_own_gpu() {
        assert_eq!((0..4).map(|r| gpu_of(r, 4)).collect::<Vec<_>>(), [0, 1, 2, 3]);
        // One visible GPU per task: every rank's is ordinal 0.
        assert_eq!((0..4).map(|r| gpu_of(r, 1)).collect::<Vec<_>>(), [0, 0, 0, 0]);
        assert_eq!(gpu_of(3, 0), 0);
    }

    #[test]
    fn one_rank_agrees_with_itself_and_shares_its_own_id() {
        assert_eq!(agree(&Solo, Ok(3)).unwrap(), 3);
        let err = agree::<()>(&Solo, Err(anyhow::anyhow!("bad"))).unwrap_err();
        assert_eq!(err.to_string(), "bad");
        assert_eq!(shared_id(&Solo, || Ok([7; 128])).unwrap(), [7; 128]);
        assert!(!Solo.check_in(3, false).unwrap() && Solo.check_in(3, true).unwrap());
    }
}
