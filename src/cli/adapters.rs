//! `perch adapter`: inspect, merge, import (PEFT) and diff adapters.

use super::*;

#[derive(Subcommand, Debug)]
pub(super) enum AdapterCommand {
    /// Print a JSON summary of an adapter file (validates it; no base needed).
    Inspect {
        /// Adapter file (.safetensors).
        #[arg(value_name = "X.safetensors")]
        adapter: PathBuf,
        /// Also check it against this base model.
        #[arg(long = "model", alias = "base", value_name = "M.onnx")]
        base: Option<PathBuf>,
    },
    /// Merge an adapter into a base model and write the merged ONNX (for QA or other runtimes).
    Merge {
        /// Base model (ONNX).
        #[arg(long = "model", alias = "base", value_name = "M.onnx")]
        base: PathBuf,
        /// Adapter file, or a PEFT directory imported on the fly.
        #[arg(long, value_name = "X")]
        adapter: PathBuf,
        /// Multiplier of the adapter's LoRA deltas (-10..=10).
        #[arg(long = "adapter-scale", alias = "scale", default_value_t = 1.0,
              value_parser = parse_scale, allow_negative_numbers = true)]
        scale: f32,
        /// Where to write the merged model (ONNX).
        #[arg(short, long, value_name = "OUT.onnx")]
        output: PathBuf,
    },
    /// Convert a Hugging Face PEFT LoRA directory into a perch adapter for a base model.
    Import {
        /// Directory with adapter_config.json and adapter_model.safetensors.
        #[arg(long, value_name = "DIR")]
        peft: PathBuf,
        /// Base model the LoRA was trained on (ONNX export).
        #[arg(long = "model", alias = "base", value_name = "M.onnx")]
        base: PathBuf,
        /// Where to write the perch adapter.
        #[arg(short, long, value_name = "X.safetensors")]
        output: PathBuf,
        /// Adapter name (default: the PEFT directory name).
        #[arg(long)]
        name: Option<String>,
        /// JSON object mapping PEFT module (or module.param) names to ONNX initializer names.
        #[arg(long, value_name = "FILE.json")]
        name_map: Option<PathBuf>,
        /// safetensors of per-output-channel scales keyed by PEFT module name (BatchNorm
        /// gamma / sqrt(var + eps) of convs whose LoRA was trained before BN folding).
        #[arg(long, value_name = "FILE.safetensors")]
        channel_scales: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Make an adapter from a base export and the same model after fine-tuning.
    Diff(DiffArgs),
}

#[derive(Args, Debug)]
pub(super) struct StoreArgs {
    /// Class names of the adapted model, one per line (same count as the base).
    #[arg(long, value_name = "FILE")]
    labels: Option<PathBuf>,
    /// Store tensors as f32 instead of f16.
    #[arg(long)]
    f32: bool,
}

#[derive(Args, Debug)]
pub(super) struct DiffArgs {
    /// Base model (ONNX export before fine-tuning).
    #[arg(long = "model", alias = "base", value_name = "M.onnx")]
    base: PathBuf,
    /// The fine-tuned export of the same architecture.
    #[arg(long, value_name = "T.onnx")]
    tuned: PathBuf,
    /// Where to write the adapter.
    #[arg(short, long, value_name = "X.safetensors")]
    output: PathBuf,
    /// Layers 0..N-1 were frozen (Ultralytics freeze=N): refuse if any of them changed.
    #[arg(long)]
    freeze: Option<usize>,
    /// Approximate changed conv/linear weights with a LoRA of this rank (truncated SVD).
    #[arg(long, conflicts_with = "energy")]
    rank: Option<usize>,
    /// Approximate with the smallest rank keeping this fraction of each delta's energy (0..1].
    #[arg(long)]
    energy: Option<f32>,
    /// Adapter name (default: the output file stem).
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
}

pub(super) fn store_dtype(s: &StoreArgs) -> StoredDtype {
    if s.f32 {
        StoredDtype::F32
    } else {
        StoredDtype::F16
    }
}

pub(super) fn adapter_cmd(c: AdapterCommand) -> anyhow::Result<u8> {
    match c {
        AdapterCommand::Inspect { adapter, base } => {
            let x = Adapter::load(&adapter)?;
            let mut summary = x.summary();
            if let Some(b) = base {
                let base = OnnxModel::load(&b)?;
                adapter::merge::merged_weights(&base, &x, 1.0)?;
                summary["fits"] = serde_json::json!({
                    "model": b.display().to_string(),
                    "fingerprint": base.fingerprint(),
                });
            }
            print_json(&summary)?;
        }
        AdapterCommand::Merge {
            base,
            adapter,
            scale,
            output,
        } => {
            let base = OnnxModel::load(&base)?;
            let x = Adapter::load_any(&adapter, &base)?;
            let t = Instant::now();
            let merged = adapter::merge::apply(&base, &x, scale)?;
            let merge_ms = t.elapsed().as_secs_f64() * 1e3;
            merged.save(&output)?;
            print_json(&serde_json::json!({
                "output": output.display().to_string(),
                "adapter": adapter_json(Some(&x), scale),
                "merge_ms": merge_ms,
            }))?;
        }
        AdapterCommand::Import {
            peft,
            base,
            output,
            name,
            name_map,
            channel_scales,
            store,
        } => {
            let base = OnnxModel::load(&base)?;
            // Scales named on the command line, else the directory's channel_scales.safetensors.
            let mut opts = match &channel_scales {
                Some(_) => ImportOptions::default(),
                None => ImportOptions::for_dir(&peft)?,
            };
            opts.name = name;
            if let Some(p) = name_map {
                let text = perch::fsutil::read_text(&p)
                    .with_context(|| format!("{}: cannot read name map", p.display()))?;
                opts.name_map = serde_json::from_str(&text)
                    .with_context(|| format!("{}: not a JSON object of strings", p.display()))?;
            }
            if let Some(p) = channel_scales {
                opts.channel_scales = adapter::peft::read_channel_scales(&p)?;
            }
            opts.class_names = store.labels.as_deref().map(read_labels).transpose()?;
            let x = adapter::peft::import(&peft, &base, &opts)?;
            let saved = x.save(&output, store_dtype(&store))?;
            print_json(&saved.summary())?;
        }
        AdapterCommand::Diff(d) => {
            let base = OnnxModel::load(&d.base)?;
            let tuned = OnnxModel::load(&d.tuned)?;
            let approx = match (d.rank, d.energy) {
                (Some(r), _) => adapter::diff::Approx::Rank(r),
                (None, Some(e)) if e > 0.0 && e <= 1.0 => adapter::diff::Approx::Energy(e),
                (None, Some(e)) => anyhow::bail!("--energy {e} is outside (0, 1]"),
                (None, None) => adapter::diff::Approx::Replace,
            };
            let name = d.name.clone().unwrap_or_else(|| {
                d.output
                    .file_stem()
                    .map_or("adapter".into(), |s| s.to_string_lossy().into_owned())
            });
            let labels = d.store.labels.as_deref().map(read_labels).transpose()?;
            let opts = adapter::diff::DiffOptions {
                freeze: d.freeze,
                approx,
                name,
                class_names: labels,
            };
            let (x, report) = adapter::diff::diff(&base, &tuned, &opts)?;
            let saved = x.save(&d.output, store_dtype(&d.store))?;
            let mut summary = saved.summary();
            summary["diff"] = serde_json::to_value(&report)?;
            print_json(&summary)?;
        }
    }
    Ok(exit::OK)
}
