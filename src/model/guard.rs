//! A boundary around tract: a panic inside it becomes a [`ModelError::Internal`] naming the
//! model, instead of taking the process down.
//!
//! tract trusts some ONNX attributes it does not check (a Transpose permutation, a zero stride,
//! an empty `pads`), and panics on them. A model or adapter file is input, so every entry into
//! tract goes through [`guard`]. This needs `panic = "unwind"` in every profile that ships
//! (`Cargo.toml`). While any guard is active, the panic hook records the message instead of
//! printing it, so the caller reports one line; panics elsewhere print as usual.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::ModelError;

/// Guards running now, on any thread (tract's pool threads panic on behalf of a caller).
static ACTIVE: AtomicUsize = AtomicUsize::new(0);
/// The last message recorded by the hook while a guard was active.
static CAUGHT: Mutex<Option<String>> = Mutex::new(None);

/// The message a panic was raised with (`panic!` carries a `&str` or a `String`).
fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn install_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if ACTIVE.load(Ordering::SeqCst) == 0 {
                return previous(info);
            }
            let payload = payload_text(info.payload());
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            if let Ok(mut c) = CAUGHT.lock() {
                *c = Some(format!("{payload}{at}"));
            }
        }));
    });
}

/// Runs `f`; a panic inside it (on this thread or on a thread of tract's pool working for it)
/// is returned as [`ModelError::Internal`] for the model at `path`.
pub(super) fn guard<R>(
    path: &Path,
    f: impl FnOnce() -> Result<R, ModelError>,
) -> Result<R, ModelError> {
    install_hook();
    ACTIVE.fetch_add(1, Ordering::SeqCst);
    let result = catch_unwind(AssertUnwindSafe(f));
    ACTIVE.fetch_sub(1, Ordering::SeqCst);
    result.unwrap_or_else(|payload| {
        let recorded = CAUGHT.lock().ok().and_then(|mut c| c.take());
        let reason = recorded.unwrap_or_else(|| payload_text(&*payload));
        Err(ModelError::Internal {
            path: path.to_path_buf(),
            reason,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_naming_the_model_and_the_site() {
        let r: Result<(), _> = guard(Path::new("m.onnx"), || {
            let v: Vec<usize> = Vec::new();
            let i = v.len() + 4;
            let _ = v[i];
            Ok(())
        });
        let e = r.unwrap_err().to_string();
        assert!(
            e.starts_with("m.onnx: tract failed on this model (internal error: "),
            "{e}"
        );
        assert!(
            e.contains("index out of bounds") && e.contains("guard.rs"),
            "{e}"
        );
        assert_eq!(guard(Path::new("m.onnx"), || Ok(3)).unwrap(), 3);
    }
}
