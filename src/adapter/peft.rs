//! Importing Hugging Face PEFT LoRA adapters (`adapter_config.json` +
//! `adapter_model.safetensors`) against an ONNX base.
//!
//! PEFT keys look like `base_model.model.<module>.lora_A.weight`. `<module>` maps to the ONNX
//! initializer `<module>.weight` (Ultralytics exports keep module names for fused convs), or
//! through an explicit name map. `modules_to_save` and trained biases become replace targets.
//! The scale is `lora_alpha / r` (`/ sqrt(r)` with `use_rslora`), with `alpha_pattern`
//! overrides matched on the module name's dotted suffix; the rank is read from the tensors.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::SafeTensors;
use serde::Deserialize;

use super::{Adapter, AdapterError, AdapterHeader, StoredDtype, Target, TargetKind, merge};
use crate::model::OnnxModel;
use crate::tensor::NamedTensor;

#[derive(Debug, Deserialize)]
struct PeftConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f32,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    alpha_pattern: HashMap<String, f32>,
    #[serde(default)]
    use_dora: bool,
}

/// Options of [`import`].
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Adapter name written into the header (defaults to the directory name).
    pub name: Option<String>,
    /// PEFT module name (or `module.param`) -> ONNX initializer name, for renamed exports.
    pub name_map: HashMap<String, String>,
    /// Per-output-channel scales by PEFT module name, for a LoRA trained on a conv whose
    /// BatchNorm the export folded: `gamma / sqrt(running_var + eps)`.
    pub channel_scales: HashMap<String, Vec<f32>>,
    /// Class names for the adapted model (same count as the base).
    pub class_names: Option<Vec<String>>,
}

/// The file of per-channel scales perch looks for in a PEFT directory (written next to the
/// adapter by a training recipe that knows the BatchNorm statistics the export folded).
pub const CHANNEL_SCALES_FILE: &str = "channel_scales.safetensors";

impl ImportOptions {
    /// Default options, with [`ImportOptions::channel_scales`] read from
    /// [`CHANNEL_SCALES_FILE`] when the PEFT directory `dir` has one.
    pub fn for_dir(dir: &Path) -> Result<Self, AdapterError> {
        let file = dir.join(CHANNEL_SCALES_FILE);
        let channel_scales = match file.exists() {
            true => {
                log::info!("{}: using its per-channel scales", file.display());
                read_channel_scales(&file)?
            }
            false => HashMap::new(),
        };
        Ok(ImportOptions {
            channel_scales,
            ..Default::default()
        })
    }
}

/// Reads per-channel scales: a safetensors file of 1-D f32 tensors keyed by PEFT module name.
pub fn read_channel_scales(path: &Path) -> Result<HashMap<String, Vec<f32>>, AdapterError> {
    let invalid = |reason: String| AdapterError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let bytes =
        crate::fsutil::read_limited(path, crate::fsutil::MAX_ADAPTER_BYTES).map_err(|source| {
            AdapterError::Io {
                path: path.to_path_buf(),
                source,
            }
        })?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| invalid(format!("not a safetensors file ({e})")))?;
    let mut out = HashMap::new();
    for (name, view) in st.iter() {
        if view.dtype() != safetensors::Dtype::F32 || view.shape().len() != 1 {
            return Err(invalid(format!("tensor '{name}' must be 1-D F32")));
        }
        let values = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        out.insert(name.to_string(), values);
    }
    Ok(out)
}

/// Whether PEFT's pattern `key` selects `module` (whole name or a dotted suffix of it).
fn pattern_matches(key: &str, module: &str) -> bool {
    module == key || module.ends_with(&format!(".{key}"))
}

/// What a PEFT state-dict key refers to.
enum Key<'a> {
    LoraA(&'a str),
    LoraB(&'a str),
    /// A full parameter (`modules_to_save` or a trained bias): `module.param`.
    Param(String),
}

fn classify(key: &str) -> Result<Key<'_>, String> {
    let k = key.strip_prefix("base_model.model.").unwrap_or(key);
    for (marker, is_a) in [(".lora_A.", true), (".lora_B.", false)] {
        if let Some(i) = k.find(marker) {
            let module = &k[..i];
            return Ok(if is_a {
                Key::LoraA(module)
            } else {
                Key::LoraB(module)
            });
        }
    }
    if k.contains("lora_embedding") || k.contains("lora_magnitude") {
        return Err(format!(
            "'{key}': embedding LoRA and DoRA are not supported"
        ));
    }
    // modules_to_save are saved as `<module>.modules_to_save.<adapter>.<param>` or `<module>.<param>`.
    let param = match k.find(".modules_to_save.") {
        Some(i) => {
            let rest = &k[i + ".modules_to_save.".len()..];
            let p = rest.split_once('.').map_or(rest, |(_, p)| p);
            format!("{}.{p}", &k[..i])
        }
        None => k.to_string(),
    };
    Ok(Key::Param(param))
}

/// Imports the PEFT adapter in `dir` for `base`. Every target must exist in the base with a
/// fitting shape; the result is validated like a loaded adapter and is not yet saved.
pub fn import(dir: &Path, base: &OnnxModel, opts: &ImportOptions) -> Result<Adapter, AdapterError> {
    let invalid = |reason: String| AdapterError::Invalid {
        path: dir.to_path_buf(),
        reason,
    };
    let io = |p: &Path, source| AdapterError::Io {
        path: p.to_path_buf(),
        source,
    };
    let cfg_path = dir.join("adapter_config.json");
    let cfg_text = crate::fsutil::read_text(&cfg_path).map_err(|e| io(&cfg_path, e))?;
    let cfg: PeftConfig = serde_json::from_str(&cfg_text)
        .map_err(|e| invalid(format!("adapter_config.json: {e}")))?;
    if cfg.peft_type.as_deref().is_some_and(|t| t != "LORA") {
        return Err(invalid(format!(
            "peft_type {:?} is not supported (LORA only)",
            cfg.peft_type.unwrap_or_default()
        )));
    }
    if cfg.use_dora {
        return Err(invalid("DoRA adapters (use_dora) are not supported".into()));
    }
    let st_path = dir.join("adapter_model.safetensors");
    let len = std::fs::metadata(&st_path)
        .map_err(|e| io(&st_path, e))?
        .len();
    if len > super::MAX_FILE_BYTES {
        return Err(invalid(format!(
            "adapter_model.safetensors is {len} bytes, over the limit"
        )));
    }
    let bytes = crate::fsutil::read_limited(&st_path, crate::fsutil::MAX_ADAPTER_BYTES)
        .map_err(|e| io(&st_path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| invalid(format!("adapter_model.safetensors: {e}")))?;

    let mut a_of: BTreeMap<String, NamedTensor> = BTreeMap::new();
    let mut b_of: BTreeMap<String, NamedTensor> = BTreeMap::new();
    let mut params: BTreeMap<String, NamedTensor> = BTreeMap::new();
    for (key, view) in st.iter() {
        let t = super::tensor_from_view(key, &view, true).map_err(&invalid)?;
        match classify(key).map_err(&invalid)? {
            Key::LoraA(m) => a_of.insert(m.to_string(), t),
            Key::LoraB(m) => b_of.insert(m.to_string(), t),
            Key::Param(p) => params.insert(p, t),
        };
    }
    let onnx_name = |module_or_param: &str, default: String| {
        opts.name_map
            .get(module_or_param)
            .cloned()
            .unwrap_or(default)
    };
    let mut targets = Vec::new();
    let mut tensors = Vec::new();
    for (module, a) in &a_of {
        let b = b_of
            .get(module)
            .ok_or_else(|| invalid(format!("module '{module}' has lora_A but no lora_B")))?;
        let rank = a.shape.first().copied().unwrap_or(0);
        let cols: usize = a.shape[1..].iter().product();
        let (out, rest) = b
            .shape
            .split_first()
            .ok_or_else(|| invalid(format!("lora_B of '{module}' is a scalar")))?;
        if rest.first() != Some(&rank) || rest[1..].iter().any(|d| *d != 1) {
            return Err(invalid(format!(
                "lora_B of '{module}' has shape {:?}, expected [out, {rank}, 1, ...]",
                b.shape
            )));
        }
        let name = onnx_name(
            module,
            opts.name_map
                .get(&format!("{module}.weight"))
                .cloned()
                .unwrap_or(format!("{module}.weight")),
        );
        let alpha = cfg
            .alpha_pattern
            .iter()
            .find(|(k, _)| pattern_matches(k, module))
            .map_or(cfg.lora_alpha, |(_, v)| *v);
        let scale = if cfg.use_rslora {
            alpha / (rank as f32).sqrt()
        } else {
            alpha / rank as f32
        };
        let channel_scale = opts.channel_scales.get(module);
        if let Some(c) = channel_scale
            && c.len() != *out
        {
            return Err(invalid(format!(
                "channel scale of '{module}' has {} values, lora_B has {out} rows",
                c.len()
            )));
        }
        tensors.push(NamedTensor {
            name: format!("{name}.lora_A"),
            shape: vec![rank, cols],
            data: a.data.clone(),
        });
        tensors.push(NamedTensor {
            name: format!("{name}.lora_B"),
            shape: vec![*out, rank],
            data: b.data.clone(),
        });
        if let Some(c) = channel_scale {
            tensors.push(NamedTensor {
                name: format!("{name}.channel_scale"),
                shape: vec![*out],
                data: c.clone(),
            });
        }
        targets.push(Target {
            name,
            kind: TargetKind::Lora,
            rank: Some(rank),
            alpha: Some(alpha),
            scale: Some(scale),
            channel_scale: channel_scale.is_some(),
        });
    }
    if let Some(m) = b_of.keys().find(|m| !a_of.contains_key(*m)) {
        return Err(invalid(format!("module '{m}' has lora_B but no lora_A")));
    }
    for (param, t) in params {
        let name = onnx_name(&param, param.clone());
        tensors.push(NamedTensor {
            name: format!("{name}.replace"),
            shape: t.shape,
            data: t.data,
        });
        targets.push(Target {
            name,
            kind: TargetKind::Replace,
            rank: None,
            alpha: None,
            scale: None,
            channel_scale: false,
        });
    }
    if targets.is_empty() {
        return Err(invalid("no LoRA or saved-module tensors found".into()));
    }
    let name = opts.name.clone().unwrap_or_else(|| {
        dir.file_name()
            .map_or("adapter".into(), |n| n.to_string_lossy().into_owned())
    });
    let header = AdapterHeader {
        format: super::FORMAT.into(),
        version: super::VERSION,
        kind: super::kind_of(&targets),
        name,
        base_fingerprint: base.fingerprint(),
        targets,
        class_names: opts.class_names.clone(),
        producer: format!(
            "perch {} adapter import --peft (r={}, alpha={}, rslora={})",
            env!("CARGO_PKG_VERSION"),
            cfg.r,
            cfg.lora_alpha,
            cfg.use_rslora
        ),
        created: super::now_rfc3339(),
        dtype: StoredDtype::F32,
        calibration: None,
    };
    let adapter = Adapter::new(header, tensors, dir)?;
    merge::merged_weights(base, &adapter, 1.0)?;
    Ok(adapter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_patterns() {
        assert!(matches!(
            classify("base_model.model.model.22.cv2.0.2.lora_A.weight"),
            Ok(Key::LoraA("model.22.cv2.0.2"))
        ));
        assert!(matches!(
            classify("base_model.model.fc.lora_B.default.weight"),
            Ok(Key::LoraB("fc"))
        ));
        assert!(
            matches!(classify("base_model.model.head.modules_to_save.default.weight"), Ok(Key::Param(p)) if p == "head.weight")
        );
        assert!(
            matches!(classify("base_model.model.conv.bias"), Ok(Key::Param(p)) if p == "conv.bias")
        );
        assert!(classify("base_model.model.emb.lora_embedding_A").is_err());
        assert!(pattern_matches("cv2.0.2", "model.22.cv2.0.2"));
        assert!(!pattern_matches("v2.0.2", "model.22.cv2.0.2"));
    }
}
