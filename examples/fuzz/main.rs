//! Long fuzz runs of one target: `cargo run --release --example fuzz -- TARGET SECONDS [SEED]`
//! (or `scripts/fuzz.sh TARGET SECONDS`); `fuzz TARGET --replay FILE` reruns one input. Prints the executions reached; exits 1 with the
//! failing input saved under `target/fuzz-failures/` on a panic or an input slower than 1 s,
//! and aborts (with a message) on an allocation over 1 GiB. Targets: see `targets::NAMES`.

mod engine;
mod targets;

use std::time::Duration;

#[global_allocator]
static ALLOC: engine::CountingAlloc = engine::CountingAlloc;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || {
        eprintln!(
            "usage: fuzz TARGET SECONDS [SEED]\ntargets: {}",
            targets::NAMES.join(", ")
        );
        std::process::exit(2)
    };
    let (Some(name), Some(seconds)) = (args.first(), args.get(1)) else {
        usage()
    };
    // `fuzz TARGET --replay FILE`: runs one saved input, timed, with its verdict.
    if seconds == "--replay" {
        let (Some(target), Some(file)) = (targets::target(name), args.get(2)) else {
            usage()
        };
        let input = std::fs::read(file).unwrap_or_else(|e| {
            eprintln!("cannot read `{file}`: {e}");
            std::process::exit(1)
        });
        let t = std::time::Instant::now();
        let verdict = (target.run)(&input);
        println!(
            "{name}: {:?} in {:.1?}",
            verdict.map_err(|e| format!("{e:#}")),
            t.elapsed()
        );
        return;
    }
    let Ok(seconds) = seconds.parse::<f64>() else {
        usage()
    };
    let seed = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let Some(target) = targets::target(name) else {
        usage()
    };
    let budget = Duration::from_secs_f64(seconds);
    let report_every = Duration::from_secs(60);
    let mut next_report = report_every;
    let result = engine::run(&target, seed, |execs, elapsed| {
        if elapsed >= next_report {
            eprintln!("{name}: {execs} executions in {elapsed:.0?}");
            next_report += report_every;
        }
        elapsed >= budget
    });
    match result {
        Ok(o) => println!(
            "{name}: {} executions in {seconds} s (seed {seed}), {} accepted, no panic, slowest input {:.1?}, largest heap rise {:.1} MiB",
            o.execs,
            o.accepted,
            o.slowest,
            o.peak_bytes as f64 / (1 << 20) as f64
        ),
        Err((failure, input)) => {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("{name}-seed{seed}.bin"));
            let saved = std::fs::write(&path, &input).is_ok();
            eprintln!(
                "{name}: an input {} (saved: {})",
                failure.describe(),
                if saved {
                    path.display().to_string()
                } else {
                    "no".to_string()
                }
            );
            std::process::exit(1);
        }
    }
}
