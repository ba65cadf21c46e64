//! The `perch` command line: parses arguments into validated settings, runs, maps errors to
//! exit codes (see `perch::exit`).

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    let args = match cli::Cli::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() {
                perch::exit::BAD_INPUT
            } else {
                perch::exit::OK
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    ExitCode::from(cli::run(args))
}
