//! A coverage-free fuzzing loop that runs on stable Rust (issue #16): each input is a seed
//! file mutated byte-wise, an input the target builds from the `arbitrary` crate's
//! `Unstructured` (structure-aware: JSON edits, forged headers), or both. Every run is
//! checked for a panic, for taking more than a second, and for asking the allocator for more
//! than 1 GiB at once ([`CountingAlloc`], installed by the binaries that include this file).
//!
//! Shared by `examples/fuzz/main.rs` (long runs, `scripts/fuzz.sh`) and `tests/fuzz_smoke.rs`
//! (a few thousand inputs per target in `cargo test`).
#![allow(dead_code)]

use arbitrary::Unstructured;
use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Largest single allocation an input may cause.
pub const ALLOC_LIMIT: usize = 1 << 30;
/// Longest an input may run.
pub const TIME_LIMIT: Duration = Duration::from_secs(1);

/// The system allocator, counting live bytes and their peak, and refusing (returning null for)
/// any single request over [`ALLOC_LIMIT`], which it records so the loop can report the input.
pub struct CountingAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static OVER_LIMIT: AtomicUsize = AtomicUsize::new(0);
static ARMED: AtomicBool = AtomicBool::new(false);

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !self.admit(layout.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !self.admit(layout.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !self.admit(new_size) {
            return std::ptr::null_mut();
        }
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

impl CountingAlloc {
    fn admit(&self, size: usize) -> bool {
        if size > ALLOC_LIMIT && ARMED.load(Ordering::Relaxed) {
            OVER_LIMIT.store(size, Ordering::Relaxed);
            // The null return aborts the process (`handle_alloc_error`); say why first,
            // without allocating.
            let msg = b"fuzz: an input asked for more than 1 GiB in one allocation\n";
            unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
            return false;
        }
        let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
        PEAK.fetch_max(live, Ordering::Relaxed);
        true
    }
}

/// A small, fast, reproducible generator (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Integers that find off-by-one, overflow and sign bugs, as little-endian u64.
const INTERESTING: [u64; 14] = [
    0,
    1,
    2,
    7,
    8,
    255,
    256,
    65_535,
    1 << 31,
    u32::MAX as u64,
    1 << 32,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
];

/// Applies 1 to 8 random byte-level mutations; half of the positions fall in the first 4 KiB,
/// where the headers of every format here live.
pub fn mutate(data: &mut Vec<u8>, rng: &mut Rng) {
    for _ in 0..1 + rng.below(8) {
        let len = data.len();
        let pos = |rng: &mut Rng| match len {
            0 => 0,
            _ if rng.below(2) == 0 => rng.below(len.min(4096)),
            _ => rng.below(len),
        };
        match rng.below(8) {
            0 if len > 0 => {
                let p = pos(rng);
                data[p] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let p = pos(rng);
                data[p] = rng.next() as u8;
            }
            2 => {
                let p = pos(rng);
                let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let n = [1, 2, 4, 8][rng.below(4)];
                for (i, b) in v.iter().take(n).enumerate() {
                    if let Some(slot) = data.get_mut(p + i) {
                        *slot = *b;
                    }
                }
            }
            3 => {
                let p = pos(rng);
                let n = 1 + rng.below(16);
                let bytes = rng.bytes(n);
                data.splice(p..p, bytes);
            }
            4 if len > 0 => {
                let p = pos(rng);
                let end = (p + 1 + rng.below(64)).min(len);
                data.drain(p..end);
            }
            5 if len > 0 => data.truncate(rng.below(len)),
            6 if len > 0 => {
                // Copy a chunk of the input over another place (repeats fields and tokens).
                let (from, to) = (pos(rng), pos(rng));
                let n = (1 + rng.below(32)).min(len - from);
                let chunk = data[from..from + n].to_vec();
                data.splice(to..to, chunk);
            }
            _ => {
                // An ASCII digit run: numbers in JSON and TOML text.
                let p = pos(rng);
                let digits = INTERESTING[rng.below(INTERESTING.len())].to_string();
                data.splice(p..p, digits.into_bytes());
            }
        }
    }
}

/// Replaces one random leaf of a JSON value (or an object entry, or an array element) with an
/// awkward value: the structure-aware edit of graphs, metadata and tensor tables.
pub fn mutate_json(value: &mut serde_json::Value, u: &mut Unstructured<'_>) {
    let depth = u.int_in_range(0..=6u8).unwrap_or(0);
    mutate_json_at(value, depth, u);
}

/// Descends `depth` levels through random children (or less, at a leaf), then edits there.
fn mutate_json_at(node: &mut serde_json::Value, depth: u8, u: &mut Unstructured<'_>) {
    use serde_json::Value;
    if depth > 0 {
        match node {
            Value::Array(a) if !a.is_empty() => {
                let i = u.choose_index(a.len()).unwrap_or(0);
                return mutate_json_at(&mut a[i], depth - 1, u);
            }
            Value::Object(o) if !o.is_empty() => {
                let i = u.choose_index(o.len()).unwrap_or(0);
                let child = o.values_mut().nth(i).expect("index in range");
                return mutate_json_at(child, depth - 1, u);
            }
            _ => {}
        }
    }
    let choice = u.int_in_range(0..=9u8).unwrap_or(0);
    match (choice, &mut *node) {
        (0, Value::Array(a)) if !a.is_empty() => {
            let i = u.choose_index(a.len()).unwrap_or(0);
            a.remove(i);
        }
        (1, Value::Array(a)) if !a.is_empty() => {
            let i = u.choose_index(a.len()).unwrap_or(0);
            let copy = a[i].clone();
            a.push(copy);
        }
        (2, Value::Object(o)) if !o.is_empty() => {
            let i = u.choose_index(o.len()).unwrap_or(0);
            let key = o.keys().nth(i).expect("index in range").clone();
            o.remove(&key);
        }
        _ => {
            *node = match u.int_in_range(0..=7u8).unwrap_or(0) {
                0 => Value::from(INTERESTING[u.choose_index(INTERESTING.len()).unwrap_or(0)]),
                1 => Value::from(u.arbitrary::<i64>().unwrap_or(-1)),
                2 => Value::from(u.arbitrary::<f64>().unwrap_or(1e308)),
                3 => Value::from(u.arbitrary::<String>().unwrap_or_default()),
                4 => Value::Null,
                5 => Value::Array(vec![Value::from(u.arbitrary::<u32>().unwrap_or(0)); 2]),
                6 => Value::from(u.arbitrary::<bool>().unwrap_or(true)),
                _ => Value::Object(Default::default()),
            }
        }
    }
}

/// A structure-aware generator: an input built from a seed and fuzzer-chosen data, `None`
/// when the seed does not suit it.
pub type Generator = fn(&[u8], &mut Unstructured<'_>) -> Option<Vec<u8>>;

/// A fuzz target: its seeds, an optional structure-aware generator, and the code under test,
/// which must return (an `Err` is a refused input, which is fine) and never panic.
pub struct Target {
    pub name: &'static str,
    pub seeds: Vec<Vec<u8>>,
    pub generate: Option<Generator>,
    pub run: fn(&[u8]) -> anyhow::Result<()>,
}

/// What went wrong with one input.
pub enum Failure {
    Panic(String),
    Slow(Duration),
}

/// Figures of a finished run.
#[derive(Debug, Default)]
pub struct Outcome {
    pub execs: u64,
    pub accepted: u64,
    pub slowest: Duration,
    /// The largest rise of live heap bytes during one input.
    pub peak_bytes: usize,
}

/// Runs `target` on fresh inputs until `stop` says so (given the executions and the elapsed
/// time); the first failure comes back with its input.
pub fn run(
    target: &Target,
    seed: u64,
    mut stop: impl FnMut(u64, Duration) -> bool,
) -> Result<Outcome, (Failure, Vec<u8>)> {
    let mut rng = Rng::new(seed);
    let mut outcome = Outcome::default();
    let started = Instant::now();
    // Panics are expected to be caught and reported once, not printed per input.
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    ARMED.store(true, Ordering::Relaxed);
    let result = loop {
        if stop(outcome.execs, started.elapsed()) {
            break Ok(());
        }
        let input = next_input(target, &mut rng);
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let t = Instant::now();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| (target.run)(&input)));
        let took = t.elapsed();
        outcome.execs += 1;
        outcome.slowest = outcome.slowest.max(took);
        outcome.peak_bytes = outcome
            .peak_bytes
            .max(PEAK.load(Ordering::Relaxed).saturating_sub(base));
        match result {
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                break Err((Failure::Panic(msg), input));
            }
            Ok(_) if took > TIME_LIMIT => break Err((Failure::Slow(took), input)),
            Ok(Ok(())) => outcome.accepted += 1,
            Ok(Err(_)) => {}
        }
    };
    ARMED.store(false, Ordering::Relaxed);
    std::panic::set_hook(previous_hook);
    result.map(|()| outcome)
}

fn next_input(target: &Target, rng: &mut Rng) -> Vec<u8> {
    let seed = &target.seeds[rng.below(target.seeds.len())];
    let generated = target.generate.and_then(|generate| {
        if rng.below(2) == 0 {
            return None;
        }
        let n = 64 + rng.below(512);
        let entropy = rng.bytes(n);
        generate(seed, &mut Unstructured::new(&entropy))
    });
    let structured = generated.is_some();
    let mut input = generated.unwrap_or_else(|| seed.clone());
    if !structured || rng.below(4) == 0 {
        mutate(&mut input, rng);
    }
    input
}

impl Failure {
    pub fn describe(&self) -> String {
        match self {
            Failure::Panic(msg) => format!("panicked: {msg}"),
            Failure::Slow(d) => format!("took {d:?}, over the {TIME_LIMIT:?} limit"),
        }
    }
}
