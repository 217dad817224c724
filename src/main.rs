//! The `outboxd` binary: parse the command line, run the subcommand, map errors to exit
//! codes (0 ok, 78 configuration, 64 usage, 69 unavailable, 70 a part of the daemon died,
//! 1 other).

use std::process::ExitCode;

use clap::Parser;

/// jemalloc for the whole process: it also replaces `malloc` for librdkafka and the other C
/// code linked in. Rows, messages and headers are allocated on the runtime's threads and
/// freed on librdkafka's; glibc's allocator spent about a quarter of a drain's instructions
/// on that pattern (BENCHMARKS.md).
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings (the environment variable `MALLOC_CONF` overrides them): freed pages
/// go back to the system after about a second instead of ten, which kept the consumer's
/// peak resident memory with an `http` handler near glibc's (BENCHMARKS.md).
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[allow(non_upper_case_globals)]
#[export_name = "malloc_conf"]
pub static malloc_conf: &[u8; 37] = b"dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> ExitCode {
    let cli = outboxd::cli::Cli::parse();
    match outboxd::cli::execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.exit_code();
            let text = format!("outboxd: {}", outboxd::error_text::describe(&e));
            eprintln!("{}", outboxd::secrets::scrub(&text));
            ExitCode::from(code)
        }
    }
}
