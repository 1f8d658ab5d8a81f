//! The `slimcandle` command: a thin layer over the library (`slimcandle::cli`).

use slimcandle::cli;

/// mimalloc, told to keep freed pages: with glibc (or a purging mimalloc) every large
/// activation of every training step is freshly mapped and zeroed by the kernel, which costs
/// 1.5-3x on a small machine. The price is that the process keeps its peak memory.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 2.x's option enum; -1 disables purging.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`slimcandle inspect m.safetensors | head`) like other
    // Unix tools, instead of panicking on the failed write.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // SAFETY: sets a process-wide allocator option; valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let args = cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => cli::exit::report(&e),
    }
}
