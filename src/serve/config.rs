//! `kiln serve` configuration: flags and environment, an optional `kiln.toml`, per-model files in
//! a model repository, merged and validated before anything binds or loads.
//!
//! Precedence for each setting: command-line flag or `KILN_*` variable, then the model's own
//! section or repository `config.toml`, then the `[serve]` section of `--config`, then the default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use crate::backends::{BackendChoice, BackendConfig};
use crate::cli::BackendArgs;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";

/// Arguments of `kiln serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Serve a model file as NAME (version 1), or a registered model NAME[:VERSION] from the
    /// workspace (latest version by default); repeatable. `KILN_MODELS` takes a comma-separated list.
    #[arg(
        long = "model",
        value_name = "NAME=PATH|NAME[:VERSION]",
        env = "KILN_MODELS",
        value_delimiter = ','
    )]
    pub models: Vec<String>,
    /// Serve every model of a repository laid out as DIR/NAME/VERSION/model.onnx, with optional
    /// per-model settings in DIR/NAME/config.toml.
    #[arg(long, value_name = "DIR", env = "KILN_MODEL_REPOSITORY")]
    pub model_repository: Option<PathBuf>,
    /// Settings file (kiln.toml): a [serve] section with any of the settings below and
    /// [models.NAME] sections with `path` and per-model settings.
    #[arg(long, value_name = "FILE", env = "KILN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of the inference API [default: 0.0.0.0:8080].
    #[arg(long, value_name = "ADDR", env = "KILN_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Separate address for /metrics (it is also served on --listen).
    #[arg(long, value_name = "ADDR", env = "KILN_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Sessions per model, each on its own thread [default: min(cores, 4)].
    #[arg(long, value_name = "N", env = "KILN_INSTANCES")]
    pub instances: Option<usize>,
    /// Largest dynamic batch in rows; 0 disables batching [default: 32].
    #[arg(long, value_name = "ROWS", env = "KILN_MAX_BATCH_SIZE")]
    pub max_batch_size: Option<usize>,
    /// Longest a request waits for others to fill a batch, in microseconds [default: 0].
    #[arg(long, value_name = "US", env = "KILN_MAX_QUEUE_DELAY_US")]
    pub max_queue_delay_us: Option<u64>,
    /// Most requests queued per model; beyond it requests get 429 [default: 1024].
    #[arg(long, value_name = "N", env = "KILN_MAX_QUEUE")]
    pub max_queue: Option<usize>,
    /// Most requests admitted at once server-wide; beyond it requests get 429 [default: 256].
    #[arg(long, value_name = "N", env = "KILN_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,
    /// Longest a request may take, queue included, e.g. 30s or 500ms [default: 60s].
    #[arg(long, value_name = "DURATION", env = "KILN_REQUEST_TIMEOUT", value_parser = parse_duration)]
    pub request_timeout: Option<Duration>,
    /// On SIGTERM/SIGINT, how long queued and in-flight requests get to finish [default: 30s].
    #[arg(long, value_name = "DURATION", env = "KILN_GRACE_PERIOD", value_parser = parse_duration)]
    pub grace_period: Option<Duration>,
    /// Largest request body, e.g. 16MiB or 1048576 [default: 16MiB].
    #[arg(long, value_name = "BYTES", env = "KILN_MAX_BODY_BYTES", value_parser = parse_bytes)]
    pub max_body_bytes: Option<usize>,
    /// Require `Authorization: Bearer <KEY>` on every route but health, liveness and metrics.
    #[arg(long, value_name = "KEY", env = "KILN_AUTH_KEY", hide_env_values = true)]
    pub auth_key: Option<String>,
    /// Read the auth key from a file (first line), e.g. a mounted secret.
    #[arg(long, value_name = "FILE", env = "KILN_AUTH_KEY_FILE", conflicts_with = "auth_key")]
    pub auth_key_file: Option<PathBuf>,
}

/// Parses `250ms`, `30s`, `2m`, `1h`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}; use e.g. 500ms, 30s, 2m"))?;
    let secs = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("invalid duration unit {other:?} in {s:?}; use ms, s, m or h")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `1048576`, `64KiB`, `16MiB`, `1GiB` (also KB/MB/GB as powers of 1000).
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: u64 = num.parse().map_err(|_| format!("invalid size {s:?}; use e.g. 1048576 or 16MiB"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => return Err(format!("invalid size unit {other:?} in {s:?}; use KiB, MiB or GiB")),
    };
    value
        .checked_mul(mult)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| format!("size {s:?} is too large"))
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    s.map(|s| parse_duration(&s).map_err(serde::de::Error::custom)).transpose()
}

fn de_bytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        N(usize),
        S(String),
    }
    match Option::<Size>::deserialize(d)? {
        None => Ok(None),
        Some(Size::N(n)) => Ok(Some(n)),
        Some(Size::S(s)) => parse_bytes(&s).map(Some).map_err(serde::de::Error::custom),
    }
}

/// Settings a model may override (in `[models.NAME]` or a repository's `config.toml`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ModelOverrides {
    /// Engine for this model.
    pub backend: Option<BackendChoice>,
    /// Sessions for this model.
    pub instances: Option<usize>,
    /// Largest dynamic batch.
    pub max_batch_size: Option<usize>,
    /// Queue delay in microseconds.
    pub max_queue_delay_us: Option<u64>,
    /// Queue bound.
    pub max_queue: Option<usize>,
}

/// A `[models.NAME]` section of kiln.toml.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The model file, relative to the config file's directory (required to serve; optional in
    /// the config given to `kiln image build`, which fills it in).
    pub path: Option<PathBuf>,
    /// Version label [default: 1].
    pub version: Option<String>,
    /// Per-model settings.
    #[serde(flatten)]
    pub settings: ModelOverrides,
}

/// The `[serve]` section of kiln.toml.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeSection {
    /// See `--listen`.
    pub listen: Option<SocketAddr>,
    /// See `--metrics-listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// See `--model-repository`.
    pub model_repository: Option<PathBuf>,
    /// Default settings of every model.
    #[serde(flatten)]
    pub models: ModelOverrides,
    /// See `--max-in-flight`.
    pub max_in_flight: Option<usize>,
    /// See `--request-timeout`.
    #[serde(default, deserialize_with = "de_duration")]
    pub request_timeout: Option<Duration>,
    /// See `--grace-period`.
    #[serde(default, deserialize_with = "de_duration")]
    pub grace_period: Option<Duration>,
    /// See `--max-body-bytes`.
    #[serde(default, deserialize_with = "de_bytes")]
    pub max_body_bytes: Option<usize>,
    /// File holding the auth key; the key itself never goes in the config.
    pub auth_key_file: Option<PathBuf>,
    /// Intra-op threads for ONNX Runtime sessions.
    pub intra_op_threads: Option<usize>,
    /// Inter-op threads for ONNX Runtime sessions.
    pub inter_op_threads: Option<usize>,
}

/// The whole kiln.toml.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Server settings.
    #[serde(default)]
    pub serve: ServeSection,
    /// Models by name.
    #[serde(default)]
    pub models: BTreeMap<String, ModelSection>,
}

impl ConfigFile {
    /// Reads and parses a config file, with the file name in every error.
    pub fn read(path: &Path) -> Result<Self, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.to_string().trim()))
    }
}

/// Effective settings of one model version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSettings {
    /// Engine choice.
    pub backend: BackendChoice,
    /// Sessions.
    pub instances: usize,
    /// Largest dynamic batch (0 = no batching).
    pub max_batch_size: usize,
    /// Longest wait to fill a batch.
    pub max_queue_delay: Duration,
    /// Queue bound.
    pub max_queue: usize,
}

/// One model version to serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    /// Name in URLs.
    pub name: String,
    /// Version label (numeric for repository models).
    pub version: String,
    /// The .onnx file.
    pub path: PathBuf,
    /// Settings.
    pub settings: ModelSettings,
}

/// The validated configuration of a server.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Inference API address.
    pub listen: SocketAddr,
    /// Optional metrics-only address.
    pub metrics_listen: Option<SocketAddr>,
    /// Models to serve, in name then version order.
    pub models: Vec<ModelSpec>,
    /// Repository directory, for the repository extension's reloads.
    pub repository: Option<PathBuf>,
    /// Backend settings shared by all models (library path, threads).
    pub backend: BackendConfig,
    /// ONNX Runtime intra-op threads per session.
    pub intra_op_threads: Option<usize>,
    /// ONNX Runtime inter-op threads per session.
    pub inter_op_threads: Option<usize>,
    /// Admission bound.
    pub max_in_flight: usize,
    /// Per-request deadline.
    pub request_timeout: Duration,
    /// Drain deadline.
    pub grace_period: Duration,
    /// Body limit.
    pub max_body_bytes: usize,
    /// Bearer key, when auth is on.
    pub auth_key: Option<String>,
    /// Overrides from flags (apply to every model, above file settings).
    pub flag_overrides: ModelOverrides,
    /// Defaults from the `[serve]` section.
    pub file_defaults: ModelOverrides,
}

/// Valid model names: what is safe in a URL path segment and a file name.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid model name {name:?}: use letters, digits, '_', '-' and '.', not starting with '.'"
        ))
    }
}

fn default_instances() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(4)
}

impl ServeConfig {
    /// Effective settings of a model: flags, then its own overrides, then `[serve]`, then defaults.
    pub fn settings_for(&self, own: &ModelOverrides) -> ModelSettings {
        let (f, d) = (&self.flag_overrides, &self.file_defaults);
        ModelSettings {
            backend: f.backend.or(own.backend).or(d.backend).unwrap_or_default(),
            instances: f.instances.or(own.instances).or(d.instances).unwrap_or_else(default_instances),
            max_batch_size: f.max_batch_size.or(own.max_batch_size).or(d.max_batch_size).unwrap_or(32),
            max_queue_delay: Duration::from_micros(
                f.max_queue_delay_us.or(own.max_queue_delay_us).or(d.max_queue_delay_us).unwrap_or(0),
            ),
            max_queue: f.max_queue.or(own.max_queue).or(d.max_queue).unwrap_or(1024),
        }
    }

    /// Merges flags, config file and repository, checking everything a user could get wrong.
    pub fn from_args(args: &ServeArgs, workspace: &Path) -> Result<Self, String> {
        let (file, base) = match &args.config {
            Some(p) => (ConfigFile::read(p)?, p.parent().map(Path::to_path_buf).unwrap_or_default()),
            None => (ConfigFile::default(), PathBuf::new()),
        };
        let s = &file.serve;
        let positive = |what: &str, v: Option<usize>| match v {
            Some(0) => Err(format!("{what} must be at least 1")),
            _ => Ok(()),
        };
        let flag_overrides = ModelOverrides {
            // An explicit --backend (or KILN_BACKEND) wins; the default `auto` leaves room for the file.
            backend: (args.backend.backend != BackendChoice::Auto
                || std::env::var_os("KILN_BACKEND").is_some())
            .then_some(args.backend.backend),
            instances: args.instances,
            max_batch_size: args.max_batch_size,
            max_queue_delay_us: args.max_queue_delay_us,
            max_queue: args.max_queue,
        };
        positive("--instances", args.instances)?;
        positive("--max-queue", args.max_queue)?;
        positive("--max-in-flight", args.max_in_flight)?;
        positive("[serve] instances", s.models.instances)?;
        positive("[serve] max_queue", s.models.max_queue)?;
        let auth_key = match (&args.auth_key, args.auth_key_file.as_ref().or(s.auth_key_file.as_ref())) {
            (Some(k), _) => Some(k.clone()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read auth key file {}: {e}", path.display()))?;
                Some(text.lines().next().unwrap_or_default().trim().to_string())
            }
            (None, None) => None,
        };
        if auth_key.as_deref() == Some("") {
            return Err("the auth key is empty".into());
        }
        let repository =
            args.model_repository.clone().or_else(|| s.model_repository.as_ref().map(|r| base.join(r)));
        let mut config = ServeConfig {
            listen: args
                .listen
                .or(s.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default address")),
            metrics_listen: args.metrics_listen.or(s.metrics_listen),
            models: Vec::new(),
            repository: repository.clone(),
            backend: BackendConfig { choice: BackendChoice::Auto, ..args.backend.config() },
            intra_op_threads: args.backend.intra_op_threads.map(usize::from).or(s.intra_op_threads),
            inter_op_threads: args.backend.inter_op_threads.map(usize::from).or(s.inter_op_threads),
            max_in_flight: args.max_in_flight.or(s.max_in_flight).unwrap_or(256),
            request_timeout: args.request_timeout.or(s.request_timeout).unwrap_or(Duration::from_secs(60)),
            grace_period: args.grace_period.or(s.grace_period).unwrap_or(Duration::from_secs(30)),
            max_body_bytes: args.max_body_bytes.or(s.max_body_bytes).unwrap_or(16 << 20),
            auth_key,
            flag_overrides,
            file_defaults: s.models.clone(),
        };
        if config.request_timeout.is_zero() {
            return Err("--request-timeout must be greater than 0".into());
        }
        let mut models = Vec::new();
        for arg in &args.models {
            match arg.split_once('=') {
                Some((name, path)) => {
                    check_name(name).map_err(|e| format!("--model {arg:?}: {e}"))?;
                    models.push((
                        name.to_string(),
                        "1".to_string(),
                        PathBuf::from(path),
                        ModelOverrides::default(),
                    ));
                }
                None => {
                    let (name, version, path) = resolve_registered(workspace, arg)
                        .map_err(|e| format!("--model {arg:?}: {e} (a file is given as NAME=PATH)"))?;
                    models.push((name, version, path, ModelOverrides::default()));
                }
            }
        }
        for (name, section) in &file.models {
            check_name(name).map_err(|e| format!("[models.{name}]: {e}"))?;
            positive(&format!("[models.{name}] instances"), section.settings.instances)?;
            let version = section.version.clone().unwrap_or_else(|| "1".into());
            let path = section
                .path
                .as_ref()
                .ok_or_else(|| format!("[models.{name}] needs a path to the model file"))?;
            models.push((name.clone(), version, base.join(path), section.settings.clone()));
        }
        if let Some(repo) = &repository {
            models.extend(scan_repository(repo)?);
        }
        if models.is_empty() {
            return Err(
                "no models to serve: give --model NAME=PATH, --model-repository DIR or --config FILE".into(),
            );
        }
        for (name, version, path, own) in models {
            if !path.is_file() {
                let what = if path.is_dir() { "is a directory, not a model file" } else { "does not exist" };
                return Err(format!("model {name} version {version}: {} {what}", path.display()));
            }
            if config.models.iter().any(|m: &ModelSpec| m.name == name && m.version == version) {
                return Err(format!("model {name} version {version} is given twice"));
            }
            let settings = config.settings_for(&own);
            config.models.push(ModelSpec { name, version, path, settings });
        }
        config.models.sort_by(|a, b| {
            (a.name.as_str(), version_key(&a.version)).cmp(&(b.name.as_str(), version_key(&b.version)))
        });
        Ok(config)
    }
}

/// Resolves a registered model `NAME[:VERSION]` to its ONNX file, materialised (hard links to the
/// blobs, so no copy) under `<workspace>/run/NAME/VERSION/` with the model's own file layout, so
/// ONNX external data next to the model is found.
pub fn resolve_registered(workspace: &Path, spec: &str) -> Result<(String, String, PathBuf), String> {
    let (name, version) = crate::registry::parse_model_ref(spec).map_err(|e| e.to_string())?;
    let ws = crate::registry::Workspace::open(workspace).map_err(|e| e.to_string())?;
    let mv = ws.show(&name, version).map_err(|e| e.to_string())?;
    let onnx: Vec<&crate::registry::ModelFileEntry> = mv.files.iter().filter(|f| f.onnx.is_some()).collect();
    let file = match onnx.as_slice() {
        [one] => *one,
        [] => return Err(format!("{}:{} has no ONNX model or accelerator image", mv.name, mv.version)),
        many => many
            .iter()
            .find(|f| f.path == "model.onnx" || f.path.ends_with("/model.onnx"))
            .copied()
            .ok_or_else(|| {
                format!("{}:{} has several ONNX files and none is model.onnx", mv.name, mv.version)
            })?,
    };
    let dir = workspace.join("run").join(&mv.name).join(mv.version.to_string());
    for f in &mv.files {
        let dest = dir.join(&f.path);
        if dest.is_file() {
            continue;
        }
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        let blob = ws.layout().blob_path(&f.digest);
        if std::fs::hard_link(&blob, &dest).is_err() {
            std::fs::copy(&blob, &dest)
                .map_err(|e| format!("copying {} to {}: {e}", blob.display(), dest.display()))?;
        }
    }
    Ok((mv.name.clone(), mv.version.to_string(), dir.join(&file.path)))
}

/// Orders versions numerically when they are numbers, else after them by text.
pub fn version_key(v: &str) -> (u64, String) {
    match v.parse::<u64>() {
        Ok(n) => (n, String::new()),
        Err(_) => (u64::MAX, v.to_string()),
    }
}

/// Reads a repository's per-model `config.toml`, if any.
pub fn repository_overrides(model_dir: &Path) -> Result<ModelOverrides, String> {
    let path = model_dir.join("config.toml");
    if !path.exists() {
        return Ok(ModelOverrides::default());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.to_string().trim()))
}

/// Lists DIR/NAME/VERSION/model.onnx entries. Versions are positive integers, as in Triton's layout.
pub fn scan_repository(dir: &Path) -> Result<Vec<(String, String, PathBuf, ModelOverrides)>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("model repository {}: {e}", dir.display()))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("model repository {}: {e}", dir.display()))?;
        let model_dir = entry.path();
        if !model_dir.is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        check_name(&name).map_err(|e| format!("model repository {}: {e}", dir.display()))?;
        let overrides = repository_overrides(&model_dir)?;
        let mut found = false;
        for v in std::fs::read_dir(&model_dir).map_err(|e| format!("{}: {e}", model_dir.display()))? {
            let v = v.map_err(|e| format!("{}: {e}", model_dir.display()))?;
            let version = v.file_name().to_string_lossy().into_owned();
            if !v.path().is_dir() || version.parse::<u64>().map_or(true, |n| n == 0) {
                continue;
            }
            let model = v.path().join("model.onnx");
            if model.is_file() {
                out.push((name.clone(), version, model, overrides.clone()));
                found = true;
            }
        }
        if !found {
            return Err(format!(
                "model repository: {} has no VERSION/model.onnx (versions are positive integers)",
                model_dir.display()
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 days").is_err());
        assert_eq!(parse_bytes("16MiB"), Ok(16 << 20));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert!(parse_bytes("1 parsec").is_err());
        assert!(parse_bytes("99999999999999GiB").is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("iris-v2.onnx_1").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "sp ace"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn versions_sort_numerically() {
        let mut v = vec!["10", "9", "abc", "1"];
        v.sort_by_key(|v| version_key(v));
        assert_eq!(v, vec!["1", "9", "10", "abc"]);
    }
}
