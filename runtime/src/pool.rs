//! The threads a model's parallel steps run on: workers that spin between steps.
//!
//! A model's run is a sequence of short parallel steps (a 128-row product takes 0.1–0.5 ms)
//! separated by serial ones. rayon's idle workers go to sleep within microseconds, and waking a
//! sleeping thread — on a virtual machine, a halted virtual CPU — costs tens to hundreds of
//! microseconds: `bench/gemm.py` saw 128×384×1152 at a median of 229 GFLOP/s with p10 at 118
//! where back-to-back calls reach 374, and ONNX Runtime's intra-op pool spins by default. Here
//! workers spin on an epoch counter for `SPIN` after their last task before they park, so the
//! steps of one run find them awake, and an idle model costs no CPU after `SPIN`.
//!
//! `Pool::install` makes a pool current on the calling thread; [`for_each`] runs tasks on the
//! current pool (the caller takes tasks too), or on rayon's when none is current.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_millis(2);

/// After this long idle, a spinning worker yields its core between checks.
const YIELD_AFTER: Duration = Duration::from_micros(100);

/// A job's tasks: `f(i)` for `i` in `0..n`. The pointer is valid while the job is installed.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
    epoch: u64,
}

// SAFETY: the closure is `Sync`; `run` keeps it alive until every worker has left it.
unsafe impl Send for Job {}

struct Shared {
    /// Bumped when a job is installed (and at shutdown).
    epoch: AtomicU64,
    /// The installed job, if any; workers join it under this lock.
    slot: Mutex<Option<Job>>,
    wake: Condvar,
    /// Workers parked on `wake`.
    sleepers: AtomicUsize,
    /// The next task index to take.
    next: AtomicUsize,
    /// Tasks finished.
    done: AtomicUsize,
    /// Workers inside the installed job.
    active: AtomicUsize,
    /// A task panicked.
    panicked: AtomicBool,
    shutdown: AtomicBool,
}

/// Worker threads that spin between jobs; dropping the pool stops them.
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<std::thread::JoinHandle<()>>,
    /// Serialises jobs from different calling threads.
    gate: Mutex<()>,
}

thread_local! {
    /// The pool `for_each` uses on this thread (set by `Pool::install`).
    static CURRENT: Cell<*const Pool> = const { Cell::new(std::ptr::null()) };
    /// Whether this thread is a pool worker or is running a job (nested `for_each` runs
    /// serially).
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

impl Pool {
    /// A pool of `threads` threads in all: the caller and `threads - 1` workers.
    pub fn new(threads: usize) -> Result<Pool, String> {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            slot: Mutex::new(None),
            wake: Condvar::new(),
            sleepers: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
        });
        let mut workers = Vec::new();
        for i in 1..threads.max(1) {
            let s = shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("kiln-{i}"))
                .spawn(move || worker(&s))
                .map_err(|e| format!("cannot start a worker thread: {e}"))?;
            workers.push(h);
        }
        Ok(Pool {
            shared,
            workers,
            gate: Mutex::new(()),
        })
    }

    /// Runs `f` with this pool current on the calling thread.
    pub fn install<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(*const Pool);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(CURRENT.with(|c| c.replace(self as *const Pool)));
        f()
    }

    /// `f(i)` for every `i < n`, on the workers and the calling thread; returns when all are done.
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let _gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        s.next.store(0, Ordering::Relaxed);
        s.done.store(0, Ordering::Relaxed);
        s.panicked.store(false, Ordering::Relaxed);
        {
            let mut slot = s.slot.lock().unwrap_or_else(|e| e.into_inner());
            let epoch = s.epoch.load(Ordering::Relaxed) + 1;
            // SAFETY: only the lifetime is erased; the job is removed below before `f` dies.
            let f: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
            *slot = Some(Job { f, n, epoch });
            s.epoch.store(epoch, Ordering::Release);
            if s.sleepers.load(Ordering::Relaxed) > 0 {
                s.wake.notify_all();
            }
        }
        BUSY.with(|b| b.set(true));
        take_tasks(s, f, n);
        BUSY.with(|b| b.set(false));
        while s.done.load(Ordering::Acquire) < n {
            std::hint::spin_loop();
        }
        *s.slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
        while s.active.load(Ordering::Acquire) > 0 {
            std::hint::spin_loop();
        }
        if s.panicked.load(Ordering::Relaxed) {
            panic!("a parallel task panicked");
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let s = &*self.shared;
        {
            let _slot = s.slot.lock().unwrap_or_else(|e| e.into_inner());
            s.shutdown.store(true, Ordering::Release);
            s.epoch.fetch_add(1, Ordering::Release);
            s.wake.notify_all();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// Takes tasks until none are left; every task taken is counted done, panicking or not.
fn take_tasks(s: &Shared, f: &(dyn Fn(usize) + Sync), n: usize) {
    loop {
        let i = s.next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            return;
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i)));
        if r.is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
        s.done.fetch_add(1, Ordering::Release);
    }
}

fn worker(s: &Shared) {
    BUSY.with(|w| w.set(true));
    let mut seen = 0u64;
    loop {
        let idle = Instant::now();
        let mut spins = 0u32;
        while s.epoch.load(Ordering::Acquire) == seen {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) {
                let t = idle.elapsed();
                if t > SPIN {
                    park(s, seen);
                } else if t > YIELD_AFTER {
                    // Let a caller that shares this core run (more threads than cores).
                    std::thread::yield_now();
                }
            }
        }
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        seen = s.epoch.load(Ordering::Acquire);
        let job = {
            let slot = s.slot.lock().unwrap_or_else(|e| e.into_inner());
            match *slot {
                Some(j) if j.epoch == seen => {
                    s.active.fetch_add(1, Ordering::AcqRel);
                    Some(j)
                }
                _ => None,
            }
        };
        if let Some(j) = job {
            // SAFETY: `run` keeps the closure alive until `active` is back to zero.
            take_tasks(s, unsafe { &*j.f }, j.n);
            s.active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Waits on the condition variable until the epoch moves past `seen`.
fn park(s: &Shared, seen: u64) {
    let mut slot = s.slot.lock().unwrap_or_else(|e| e.into_inner());
    s.sleepers.fetch_add(1, Ordering::Relaxed);
    while s.epoch.load(Ordering::Acquire) == seen {
        slot = s.wake.wait(slot).unwrap_or_else(|e| e.into_inner());
    }
    s.sleepers.fetch_sub(1, Ordering::Relaxed);
}

/// `f(i)` for every `i < n` in parallel: on the current [`Pool`] if one is installed, serially on
/// a pool's worker, else on rayon's current pool.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync + Send) {
    if n <= 1 || BUSY.with(|w| w.get()) {
        (0..n).for_each(f);
        return;
    }
    let pool = CURRENT.with(|c| c.get());
    if pool.is_null() {
        use rayon::prelude::*;
        (0..n).into_par_iter().for_each(f);
    } else {
        // SAFETY: `install` keeps the pool current only while it is borrowed.
        unsafe { &*pool }.run(n, &f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_across_many_jobs() {
        let pool = Pool::new(3).unwrap();
        pool.install(|| {
            for n in [0, 1, 2, 7, 100] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                for _ in 0..50 {
                    for_each(n, |i| {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    });
                }
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 50), "n = {n}");
            }
        });
    }

    #[test]
    fn parked_workers_wake_for_the_next_job() {
        let pool = Pool::new(2).unwrap();
        std::thread::sleep(SPIN * 3);
        let count = AtomicUsize::new(0);
        pool.install(|| {
            for_each(64, |_| {
                count.fetch_add(1, Ordering::Relaxed);
            })
        });
        assert_eq!(count.load(Ordering::Relaxed), 64);
    }

    #[test]
    fn a_panicking_task_reaches_the_caller() {
        let pool = Pool::new(2).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.install(|| for_each(16, |i| assert!(i != 11, "task 11")))
        }));
        assert!(r.is_err());
        // The pool still works afterwards.
        let count = AtomicUsize::new(0);
        pool.install(|| {
            for_each(16, |_| {
                count.fetch_add(1, Ordering::Relaxed);
            })
        });
        assert_eq!(count.load(Ordering::Relaxed), 16);
    }
}
