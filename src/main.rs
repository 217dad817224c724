//! The `outboxd` binary: parse the command line, run the subcommand, map errors to exit
//! codes (0 ok, 78 configuration, 1 other).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = outboxd::cli::Cli::parse();
    match outboxd::cli::execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.exit_code();
            eprintln!("outboxd: {:#}", anyhow::Error::new(e));
            ExitCode::from(code)
        }
    }
}
