//! A guard on blocking exchanges between ranks. MPI's and NCCL's collectives wait forever for a
//! rank that died or hangs; a thread beside them watches the one in progress and, past its time
//! limit, prints what it waited for and ends the process (`_exit`: an orderly exit would wait in
//! MPI's finalisation for the missing rank too). The launcher then stops the remaining ranks.

use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

/// The exchange being waited for.
struct Armed {
    what: String,
    since: Instant,
}

pub struct Watchdog {
    armed: Arc<Mutex<Option<Armed>>>,
    limit: Duration,
}

impl Watchdog {
    /// A watchdog of rank `rank` whose exchanges may take up to `limit`.
    pub fn new(rank: usize, limit: Duration) -> Self {
        let armed = Arc::new(Mutex::new(None));
        let watched = Arc::downgrade(&armed);
        thread::Builder::new()
            .name("rank watchdog".into())
            .spawn(move || watch_over(rank, limit, watched))
            .expect("cannot start the watchdog thread");
        Watchdog { armed, limit }
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// Runs `f`; if it has not returned within the limit, the process ends with the error
    /// `what`, a sentence saying who did not answer.
    pub fn watch<T>(&self, what: String, f: impl FnOnce() -> T) -> T {
        *self.armed.lock().unwrap_or_else(|e| e.into_inner()) = Some(Armed { what, since: Instant::now() });
        let out = f();
        *self.armed.lock().unwrap_or_else(|e| e.into_inner()) = None;
        out
    }
}

/// The watchdog thread: ends with the watchdog.
fn watch_over(rank: usize, limit: Duration, armed: Weak<Mutex<Option<Armed>>>) {
    let tick = (limit / 20).clamp(Duration::from_millis(10), Duration::from_millis(500));
    while let Some(armed) = armed.upgrade() {
        if let Some(a) = armed.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            if a.since.elapsed() > limit {
                // One write: the ranks and their launcher share the stream.
                let line = format!("error: rank {rank}: {}\n", a.what);
                let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
                // SAFETY: ends the process at once; nothing of it is used afterwards.
                unsafe { libc::_exit(1) };
            }
        }
        drop(armed);
        thread::sleep(tick);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An exchange that returns in time passes through; the thread ends with its watchdog.
    #[test]
    fn an_exchange_within_the_limit_is_left_alone() {
        let w = Watchdog::new(0, Duration::from_millis(300));
        assert_eq!(w.watch("never printed".into(), || 41 + 1), 42);
        thread::sleep(Duration::from_millis(400));
        assert_eq!(w.watch("never printed".into(), || "done"), "done");
        let armed = Arc::downgrade(&w.armed);
        drop(w);
        thread::sleep(Duration::from_millis(100));
        assert!(armed.upgrade().is_none());
    }
}
