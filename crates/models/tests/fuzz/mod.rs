//! The fuzzing harness the loader fuzz targets share (`crates/models/tests/fuzz_loader.rs`,
//! `crates/tokenizer/tests/fuzz_tokenizer.rs`, which includes this file): a deterministic
//! mutation loop over a committed seed corpus (`fixtures/fuzz/<target>/`), bounded in time,
//! with every panic caught and an allocation cap.
//!
//! - `VLLM_FUZZ_SECONDS`: how long each target runs (default [`DEFAULT_SECONDS`]; `cargo xtask
//!   fuzz <target> --time <s>` sets it).
//! - `VLLM_FUZZ_SEED`: mutant `i` draws its mutations from a ChaCha8 generator seeded with
//!   `seed + i` (default 0, so CI replays the same mutants).
//! - `VLLM_FUZZ_ONE=<seed>`: runs that one mutant (the seed a failure prints) and keeps it as a
//!   file under the target's temporary folder.
//!
//! The property: each mutant is refused with a typed error, or loads and runs a step. A panic
//! fails the test naming the mutant's seed; an allocation past [`CAP`] (one allocation or the
//! live total) aborts the process naming it.
#![allow(dead_code, unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

/// Default seconds per target: all targets together stay within about two minutes of CI.
pub const DEFAULT_SECONDS: u64 = 20;
/// The most memory the test process may hold (one allocation or all live ones together).
pub const CAP: usize = 1 << 30;

/// The global allocator of a fuzz test binary: the system's, counting live bytes, aborting
/// with the current mutant's seed past [`CAP`].
pub struct CappedAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
/// The mutant being run (`u64::MAX`: none).
static MUTANT: AtomicU64 = AtomicU64::new(u64::MAX);

impl CappedAlloc {
    fn admit(&self, size: usize) {
        let live = LIVE.load(Ordering::Relaxed);
        if size > CAP || live.saturating_add(size) > CAP {
            // No allocation from here on: fixed strings and integers only.
            let mut err = std::io::stderr().lock();
            let _ = writeln!(
                err,
                "\nfuzz: allocation of {size} bytes with {live} live exceeds the cap of {CAP}: an unbounded \
                 allocation, mutant seed {} (VLLM_FUZZ_ONE=<seed> replays it)",
                MUTANT.load(Ordering::Relaxed)
            );
            std::process::abort();
        }
    }
}

// SAFETY: every call is forwarded to the system allocator with the caller's own arguments;
// the counters only observe sizes.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.admit(layout.size());
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.admit(layout.size());
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.admit(new_size.saturating_sub(layout.size()));
        if new_size > CAP {
            self.admit(new_size);
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

/// What became of a mutant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Refused with a typed error.
    Refused,
    /// Loaded, and a step ran.
    Served,
    /// Loaded, and the step returned an error (the engine's warm-up step refuses such a model
    /// at start).
    StepFailed,
}

/// The repository's root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The seed files of a target: `fixtures/fuzz/<target>/**` files, sorted, by path.
pub fn corpus(target: &str) -> Vec<PathBuf> {
    fn walk(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join("fixtures/fuzz").join(target), &mut out);
    out.sort();
    out
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v}: not a number")))
}

/// Runs `case` on mutants until the time budget ends (or on the one `VLLM_FUZZ_ONE` names);
/// `case` gets the mutant's seed and its generator. Fails on the first panic, naming the
/// seed; returns how many mutants ended each way.
pub fn run(target: &str, mut case: impl FnMut(u64, &mut ChaCha8Rng) -> Outcome) -> [usize; 3] {
    let seconds = env_u64("VLLM_FUZZ_SECONDS").unwrap_or(DEFAULT_SECONDS);
    let base = env_u64("VLLM_FUZZ_SEED").unwrap_or(0);
    let one = env_u64("VLLM_FUZZ_ONE");
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut counts = [0usize; 3];
    for i in 0u64.. {
        let seed = match one {
            Some(s) if i == 0 => s,
            Some(_) => break,
            None if Instant::now() >= deadline => break,
            None => base.wrapping_add(i),
        };
        MUTANT.store(seed, Ordering::Relaxed);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        match catch_unwind(AssertUnwindSafe(|| case(seed, &mut rng))) {
            Ok(outcome) => counts[outcome as usize] += 1,
            Err(_) => panic!(
                "fuzz {target}: mutant {seed} panicked (see the message above); replay it with \
                 VLLM_FUZZ_ONE={seed} cargo test --release --test <this file> {target}"
            ),
        }
    }
    MUTANT.store(u64::MAX, Ordering::Relaxed);
    eprintln!(
        "fuzz {target}: {} mutants in {seconds} s from seed {base}: {} refused, {} served, {} failed their step",
        counts.iter().sum::<usize>(),
        counts[0],
        counts[1],
        counts[2]
    );
    counts
}

/// Where `VLLM_FUZZ_ONE` keeps the replayed mutant (else a throwaway folder).
pub fn work_dir(target: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-{target}"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Integers a hostile file would use: the edges of each width, powers of two around them,
/// and the field's own value nudged.
pub fn interesting(rng: &mut ChaCha8Rng, current: u64) -> u64 {
    const EDGES: &[u64] = &[
        0,
        1,
        2,
        3,
        7,
        8,
        31,
        32,
        255,
        256,
        4096,
        65535,
        65536,
        (1 << 24) + 1,
        i32::MAX as u64,
        1 << 31,
        u32::MAX as u64,
        1 << 32,
        1 << 33,
        1 << 40,
        1 << 62,
        i64::MAX as u64,
        1 << 63,
        u64::MAX,
    ];
    match rng.random_range(0..4) {
        0 => current.wrapping_add(1),
        1 => current.wrapping_sub(1),
        2 => current.wrapping_mul(2),
        _ => EDGES[rng.random_range(0..EDGES.len())],
    }
}

/// A few random bytes of `data[range]` replaced.
pub fn flip_bytes(rng: &mut ChaCha8Rng, data: &mut [u8], range: std::ops::Range<usize>) {
    if range.is_empty() {
        return;
    }
    for _ in 0..rng.random_range(1..=4) {
        let at = rng.random_range(range.clone());
        data[at] = rng.random();
    }
}

/// Every number, string and boolean of a JSON value, by path.
fn leaves(v: &Value, path: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                path.push(Value::String(k.clone()));
                leaves(x, path, out);
                path.pop();
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                path.push(Value::from(i));
                leaves(x, path, out);
                path.pop();
            }
        }
        _ => out.push(path.clone()),
    }
}

fn at<'a>(v: &'a mut Value, path: &[Value]) -> &'a mut Value {
    path.iter().fold(v, |v, k| match k {
        Value::String(k) => &mut v[k.as_str()],
        k => &mut v[k.as_u64().unwrap() as usize],
    })
}

/// A JSON document mutated: a leaf replaced by an interesting number (also negative, float
/// or out of range) or another type, or removed; or its text flipped or cut.
pub fn mutate_json(rng: &mut ChaCha8Rng, text: &[u8]) -> Vec<u8> {
    let Ok(mut v) = serde_json::from_slice::<Value>(text) else { return text.to_vec() };
    for _ in 0..rng.random_range(1..=3) {
        let mut paths = Vec::new();
        leaves(&v, &mut Vec::new(), &mut paths);
        if paths.is_empty() {
            break;
        }
        let path = &paths[rng.random_range(0..paths.len())];
        if let (0, Some((Value::String(key), parent))) = (rng.random_range(0..5), path.split_last()) {
            if let Value::Object(m) = at(&mut v, parent) {
                m.remove(key);
                continue;
            }
        }
        let leaf = at(&mut v, path);
        let current = leaf.as_u64().unwrap_or(1);
        *leaf = match rng.random_range(0..10) {
            0..=5 => Value::from(interesting(rng, current)),
            6 => Value::from(-(interesting(rng, current) as i64)),
            7 => Value::from([0.5, -1.0, 1e30, 1e-30, 0.0][rng.random_range(0..5)]),
            _ => {
                [Value::Null, Value::from("x"), Value::from(true), Value::Array(vec![])][rng.random_range(0..4)].clone()
            }
        };
    }
    let mut out = serde_json::to_vec_pretty(&v).unwrap();
    match rng.random_range(0..10) {
        0 => {
            let len = out.len();
            flip_bytes(rng, &mut out, 0..len);
        }
        1 => out.truncate(rng.random_range(0..out.len())),
        _ => {}
    }
    out
}
