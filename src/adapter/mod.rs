//! Adapters: small files of weight changes merged into a frozen base model at load time.
//!
//! An adapter is one `.safetensors` file. Its `__metadata__` holds, under the key
//! [`METADATA_KEY`], a versioned JSON [`AdapterHeader`]: format and version, the base model's
//! weight fingerprint, and one [`Target`] per changed base initializer. Tensors are named
//! `<target>.lora_A` (`[r, in*kh*kw]`), `<target>.lora_B` (`[out, r]`), optionally
//! `<target>.channel_scale` (`[out]`, for LoRA trained before BatchNorm folding), or
//! `<target>.replace` (the full new tensor). Stored as f16 (default) or f32; merged in f32.
//!
//! Loading validates everything before any model is touched; merging ([`merge::apply`]) checks
//! the adapter against the base and never changes the base itself.

pub mod diff;
pub mod merge;
pub mod peft;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::tensor::NamedTensor;

/// Format name in the header.
pub const FORMAT: &str = "perch-adapter";
/// Current header version; files with another version are refused.
pub const VERSION: u32 = 1;
/// Key of the JSON header inside the safetensors `__metadata__`.
pub const METADATA_KEY: &str = "perch.adapter";
/// Largest adapter file accepted (bytes).
pub const MAX_FILE_BYTES: u64 = 256 << 20;
/// Largest safetensors JSON header accepted (bytes).
pub const MAX_HEADER_BYTES: u64 = 4 << 20;

/// Why an adapter was refused. Every message names the adapter file.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("adapter {}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file itself is malformed (not safetensors, bad header, bad tensors, limits).
    #[error("adapter {}: invalid: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    /// A well-formed adapter that does not fit this base model.
    #[error("adapter {}: does not fit base {}: {reason}", path.display(), base.display())]
    Mismatch {
        path: PathBuf,
        base: PathBuf,
        reason: String,
    },
    /// The base model could not provide a weight.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
}

/// What a target does to its base initializer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// `W' = W + scale * channel_scale[o] * (B @ A)`, laid out as the graph uses `W`.
    Lora,
    /// `W' = R`.
    Replace,
}

/// Longest adapter name (`AdapterHeader::name`) accepted, in characters.
pub const MAX_HEADER_NAME: usize = 128;

/// One changed base initializer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    /// ONNX initializer name in the base model.
    pub name: String,
    pub kind: TargetKind,
    /// LoRA rank (rows of A).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    /// LoRA alpha, for the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f32>,
    /// Multiplier of `B @ A` (alpha / r, or alpha / sqrt(r) for rsLoRA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f32>,
    /// Whether a per-output-channel `channel_scale` tensor is present.
    #[serde(default)]
    pub channel_scale: bool,
}

/// How tensors are stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoredDtype {
    F16,
    F32,
}

/// The versioned JSON header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterHeader {
    pub format: String,
    pub version: u32,
    /// `lora`, `replace` or `mixed`, summarising the targets.
    pub kind: String,
    /// Human name of the task (e.g. `osbs`).
    pub name: String,
    /// [`crate::model::OnnxModel::fingerprint`] of the base it was made for.
    pub base_fingerprint: String,
    pub targets: Vec<Target>,
    /// Class names replacing the base's (same count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_names: Option<Vec<String>>,
    pub producer: String,
    /// RFC 3339 UTC time of creation.
    pub created: String,
    pub dtype: StoredDtype,
    /// int8 activation ranges measured with this adapter merged (`perch calibrate
    /// --into-adapter`); used instead of the base model's calibration when it is active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<crate::model::Calibration>,
}

/// A validated adapter: header and tensors (as f32), plus the file's identity.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub header: AdapterHeader,
    tensors: HashMap<String, NamedTensor>,
    path: PathBuf,
    sha256: String,
    file_bytes: u64,
}

fn tensor_key(target: &str, part: &str) -> String {
    format!("{target}.{part}")
}

/// `kind` summary of a target list.
pub fn kind_of(targets: &[Target]) -> String {
    let lora = targets.iter().any(|t| t.kind == TargetKind::Lora);
    let replace = targets.iter().any(|t| t.kind == TargetKind::Replace);
    match (lora, replace) {
        (true, true) => "mixed",
        (true, false) => "lora",
        _ => "replace",
    }
    .to_string()
}

/// The current UTC time as RFC 3339 (seconds), without a date-time dependency.
pub fn now_rfc3339() -> String {
    rfc3339(std::time::SystemTime::now())
}

/// `t` as `YYYY-MM-DDThh:mm:ssZ` (UTC, whole seconds; the epoch for times before it).
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Decodes a safetensors tensor to f32. F32 and F16 are accepted, and BF16 when `allow_bf16`
/// (PEFT may save in the training dtype; perch's own files never use it).
pub(crate) fn tensor_from_view(
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
    allow_bf16: bool,
) -> Result<NamedTensor, String> {
    let raw = view.data();
    let data: Vec<f32> = match view.dtype() {
        Dtype::F32 => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => raw
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 if allow_bf16 => raw
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => return Err(format!("tensor '{name}' is {other:?}; expected F32 or F16")),
    };
    Ok(NamedTensor {
        name: name.to_string(),
        shape: view.shape().to_vec(),
        data,
    })
}

impl Adapter {
    /// Builds an adapter in memory (for producers); validates it like a loaded file.
    pub fn new(
        header: AdapterHeader,
        tensors: Vec<NamedTensor>,
        path: impl Into<PathBuf>,
    ) -> Result<Self, AdapterError> {
        let path = path.into();
        let tensors = tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
        let a = Adapter {
            header,
            tensors,
            path,
            sha256: String::new(),
            file_bytes: 0,
        };
        a.validate()?;
        Ok(a)
    }

    /// Reads and validates an adapter file (size limits, safetensors structure, header, tensor
    /// shapes and dtypes, finite values). Does not need the base model.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, AdapterError> {
        let path = path.as_ref();
        let io = |source| AdapterError::Io {
            path: path.to_path_buf(),
            source,
        };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_FILE_BYTES {
            return Err(AdapterError::Invalid {
                path: path.to_path_buf(),
                reason: format!("file is {len} bytes, over the {MAX_FILE_BYTES}-byte limit"),
            });
        }
        let bytes =
            crate::fsutil::read_limited(path, crate::fsutil::MAX_ADAPTER_BYTES).map_err(io)?;
        Self::from_bytes(&bytes, path)
    }

    /// Like [`Adapter::load`] from bytes in memory; `path` names it in errors.
    pub fn from_bytes(bytes: &[u8], path: impl Into<PathBuf>) -> Result<Self, AdapterError> {
        let path = path.into();
        let invalid = |reason: String| AdapterError::Invalid {
            path: path.clone(),
            reason,
        };
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(invalid(format!(
                "{} bytes, over the {MAX_FILE_BYTES}-byte limit",
                bytes.len()
            )));
        }
        let head: [u8; 8] = bytes
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| invalid("shorter than a safetensors header".into()))?;
        let n = u64::from_le_bytes(head);
        if bytes.get(8) != Some(&b'{') {
            // A safetensors file starts with its header's length and then the JSON header.
            // An ONNX ModelProto starts with field 1, `ir_version` (a small varint).
            let onnx = bytes[0] == 0x08 && (3..=16).contains(&bytes[1]);
            return Err(invalid(format!(
                "not a perch adapter: not a safetensors file{}",
                if onnx {
                    " (it looks like an ONNX model; adapters are .safetensors files)"
                } else {
                    ""
                }
            )));
        }
        if n > MAX_HEADER_BYTES {
            return Err(invalid(format!(
                "safetensors header of {n} bytes, over the {MAX_HEADER_BYTES}-byte limit"
            )));
        }
        let (_, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| invalid(format!("not a safetensors file ({e})")))?;
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| invalid(format!("not a safetensors file ({e})")))?;
        let json = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY))
            .ok_or_else(|| {
                invalid(format!(
                    "no '{METADATA_KEY}' entry in __metadata__ (not a perch adapter)"
                ))
            })?;
        let header: AdapterHeader =
            serde_json::from_str(json).map_err(|e| invalid(format!("bad header JSON: {e}")))?;
        if header.format != FORMAT {
            return Err(invalid(format!(
                "format is '{}', expected '{FORMAT}'",
                header.format
            )));
        }
        if header.version != VERSION {
            return Err(invalid(format!(
                "format version {} is not supported (this perch reads {VERSION})",
                header.version
            )));
        }
        if let Some(cal) = &header.calibration {
            cal.validate()
                .map_err(|e| invalid(format!("bad calibration: {e}")))?;
        }
        let mut tensors = HashMap::new();
        for (name, view) in st.iter() {
            let t = tensor_from_view(name, &view, false).map_err(&invalid)?;
            tensors.insert(name.to_string(), t);
        }
        let mut h = Sha256::new();
        h.update(bytes);
        let sha256 = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        let a = Adapter {
            header,
            tensors,
            path,
            sha256,
            file_bytes: bytes.len() as u64,
        };
        a.validate()?;
        Ok(a)
    }

    /// Structural checks shared by loading and building.
    fn validate(&self) -> Result<(), AdapterError> {
        let invalid = |reason: String| AdapterError::Invalid {
            path: self.path.clone(),
            reason,
        };
        if self.header.targets.is_empty() {
            return Err(invalid("no targets".into()));
        }
        // The name travels in every detection record: keep it short and printable.
        let name = &self.header.name;
        if name.chars().count() > MAX_HEADER_NAME || name.chars().any(char::is_control) {
            return Err(invalid(format!(
                "name must be at most {MAX_HEADER_NAME} printable characters (got {} characters)",
                name.chars().count()
            )));
        }
        if let Some(names) = &self.header.class_names
            && (names.is_empty() || names.iter().any(|n| n.trim().is_empty()))
        {
            return Err(invalid("class_names must be non-empty strings".into()));
        }
        let mut expected: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut seen = std::collections::HashSet::new();
        for t in &self.header.targets {
            if !seen.insert(t.name.as_str()) {
                return Err(invalid(format!("target '{}' listed twice", t.name)));
            }
            let get = |part: &str| {
                let key = tensor_key(&t.name, part);
                self.tensors
                    .get(&key)
                    .ok_or_else(|| invalid(format!("target '{}' has no tensor '{key}'", t.name)))
            };
            match t.kind {
                TargetKind::Replace => {
                    let r = get("replace")?;
                    expected.insert(r.name.clone(), r.shape.clone());
                }
                TargetKind::Lora => {
                    let (a, b) = (get("lora_A")?, get("lora_B")?);
                    let rank = t
                        .rank
                        .ok_or_else(|| invalid(format!("LoRA target '{}' has no rank", t.name)))?;
                    let scale = t
                        .scale
                        .ok_or_else(|| invalid(format!("LoRA target '{}' has no scale", t.name)))?;
                    if !scale.is_finite() {
                        return Err(invalid(format!(
                            "LoRA target '{}' has scale {scale}",
                            t.name
                        )));
                    }
                    let [ra, cols] = a.shape[..] else {
                        return Err(invalid(format!(
                            "'{}' has shape {:?}, expected [r, in]",
                            a.name, a.shape
                        )));
                    };
                    let [out, rb] = b.shape[..] else {
                        return Err(invalid(format!(
                            "'{}' has shape {:?}, expected [out, r]",
                            b.name, b.shape
                        )));
                    };
                    if ra != rank || rb != rank || rank == 0 || cols == 0 || out == 0 {
                        return Err(invalid(format!(
                            "target '{}': A {:?} and B {:?} do not agree with rank {rank}",
                            t.name, a.shape, b.shape
                        )));
                    }
                    expected.insert(a.name.clone(), a.shape.clone());
                    expected.insert(b.name.clone(), b.shape.clone());
                    if t.channel_scale {
                        let c = get("channel_scale")?;
                        if c.shape != [out] {
                            return Err(invalid(format!(
                                "'{}' has shape {:?}, expected [{out}]",
                                c.name, c.shape
                            )));
                        }
                        expected.insert(c.name.clone(), c.shape.clone());
                    }
                }
            }
        }
        for (name, t) in &self.tensors {
            if !expected.contains_key(name) {
                return Err(invalid(format!("tensor '{name}' belongs to no target")));
            }
            if t.data.len() != t.numel() {
                return Err(invalid(format!(
                    "tensor '{name}' has {} values for shape {:?}",
                    t.data.len(),
                    t.shape
                )));
            }
            if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
                return Err(invalid(format!(
                    "tensor '{name}' has a non-finite value ({}) at index {i}",
                    t.data[i]
                )));
            }
        }
        Ok(())
    }

    /// The tensor `<target>.<part>` (`lora_A`, `lora_B`, `channel_scale`, `replace`).
    pub fn tensor(&self, target: &str, part: &str) -> Option<&NamedTensor> {
        self.tensors.get(&tensor_key(target, part))
    }

    /// The file this adapter came from (or will be written to).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// sha256 of the file bytes (empty for an adapter built in memory and not yet saved).
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Size of the file in bytes (0 if built in memory).
    pub fn file_bytes(&self) -> u64 {
        self.file_bytes
    }

    /// Number of stored parameters.
    pub fn num_params(&self) -> usize {
        self.tensors.values().map(NamedTensor::numel).sum()
    }

    /// Serialises to safetensors bytes with tensors stored as `dtype`.
    pub fn to_bytes(&self, dtype: StoredDtype) -> Result<Vec<u8>, AdapterError> {
        let invalid = |reason: String| AdapterError::Invalid {
            path: self.path.clone(),
            reason,
        };
        let header = AdapterHeader {
            dtype,
            ..self.header.clone()
        };
        let json = serde_json::to_string(&header).map_err(|e| invalid(e.to_string()))?;
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        let raw: Vec<(String, Vec<u8>, Vec<usize>)> = names
            .into_iter()
            .map(|n| {
                let t = &self.tensors[n];
                let bytes = match dtype {
                    StoredDtype::F32 => t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    StoredDtype::F16 => t
                        .data
                        .iter()
                        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                        .collect(),
                };
                (n.clone(), bytes, t.shape.clone())
            })
            .collect();
        let st_dtype = match dtype {
            StoredDtype::F32 => Dtype::F32,
            StoredDtype::F16 => Dtype::F16,
        };
        let views = raw
            .iter()
            .map(|(n, b, s)| {
                Ok((
                    n.as_str(),
                    safetensors::tensor::TensorView::new(st_dtype, s.clone(), b)?,
                ))
            })
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
            .map_err(|e| invalid(e.to_string()))?;
        let meta = HashMap::from([(METADATA_KEY.to_string(), json)]);
        safetensors::serialize(views, Some(meta)).map_err(|e| invalid(e.to_string()))
    }

    /// Writes the adapter atomically to `path` and returns it as loaded back from disk (so its
    /// hash and f16 rounding are those of the file).
    pub fn save(&self, path: &Path, dtype: StoredDtype) -> Result<Adapter, AdapterError> {
        if let Some(f16_overflow) = (dtype == StoredDtype::F16)
            .then(|| {
                self.tensors
                    .values()
                    .find(|t| t.data.iter().any(|v| v.abs() > 65504.0))
            })
            .flatten()
        {
            return Err(AdapterError::Invalid {
                path: path.to_path_buf(),
                reason: format!(
                    "tensor '{}' exceeds the float16 range; store it as f32",
                    f16_overflow.name
                ),
            });
        }
        let bytes = self.to_bytes(dtype)?;
        crate::fsutil::write_atomic(path, &bytes).map_err(|source| AdapterError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes, path)
    }

    /// Loads a perch adapter file, or imports a PEFT directory against `base` on the fly (the
    /// import then gets the identity of its f32 serialisation).
    pub fn load_any(path: &Path, base: &crate::model::OnnxModel) -> Result<Self, AdapterError> {
        if path.is_dir() {
            let mut imported = peft::import(path, base, &peft::ImportOptions::for_dir(path)?)?;
            // The identity (the sha256 of the converted file) must not change from run to run:
            // date it by the PEFT weights instead of the conversion.
            let weights = path.join("adapter_model.safetensors");
            if let Ok(t) = std::fs::metadata(&weights).and_then(|m| m.modified()) {
                imported.header.created = rfc3339(t);
            }
            Adapter::from_bytes(&imported.to_bytes(StoredDtype::F32)?, path)
        } else {
            Adapter::load(path)
        }
    }

    /// The record identity: name, file sha256 and the scale it is merged with.
    pub fn reference(&self, scale: f32) -> crate::report::AdapterRef {
        crate::report::AdapterRef {
            name: self.header.name.clone(),
            sha256: self.sha256.clone(),
            scale,
        }
    }

    /// `name@<first 12 hex digits of sha256>`, the identity printed in detection records.
    pub fn id(&self) -> String {
        format!(
            "{}@{}",
            self.header.name,
            &self.sha256[..self.sha256.len().min(12)]
        )
    }

    /// A JSON summary for `perch adapter inspect`.
    pub fn summary(&self) -> serde_json::Value {
        let targets: Vec<serde_json::Value> = self
            .header
            .targets
            .iter()
            .map(|t| {
                let params: usize = ["lora_A", "lora_B", "channel_scale", "replace"]
                    .iter()
                    .filter_map(|p| self.tensor(&t.name, p))
                    .map(NamedTensor::numel)
                    .sum();
                serde_json::json!({"name": t.name, "kind": t.kind, "rank": t.rank, "alpha": t.alpha,
                    "scale": t.scale, "channel_scale": t.channel_scale, "params": params})
            })
            .collect();
        serde_json::json!({
            "path": self.path.display().to_string(), "sha256": self.sha256, "bytes": self.file_bytes,
            "format": self.header.format, "version": self.header.version, "kind": self.header.kind,
            "name": self.header.name, "base_fingerprint": self.header.base_fingerprint,
            "dtype": self.header.dtype, "class_names": self.header.class_names,
            "producer": self.header.producer, "created": self.header.created,
            "params": self.num_params(), "targets": targets,
            "calibration": self.header.calibration.as_ref().map(|c| serde_json::json!({"images": c.images, "tensors": c.absmax.len()})),
        })
    }
}
