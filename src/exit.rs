//! Process exit codes, chosen so a service manager can tell "fix the input" from "retry".

/// Everything succeeded.
pub const OK: u8 = 0;
/// A runtime failure that may succeed on retry (I/O error writing output, inference failure).
pub const FAILURE: u8 = 1;
/// Bad input: unusable model, image, labels or arguments. Retrying will not help.
pub const BAD_INPUT: u8 = 2;
/// The service configuration (or a model or source it names) is unusable (sysexits
/// `EX_CONFIG`). The systemd unit lists it in `RestartPreventExitStatus`.
pub const CONFIG: u8 = 78;

/// An error and its causes as one line, skipping causes whose text the line already holds
/// (library errors embed their source's message) and folding multi-line third-party messages.
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut next = Some(e);
    while let Some(cause) = next {
        next = cause.source();
        let text = cause
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}
