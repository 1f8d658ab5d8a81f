//! The smoke pass of every fuzz target (issue #16): a few hundred to a few thousand inputs
//! each, mutated seeds and structure-aware edits, none of which may panic, take over 1 s or
//! ask for more than 1 GiB at once. `scripts/fuzz.sh TARGET SECONDS` runs the long version.

#[path = "../examples/fuzz/engine.rs"]
mod engine;
#[path = "../examples/fuzz/targets.rs"]
mod targets;

use std::time::Duration;

#[global_allocator]
static ALLOC: engine::CountingAlloc = engine::CountingAlloc;

/// Runs `name` for `execs` inputs (or 20 s, whichever comes first) and checks the outcome.
fn smoke(name: &str, execs: u64) {
    let target = targets::target(name).expect("a known target");
    assert!(!target.seeds.is_empty(), "{name} has seeds");
    // Every seed is a valid input except the deliberately truncated ones, so the seeds
    // exercise the readers' success paths too.
    let accepted = target
        .seeds
        .iter()
        .filter(|s| (target.run)(s).is_ok())
        .count();
    assert!(accepted > 0, "{name}: no seed is accepted");
    let outcome = engine::run(&target, 16, |n, t| {
        n >= execs || t > Duration::from_secs(20)
    })
    .unwrap_or_else(|(failure, input)| {
        let path = std::env::temp_dir().join(format!("fuzz-smoke-{name}.bin"));
        std::fs::write(&path, &input).unwrap();
        panic!(
            "{name}: an input {} (saved to {})",
            failure.describe(),
            path.display()
        )
    });
    eprintln!("{name}: {outcome:?}");
    assert!(
        outcome.execs >= execs.min(200),
        "{name}: only {} inputs",
        outcome.execs
    );
    assert!(
        outcome.accepted < outcome.execs,
        "{name}: mutations are never refused"
    );
}

#[test]
fn fuzz_smoke_tensor_file() {
    smoke("tensor-file", 1000);
}

#[test]
fn fuzz_smoke_checkpoint() {
    smoke("checkpoint", 1000);
}

#[test]
fn fuzz_smoke_graph() {
    smoke("graph", 3000);
}

#[test]
fn fuzz_smoke_recipe() {
    smoke("recipe", 3000);
}

#[test]
fn fuzz_smoke_cifar() {
    smoke("cifar", 3000);
}

#[test]
fn fuzz_smoke_idx() {
    smoke("idx", 3000);
}

#[test]
fn fuzz_smoke_image() {
    smoke("image", 3000);
}

#[test]
fn every_target_has_seeds_and_a_smoke_pass() {
    let tests = include_str!("fuzz_smoke.rs");
    for name in targets::NAMES {
        assert!(targets::target(name).is_some(), "{name}");
        assert!(
            tests.contains(&format!("smoke(\"{name}\"")),
            "{name} has no smoke test"
        );
    }
}
