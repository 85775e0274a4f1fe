//! The `engine` command line. Every failure is one line on stderr and a non-zero exit.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            cli::print_error("", &e);
            ExitCode::FAILURE
        }
    }
}
