//! A team of worker threads that spin between jobs, for splitting one layer over the cores
//! when the batch is too small to split (batch-1 inference).
//!
//! Why not rayon: rayon's idle workers go to sleep within microseconds, and a batch-1
//! forward pass hands out ~100 short jobs (one per layer) back to back, each paying a wake-up
//! (a futex call and a scheduler hop, tens of microseconds): measured, a batch-1 MobileNet
//! V2 ran slower on two threads than on one. The team's workers keep spinning for
//! [`SPIN`] after their last job, as onnxruntime's and OpenMP's threads do, so the next
//! layer's job starts within a cache-line transfer; after that they park and cost nothing.
//!
//! A job is `f(task)` for `task in 0..tasks`, handed out one index at a time; the caller
//! takes part and returns when every task has finished. One caller at a time uses the team:
//! a second (another thread, or a task that itself calls [`run`]) runs its tasks alone.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex, OnceLock, TryLockError};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_micros(200);

/// One job: its tasks, the next unclaimed one, and how many have finished.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
}

impl Job<'_> {
    /// Claims and runs tasks until none is left.
    fn work(&self) {
        loop {
            let task = self.next.fetch_add(1, Relaxed);
            if task >= self.tasks {
                return;
            }
            if catch_unwind(AssertUnwindSafe(|| (self.f)(task))).is_err() {
                self.panicked.store(true, Relaxed);
            }
            self.done.fetch_add(1, Release);
        }
    }
}

struct Shared {
    /// The current job (on the caller's stack), or null between jobs.
    job: AtomicPtr<Job<'static>>,
    /// Bumped for every job; workers wait for it to change.
    epoch: AtomicU64,
    /// Workers between reading `job` and leaving it: the caller waits for zero before its
    /// job goes out of scope.
    active: AtomicUsize,
    /// Workers parked (or about to park).
    parked: AtomicUsize,
    /// Held by the caller of the job in progress.
    caller: Mutex<()>,
}

struct Team {
    shared: Arc<Shared>,
    workers: Vec<Thread>,
}

/// The team, with one worker fewer than rayon's pool (the caller is the other), created on
/// first use.
fn team() -> &'static Team {
    static TEAM: OnceLock<Team> = OnceLock::new();
    TEAM.get_or_init(|| {
        let shared = Arc::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            epoch: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            caller: Mutex::new(()),
        });
        let workers = (1..rayon::current_num_threads())
            .filter_map(|i| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("slimcandle-team-{i}"))
                    .spawn(move || worker(&shared))
                    .ok()
                    .map(|h| h.thread().clone())
            })
            .collect();
        Team { shared, workers }
    })
}

fn worker(shared: &Shared) {
    let mut seen = shared.epoch.load(Acquire);
    loop {
        let idle_since = Instant::now();
        let mut spins = 0u32;
        loop {
            let epoch = shared.epoch.load(Acquire);
            if epoch != seen {
                seen = epoch;
                break;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) || idle_since.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            // Park, announcing it first; the caller bumps `epoch` before reading `parked`, so
            // either this load sees the new epoch or the caller sees us and unparks.
            shared.parked.fetch_add(1, SeqCst);
            if shared.epoch.load(SeqCst) == seen {
                std::thread::park();
            }
            shared.parked.fetch_sub(1, SeqCst);
        }
        shared.active.fetch_add(1, SeqCst);
        let job = shared.job.load(SeqCst);
        if !job.is_null() {
            // SAFETY: the caller keeps its job alive until `active` is back to zero, and it
            // clears `job` before waiting for that, so a non-null job is still alive.
            unsafe { (*job).work() };
        }
        shared.active.fetch_sub(1, SeqCst);
    }
}

/// The number of threads a job is split over: rayon's pool size (set by `--threads`).
pub(crate) fn size() -> usize {
    rayon::current_num_threads().max(1)
}

/// Runs `f(task)` for every `task in 0..tasks` on the team and the calling thread, and returns
/// when all have finished. Tasks run in any order and on any of the threads; a panic in one is
/// re-raised here once the others are done.
pub(crate) fn run(tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    let alone = || (0..tasks).for_each(f);
    if tasks <= 1 || size() == 1 {
        return alone();
    }
    let team = team();
    if team.workers.is_empty() {
        return alone();
    }
    let shared = &*team.shared;
    // A job whose task panicked poisons the lock; the team is still sound (the panic was
    // caught and the job finished), so a poisoned lock is taken like a free one.
    let _caller = match shared.caller.try_lock() {
        Ok(guard) => guard,
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => return alone(),
    };
    let job = Job {
        f,
        tasks,
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
    };
    // SAFETY (lifetime): workers only dereference the pointer while `active` counts them, and
    // this function does not return before `job` is cleared and `active` is zero.
    let ptr = &job as *const Job as *mut Job<'static>;
    shared.job.store(ptr, SeqCst);
    shared.epoch.fetch_add(1, SeqCst);
    if shared.parked.load(SeqCst) > 0 {
        team.workers.iter().for_each(Thread::unpark);
    }
    job.work();
    while job.done.load(Acquire) < tasks {
        std::hint::spin_loop();
    }
    shared.job.store(std::ptr::null_mut(), SeqCst);
    while shared.active.load(SeqCst) != 0 {
        std::hint::spin_loop();
    }
    if job.panicked.load(Relaxed) {
        panic!("a task of a parallel kernel panicked");
    }
}

/// Runs `f` on `parts` contiguous runs of `0..units` (the last one shorter; fewer runs when
/// there are fewer units), one run per task of [`run`]: the one way the kernels split a
/// layer's rows, planes or panels over the team.
pub(crate) fn run_parts(units: usize, parts: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
    let per = units.div_ceil(parts.max(1)).max(1);
    run(units.div_ceil(per), &|t| {
        f(t * per..((t + 1) * per).min(units))
    });
}

/// Runs `f(u, row)` on every row `u` of `y` (`row_len` values each, one task per run of
/// rows), shared out over `threads` tasks of the team (on this thread for one): the
/// channels-last pooling's output rows and the stem's padded input rows.
pub(crate) fn rows(
    y: &mut [f32],
    row_len: usize,
    threads: usize,
    f: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    let units = y.len().checked_div(row_len).unwrap_or(0);
    let out = super::cpu::SharedMut::new(y);
    let run = |units: std::ops::Range<usize>| {
        for u in units {
            // SAFETY: each row is written by the one task that takes it, within `y`.
            f(u, unsafe { out.part(u * row_len, row_len) });
        }
    };
    if threads > 1 && units > 1 {
        run_parts(units, threads, &run);
    } else {
        run(0..units);
    }
}

#[cfg(test)]
mod tests {
    use super::run;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    #[test]
    fn every_task_runs_once() {
        for tasks in [0, 1, 2, 3, 17, 1000] {
            let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            run(tasks, &|t| {
                hits[t].fetch_add(1, Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "{tasks} tasks");
        }
    }

    #[test]
    fn jobs_back_to_back_and_from_several_threads() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..200 {
                        run(4, &|t| {
                            total.fetch_add(t + 1, Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Relaxed), 3 * 200 * 10);
    }

    #[test]
    fn a_nested_job_runs_on_its_caller() {
        let total = AtomicUsize::new(0);
        run(3, &|_| {
            run(5, &|_| {
                total.fetch_add(1, Relaxed);
            })
        });
        assert_eq!(total.load(Relaxed), 15);
    }

    #[test]
    fn a_panicking_task_panics_the_caller() {
        let result = std::panic::catch_unwind(|| {
            run(8, &|t| {
                if t == 5 {
                    panic!("task 5");
                }
            })
        });
        assert!(result.is_err());
        // The team still shares jobs afterwards (its lock is poisoned, not lost): tasks long
        // enough for a worker to claim some run on more than one thread.
        // (Other tests use the team at the same time, and a caller that finds it busy runs
        // alone: a few tries.)
        if super::size() > 1 && !super::team().workers.is_empty() {
            let shared = (0..50).any(|_| {
                let threads = std::sync::Mutex::new(std::collections::HashSet::new());
                run(16, &|_| {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    threads.lock().unwrap().insert(std::thread::current().id());
                });
                threads.into_inner().unwrap().len() > 1
            });
            assert!(
                shared,
                "after a panic, jobs no longer reach the team's workers"
            );
        }
        let total = AtomicUsize::new(0);
        run(8, &|_| {
            total.fetch_add(1, Relaxed);
        });
        assert_eq!(total.load(Relaxed), 8);
    }
}
