//! A team of spinning threads for the many small parallel loops of a decode step.
//!
//! One decode step of a small model runs about five parallel loops per layer (fused Q/K/V,
//! attention, output projection, fused gate/up, down projection), each a few tens of
//! microseconds of work. Rayon's idle workers go to sleep between them, and waking them costs
//! about as much as the work (a profile of one-stream decode showed a quarter of the time in
//! the scheduler). The team's workers instead spin for a short while after each loop, so the
//! next one starts at once; after [`SPIN`] without work they park. The caller takes tasks too.
//!
//! One loop at a time: a call made while the team is busy (another thread's loop, or a loop
//! inside a task) runs on rayon instead.

use std::any::Any;
use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_micros(200);

/// The current loop: a type-erased `&(dyn Fn(usize) + Sync)` living on the caller's stack.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
}

// SAFETY: the pointer is only dereferenced while the caller keeps the closure alive (see
// `parallel_for`'s protocol), and the closure is `Sync`.
#[allow(unsafe_code)]
unsafe impl Send for Job {}

struct Team {
    /// Odd while a loop is open; each loop moves it by two.
    seq: AtomicUsize,
    job: Mutex<Option<Job>>,
    next: AtomicUsize,
    done: AtomicUsize,
    /// Workers inside the current loop.
    active: AtomicUsize,
    busy: AtomicBool,
    parked: Mutex<usize>,
    wake: Condvar,
    workers: usize,
    /// A task's panic on a worker, re-raised by the caller once the loop is closed.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

/// Runs tasks of the open loop until none is left; returns how many ran here and the first
/// panic among them (a panicking task still counts as done, so the loop always closes).
fn take_tasks(t: &Team, f: &(dyn Fn(usize) + Sync), n: usize) -> (usize, Option<Box<dyn Any + Send>>) {
    let (mut mine, mut panic) = (0, None);
    loop {
        let i = t.next.fetch_add(1, SeqCst);
        if i >= n {
            break;
        }
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(i))) {
            panic.get_or_insert(p);
        }
        mine += 1;
    }
    (mine, panic)
}

static TEAM: OnceLock<Team> = OnceLock::new();

thread_local! {
    static IN_TEAM: Cell<bool> = const { Cell::new(false) };
}

fn team() -> &'static Team {
    TEAM.get_or_init(|| {
        let workers = rayon::current_num_threads().saturating_sub(1);
        for i in 0..workers {
            std::thread::Builder::new().name(format!("vllm-team-{i}")).spawn(work).expect("spawning a team thread");
        }
        Team {
            seq: AtomicUsize::new(0),
            job: Mutex::new(None),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            busy: AtomicBool::new(false),
            parked: Mutex::new(0),
            wake: Condvar::new(),
            workers,
            panic: Mutex::new(None),
        }
    })
}

/// Runs `f(0..n)` across the team (the calling thread included); returns when every call has
/// returned. Tasks are handed out one at a time, in order. A task's panic is re-raised here
/// once every other task has finished (the team stays usable).
pub fn parallel_for(n: usize, f: impl Fn(usize) + Sync) {
    if n == 0 {
        return;
    }
    if n == 1 {
        return f(0);
    }
    let t = team();
    if t.workers == 0 || IN_TEAM.with(Cell::get) || t.busy.compare_exchange(false, true, SeqCst, SeqCst).is_err() {
        return (0..n).into_par_iter().for_each(&f);
    }
    let f: &(dyn Fn(usize) + Sync) = &f;
    // SAFETY: the lifetime is erased only for workers, which touch the job between seeing the
    // loop open (`seq` odd, re-checked after counting themselves in `active`) and leaving
    // `active`; this function closes the loop and waits for `active` to drain before `f` goes.
    #[allow(unsafe_code)]
    let erased: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
    *t.job.lock().unwrap_or_else(|p| p.into_inner()) = Some(Job { f: erased, n });
    t.next.store(0, SeqCst);
    t.done.store(0, SeqCst);
    let open = t.seq.fetch_add(1, SeqCst) + 1;
    debug_assert!(open % 2 == 1);
    if *t.parked.lock().unwrap_or_else(|p| p.into_inner()) > 0 {
        t.wake.notify_all();
    }
    IN_TEAM.with(|c| c.set(true));
    let (mine, mut panic) = take_tasks(t, f, n);
    t.done.fetch_add(mine, SeqCst);
    IN_TEAM.with(|c| c.set(false));
    while t.done.load(SeqCst) < n {
        std::hint::spin_loop();
    }
    t.seq.fetch_add(1, SeqCst);
    while t.active.load(SeqCst) > 0 {
        std::hint::spin_loop();
    }
    *t.job.lock().unwrap_or_else(|p| p.into_inner()) = None;
    let worker_panic = t.panic.lock().unwrap_or_else(|p| p.into_inner()).take();
    t.busy.store(false, SeqCst);
    if let Some(p) = panic.take().or(worker_panic) {
        resume_unwind(p);
    }
}

/// Runs `f(i, chunk)` for each `chunk`-long piece of `data` (the last may be shorter), across
/// the team.
pub fn for_each_chunk_mut<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    assert!(chunk > 0, "chunks of zero elements");
    let len = data.len();
    let base = SendPtr(data.as_mut_ptr());
    parallel_for(len.div_ceil(chunk), |i| {
        let start = i * chunk;
        let end = (start + chunk).min(len);
        // SAFETY: each index runs exactly once, so the chunks are disjoint parts of `data`,
        // which stays mutably borrowed until every task has returned.
        #[allow(unsafe_code)]
        let part = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
        f(i, part);
    });
}

/// Runs `f` on each element of `items` across the team (one task per element).
pub fn for_each_mut<T: Send>(items: &mut [T], f: impl Fn(&mut T) + Sync) {
    for_each_chunk_mut(items, 1, |_, one| one.iter_mut().for_each(&f));
}

/// A raw pointer shared by the tasks of one loop.
struct SendPtr<T>(*mut T);

impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

// SAFETY: only used by `for_each_chunk_mut`, whose tasks touch disjoint elements.
#[allow(unsafe_code)]
unsafe impl<T: Send> Sync for SendPtr<T> {}

fn work() {
    IN_TEAM.with(|c| c.set(true));
    let t = loop {
        if let Some(t) = TEAM.get() {
            break t;
        }
        std::thread::yield_now();
    };
    let mut seen = t.seq.load(SeqCst);
    let mut idle_since = Instant::now();
    let mut spins = 0u32;
    loop {
        let s = t.seq.load(SeqCst);
        if s % 2 == 1 && s != seen {
            t.active.fetch_add(1, SeqCst);
            if t.seq.load(SeqCst) == s {
                let job = *t.job.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(job) = job {
                    // SAFETY: the loop is open and we are counted in `active`, so the caller
                    // keeps the closure alive until we leave.
                    #[allow(unsafe_code)]
                    let f = unsafe { &*job.f };
                    let (mine, panic) = take_tasks(t, f, job.n);
                    if let Some(p) = panic {
                        t.panic.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(p);
                    }
                    t.done.fetch_add(mine, SeqCst);
                }
            }
            t.active.fetch_sub(1, SeqCst);
            seen = s;
            idle_since = Instant::now();
            continue;
        }
        spins += 1;
        if !spins.is_multiple_of(64) || idle_since.elapsed() < SPIN {
            std::hint::spin_loop();
            continue;
        }
        let mut parked = t.parked.lock().unwrap_or_else(|p| p.into_inner());
        *parked += 1;
        while t.seq.load(SeqCst) == s {
            parked = t.wake.wait(parked).unwrap_or_else(|p| p.into_inner());
        }
        *parked -= 1;
        idle_since = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::parallel_for;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn every_task_runs_once_even_when_threads_race_for_the_team() {
        std::thread::scope(|s| {
            for k in 0..4u64 {
                s.spawn(move || {
                    for round in 0..200u64 {
                        let n = (round % 37) as usize + 1;
                        let sum = AtomicU64::new(0);
                        parallel_for(n, |i| {
                            sum.fetch_add(i as u64 + k, Ordering::Relaxed);
                            // A nested loop runs too (on rayon).
                            if i == 0 {
                                let inner = AtomicU64::new(0);
                                parallel_for(3, |j| {
                                    inner.fetch_add(j as u64, Ordering::Relaxed);
                                });
                                assert_eq!(inner.load(Ordering::Relaxed), 3);
                            }
                        });
                        let n = n as u64;
                        assert_eq!(sum.load(Ordering::Relaxed), n * (n - 1) / 2 + n * k);
                    }
                });
            }
        });
        // After the workers parked, a loop still completes.
        std::thread::sleep(std::time::Duration::from_millis(5));
        let hits = AtomicU64::new(0);
        parallel_for(100, |_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 100);
        // A panicking task is re-raised in the caller after the loop closes; the team stays
        // usable.
        for bad in [0usize, 57] {
            let r = std::panic::catch_unwind(|| {
                parallel_for(64, |i| {
                    if i == bad {
                        panic!("task {i} fails");
                    }
                })
            });
            assert!(r.is_err(), "the panic of task {bad} was lost");
            let again = AtomicU64::new(0);
            parallel_for(64, |_| {
                again.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(again.load(Ordering::Relaxed), 64);
        }
        let mut v = vec![0usize; 1001];
        super::for_each_chunk_mut(&mut v, 10, |i, c| c.iter_mut().for_each(|x| *x += i + 1));
        assert!(v.iter().enumerate().all(|(j, &x)| x == j / 10 + 1));
    }
}
