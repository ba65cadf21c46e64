//! `perch run` (the service) and `perch ctl` (its control socket).

use super::*;

#[derive(Args, Debug)]
pub(super) struct RunArgs {
    /// Service configuration (TOML); see deploy/perch.toml. Without it, --model and --source
    /// run with the defaults of an empty configuration.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the configuration, load the model and open the source, then exit.
    #[arg(long)]
    check_config: bool,
    /// Model to run (overrides the configuration; enough with --source for a quick start).
    #[arg(long, value_name = "M.onnx")]
    model: Option<PathBuf>,
    /// Frame source URI: v4l2:/dev/videoN, y4m:FILE, images:DIR_OR_GLOB, synthetic, or
    /// nokhwa:N (camera index; builds with the `nokhwa` feature only).
    #[arg(long, value_name = "URI")]
    source: Option<String>,
    /// Stop after this many frames have been processed (records written).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    frames: Option<u64>,
}

#[derive(Args, Debug)]
pub(super) struct CtlArgs {
    /// Control socket of the service.
    #[arg(long, default_value = "/run/perch/control.sock", global = true)]
    socket: PathBuf,
    /// Seconds to wait for the reply (an activation builds a model first).
    #[arg(long, default_value_t = 120.0, global = true)]
    timeout: f64,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug)]
pub(super) enum CtlCommand {
    /// Counters, latencies, model and adapter state.
    Status,
    /// Checks that the service answers.
    Ping,
    /// Re-reads the configuration file (like SIGHUP).
    Reload,
    /// Installed adapters, the active one and the last known good one.
    List,
    /// Copies an adapter file into the service's store after checking it against the running
    /// base model.
    Install {
        /// Adapter file to upload (.safetensors).
        #[arg(value_name = "X.safetensors")]
        file: PathBuf,
        /// Store name [default: the file name without extension].
        #[arg(long)]
        name: Option<String>,
    },
    /// Builds and health-checks an adapter set ahead of time (as `activate` would change it),
    /// so that activating it later only waits for the next frame.
    Stage(TaskChange),
    /// Builds, health-checks and swaps in installed adapters while frames keep flowing: one
    /// (it alone runs), several (each its own task on a shared trunk), or, with --add or
    /// --replace, one task of the running set.
    Activate(TaskChange),
    /// Runs the base model alone, or with a name, stops that one task of the running set.
    Deactivate {
        /// Store name of the running task to stop.
        name: Option<String>,
    },
    /// Returns to the last known good adapter (or the one before the current one).
    Rollback,
    /// Deletes an installed adapter that is neither active nor the rollback target.
    Remove {
        /// Store name of an installed adapter.
        name: String,
    },
}

/// Which adapters `stage` and `activate` ask for.
#[derive(Args, Debug)]
pub(super) struct TaskChange {
    /// Store names of installed adapters: one, or several to run as tasks on a shared trunk.
    #[arg(required = true, num_args = 1.., value_name = "NAME")]
    names: Vec<String>,
    /// Add NAME as one more task of the running set.
    #[arg(long, conflicts_with = "replace")]
    add: bool,
    /// Put NAME in the place of the running task OLD.
    #[arg(long, value_name = "OLD")]
    replace: Option<String>,
    /// Multiplier of the adapters' LoRA deltas (-10..=10).
    #[arg(long = "adapter-scale", alias = "scale", default_value_t = 1.0,
          value_parser = parse_scale, allow_negative_numbers = true)]
    scale: f32,
}

impl TaskChange {
    /// The control request for command `cmd`.
    fn request(self, cmd: &str) -> anyhow::Result<serde_json::Value> {
        let mut req = serde_json::json!({"cmd": cmd, "scale": self.scale});
        match (self.names.as_slice(), self.add, self.replace) {
            ([name], false, None) => req["name"] = name.clone().into(),
            ([name], true, None) => {
                req["name"] = name.clone().into();
                req["add"] = true.into();
            }
            ([name], false, Some(old)) => {
                req["name"] = name.clone().into();
                req["replace"] = old.into();
            }
            (many, false, None) => req["names"] = many.to_vec().into(),
            _ => anyhow::bail!("--add and --replace change one task: give one NAME"),
        }
        Ok(req)
    }
}

pub(super) fn run_service(a: RunArgs) -> u8 {
    use perch::service::{self, Invocation, ServiceError};
    let source = match a
        .source
        .as_deref()
        .map(perch::camera::parse_uri)
        .transpose()
    {
        Ok(s) => s,
        Err(e) => return report_error(&anyhow::anyhow!("--source {e}"), exit::CONFIG),
    };
    let (model, frames) = (a.model.clone(), a.frames);
    let overrides = move |s: &mut perch::config::Settings| {
        if let Some(m) = &model {
            s.model.path = m.clone();
        }
        if let Some(k) = &source {
            s.source.kind = k.clone();
        }
        if frames.is_some() {
            s.source.max_frames = frames;
        }
    };
    let settings = match &a.config {
        Some(p) => service::load_settings(p),
        None if a.model.is_none() || a.source.is_none() => {
            let e = anyhow::anyhow!(
                "run needs --config FILE, or both --model and --source (see 'perch run --help')"
            );
            return report_error(&e, exit::BAD_INPUT);
        }
        None => {
            // --model and --source given: the defaults of an empty configuration.
            let text = "[model]\npath = \"-\"\n[source]\nuri = \"synthetic\"\n";
            perch::config::parse(text, Path::new("perch.toml"))
                .map_err(|e| ServiceError::Config(e.to_string()))
        }
    };
    let result = settings.and_then(|mut s| {
        overrides(&mut s);
        if a.check_config {
            let line = service::check(&s)?;
            return out_line(format_args!("{line}"))
                .map_err(|e| ServiceError::Runtime(e.to_string()));
        }
        service::run(
            s,
            Invocation {
                config_path: a.config.clone(),
                overrides: Box::new(overrides),
            },
        )
    });
    match result {
        Ok(()) => exit::OK,
        Err(ServiceError::Config(e)) => report_error(&anyhow::anyhow!(e), exit::CONFIG),
        Err(ServiceError::Runtime(e)) => report_error(&anyhow::anyhow!(e), exit::FAILURE),
    }
}

pub(super) fn ctl(a: CtlArgs) -> u8 {
    use serde_json::json;
    let timeout = Duration::from_secs_f64(a.timeout.clamp(0.1, 3600.0));
    let mut payload = Vec::new();
    let req = match a.command {
        CtlCommand::Status => json!({"cmd": "status"}),
        CtlCommand::Ping => json!({"cmd": "ping"}),
        CtlCommand::Reload => json!({"cmd": "reload"}),
        CtlCommand::List => json!({"cmd": "list"}),
        CtlCommand::Deactivate { name: None } => json!({"cmd": "deactivate"}),
        CtlCommand::Deactivate { name: Some(n) } => json!({"cmd": "deactivate", "name": n}),
        CtlCommand::Rollback => json!({"cmd": "rollback"}),
        CtlCommand::Remove { name } => json!({"cmd": "remove", "name": name}),
        CtlCommand::Stage(t) => match t.request("stage") {
            Ok(r) => r,
            Err(e) => return report_error(&e, exit::BAD_INPUT),
        },
        CtlCommand::Activate(t) => match t.request("activate") {
            Ok(r) => r,
            Err(e) => return report_error(&e, exit::BAD_INPUT),
        },
        CtlCommand::Install { file, name } => {
            let name = name.unwrap_or_else(|| {
                file.file_stem()
                    .map_or(String::new(), |s| s.to_string_lossy().into_owned())
            });
            payload = match perch::fsutil::read_limited(&file, perch::fsutil::MAX_ADAPTER_BYTES) {
                Ok(b) if b.is_empty() => {
                    let e = anyhow::anyhow!("{}: file is empty", file.display());
                    return report_error(&e, exit::BAD_INPUT);
                }
                Ok(b) => b,
                Err(e) => {
                    let e = anyhow::anyhow!("{}: cannot read: {e}", file.display());
                    return report_error(&e, exit::BAD_INPUT);
                }
            };
            json!({"cmd": "install", "name": name})
        }
    };
    match perch::service::control::request_with_payload(&a.socket, &req, &payload, timeout) {
        Ok(reply) => {
            use std::io::IsTerminal;
            let text = match std::io::stdout().is_terminal() {
                true => serde_json::to_string_pretty(&reply).unwrap_or_default(),
                false => reply.to_string(),
            };
            if let Err(e) = out_line(text) {
                return report_error(&e.into(), exit::FAILURE);
            }
            if reply["ok"] == true {
                exit::OK
            } else {
                exit::FAILURE
            }
        }
        Err(e) => report_error(
            &anyhow::anyhow!("{}: {e}", a.socket.display()),
            exit::FAILURE,
        ),
    }
}
