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
