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
        Err(e) if !e.use_stderr() => {
            // --help, --version: their text on stdout.
            let _ = e.print();
            return ExitCode::from(perch::exit::OK);
        }
        Err(e) => {
            let line = one_line_usage_error(&e.render().to_string(), &subcommand_path());
            eprintln!("perch: error: {line}");
            return ExitCode::from(perch::exit::BAD_INPUT);
        }
    };
    ExitCode::from(cli::run(args))
}

/// `perch` and the subcommands named at the start of the command line (`perch adapter merge`).
fn subcommand_path() -> String {
    let mut cmd = <cli::Cli as clap::CommandFactory>::command();
    let mut path = vec!["perch".to_string()];
    for arg in std::env::args().skip(1) {
        let Some(sub) = cmd.find_subcommand(&arg).cloned() else {
            break;
        };
        path.push(arg);
        cmd = sub;
    }
    path.join(" ")
}

/// clap's usage error as one line: its message with the arguments it lists, and where to read
/// more (`perch detect --help`; `command` where clap prints no usage), without the usage block
/// and tips.
fn one_line_usage_error(rendered: &str, command: &str) -> String {
    let mut lines = rendered.lines();
    let first = lines.next().unwrap_or_default();
    let mut line = first.strip_prefix("error: ").unwrap_or(first).to_string();
    let mut command = command.to_string();
    let mut listing = true;
    for l in lines {
        if l.trim().is_empty() {
            listing = false;
        } else if listing && l.starts_with("  ") {
            line.push_str(if line.ends_with(':') { " " } else { ", " });
            line.push_str(l.trim());
        } else if let Some(usage) = l.strip_prefix("Usage: ") {
            command = usage
                .split_whitespace()
                .take_while(|w| !w.starts_with(['[', '<', '-']))
                .collect::<Vec<_>>()
                .join(" ");
        }
    }
    format!("{line} (see '{command} --help')")
}

#[cfg(test)]
mod tests {
    use super::one_line_usage_error;

    #[test]
    fn usage_errors_fold_into_one_line() {
        let rendered = "error: the following required arguments were not provided:\n  --model <M.onnx>\n  <IMAGE_OR_DIR>...\n\nUsage: perch detect --model <M.onnx> <IMAGE_OR_DIR>...\n\nFor more information, try '--help'.\n";
        assert_eq!(
            one_line_usage_error(rendered, "perch detect"),
            "the following required arguments were not provided: --model <M.onnx>, \
             <IMAGE_OR_DIR>... (see 'perch detect --help')"
        );
        let rendered = "error: unexpected argument '--bogus' found\n\n  tip: to pass '--bogus' as a value, use '-- --bogus'\n\nUsage: perch adapter merge [OPTIONS] --model <M.onnx>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            one_line_usage_error(rendered, "perch"),
            "unexpected argument '--bogus' found (see 'perch adapter merge --help')"
        );
    }
}
