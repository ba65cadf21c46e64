//! Helpers shared by the benchmarks.

use std::path::PathBuf;

/// The value of environment variable `key` parsed as `T`, or `default` when unset or unparsable.
pub fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `q` quantile (0..=1, nearest rank) of `v`; NaN for an empty slice.
pub fn pct(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1]
}

/// The CPU model and the flags that choose tract's kernels, e.g. `Intel(R) Xeon(R) Processor
/// [avx2 fma avx512f avx512_vnni]`.
pub fn cpu() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |k: &str| {
        info.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = field("flags");
    let picked: Vec<&str> = flags
        .split_whitespace()
        .filter(|f| {
            [
                "avx2",
                "fma",
                "avx512f",
                "avx512_vnni",
                "avx_vnni",
                "avx512_fp16",
                "amx_int8",
            ]
            .contains(f)
        })
        .collect();
    format!("{} [{}]", field("model name"), picked.join(" "))
}
