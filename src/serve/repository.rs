//! The models a server holds: loading, lookup by name and version, the repository extension.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use kiln_runtime_core::{LoadOptions, ModelFile, ModelMetadata, NamedTensor, Session};

use super::batcher::{BatchSettings, Batcher, Done, Job, Rejected};
use super::config::{ModelSpec, ServeConfig, repository_overrides, scan_repository, version_key};
use super::error::ApiError;
use super::metrics::{Metrics, ModelMetrics};
use super::stats::Stats;
use crate::backends::BackendConfig;

/// A model version that is loaded and serving.
pub struct LoadedModel {
    /// Name in URLs.
    pub name: String,
    /// Version label.
    pub version: String,
    /// Inputs and outputs.
    pub metadata: ModelMetadata,
    /// Engine running it.
    pub backend: &'static str,
    /// Largest merged batch; 0 when the model has no dynamic batch axis.
    pub max_batch_size: usize,
    /// Settings it was loaded with.
    pub spec: ModelSpec,
    /// Triton-style statistics.
    pub stats: Arc<Stats>,
    /// Label-bound metric handles.
    pub metrics: ModelMetrics,
    batcher: Batcher,
}

impl LoadedModel {
    /// Queues inputs (checked and ordered by the caller) and waits for the outputs, up to `timeout`.
    pub async fn infer(&self, inputs: Vec<NamedTensor>, timeout: Duration) -> Result<Done, ApiError> {
        let rows = inputs.first().and_then(|i| i.tensor.shape().first().copied()).unwrap_or(1);
        let (job, rx) = Job::new(inputs, self.max_batch_size > 0);
        self.batcher.submit(job).map_err(|r| match r {
            Rejected::QueueFull(n) => ApiError::TooManyRequests(format!(
                "model {} has {n} requests queued, the limit (--max-queue) is {}",
                self.name, self.spec.settings.max_queue
            )),
            Rejected::Closed => ApiError::Unavailable(format!("model {} is being unloaded", self.name)),
        })?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => {
                let done = result?;
                self.stats.record_inferences(rows);
                Ok(done)
            }
            Ok(Err(_)) => Err(ApiError::Internal("the instance serving this request stopped".into())),
            // Dropping the receiver marks the job cancelled, so a queued job costs no compute.
            Err(_) => Err(ApiError::Timeout(timeout)),
        }
    }

    /// Requests waiting in this model's queue.
    pub fn queued(&self) -> usize {
        self.batcher.queued()
    }

    /// Stops the instances after they finish queued work (blocking).
    pub fn shutdown(&self) {
        self.batcher.shutdown();
    }
}

/// The state of a model version in the repository.
#[derive(Clone)]
pub enum Slot {
    /// Being loaded.
    Loading,
    /// Serving.
    Ready(Arc<LoadedModel>),
    /// Not serving, with the reason (load failure or unloaded).
    Unavailable(String),
}

/// One row of `POST /v2/repository/index`.
#[derive(Debug, serde::Serialize)]
pub struct IndexEntry {
    /// Model name.
    pub name: String,
    /// Version label.
    pub version: String,
    /// READY, LOADING or UNAVAILABLE.
    pub state: &'static str,
    /// Why not ready.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

type Versions = BTreeMap<(u64, String), (ModelSpec, Slot)>;

/// All models of the server.
pub struct Repository {
    models: RwLock<BTreeMap<String, Versions>>,
    config: ServeConfig,
    metrics: Arc<Metrics>,
}

fn load_model(
    spec: &ModelSpec,
    config: &ServeConfig,
    metrics: &Metrics,
) -> Result<LoadedModel, kiln_runtime_core::Error> {
    let started = Instant::now();
    let file = ModelFile::read(&spec.path)?;
    let backends = BackendConfig { choice: spec.settings.backend, ..config.backend.clone() };
    let selected = backends.select(&file)?;
    let instances = spec.settings.instances.max(1);
    // Several instances share the cores: one intra-op thread each unless told otherwise.
    let options = LoadOptions {
        intra_op_threads: config.intra_op_threads.or(if instances > 1 { Some(1) } else { None }),
        inter_op_threads: config.inter_op_threads,
        max_batch_size: spec.settings.max_batch_size.max(1),
    };
    let sessions: Vec<Box<dyn Session>> =
        (0..instances).map(|_| selected.backend.load(&file, &options)).collect::<Result<_, _>>()?;
    let metadata = sessions[0].metadata().clone();
    let max_batch_size = if spec.settings.max_batch_size > 0 && metadata.batchable() {
        spec.settings.max_batch_size
    } else {
        0
    };
    let model_metrics = metrics.model(&spec.name, &spec.version);
    let stats = Arc::new(Stats::default());
    let batcher = Batcher::start(
        &format!("{}:{}", spec.name, spec.version),
        sessions,
        BatchSettings {
            max_batch_size,
            max_queue_delay: spec.settings.max_queue_delay,
            max_queue: spec.settings.max_queue,
        },
        model_metrics.clone(),
        Arc::clone(&stats),
    )
    .map_err(|e| kiln_runtime_core::Error::Inference(format!("cannot start instance threads: {e}")))?;
    tracing::info!(
        model = %spec.name,
        version = %spec.version,
        backend = selected.backend.name(),
        instances,
        max_batch_size,
        load_ms = (started.elapsed().as_secs_f64() * 1e3).round(),
        reason = %selected.reason,
        "model ready"
    );
    Ok(LoadedModel {
        name: spec.name.clone(),
        version: spec.version.clone(),
        metadata,
        backend: selected.backend.name(),
        max_batch_size,
        spec: spec.clone(),
        stats,
        metrics: model_metrics,
        batcher,
    })
}

impl Repository {
    /// A repository holding the configured models, none loaded yet.
    pub fn new(config: ServeConfig, metrics: Arc<Metrics>) -> Self {
        let mut models: BTreeMap<String, Versions> = BTreeMap::new();
        for spec in &config.models {
            models
                .entry(spec.name.clone())
                .or_default()
                .insert(version_key(&spec.version), (spec.clone(), Slot::Loading));
        }
        Repository { models: RwLock::new(models), config, metrics }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Versions>> {
        self.models.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Versions>> {
        self.models.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads every configured model, one after another; returns the failures.
    pub async fn load_all(self: &Arc<Self>) -> Vec<String> {
        let names: Vec<String> = self.read().keys().cloned().collect();
        let mut failures = Vec::new();
        for name in names {
            if let Err(e) = self.load(&name).await {
                failures.push(e.message());
            }
        }
        failures
    }

    /// (Re)loads every version of `name`; from the repository directory when there is one, so
    /// new or changed versions are picked up.
    pub async fn load(self: &Arc<Self>, name: &str) -> Result<(), ApiError> {
        let mut specs: Vec<ModelSpec> =
            self.read().get(name).map(|v| v.values().map(|(s, _)| s.clone()).collect()).unwrap_or_default();
        if let Some(repo) = &self.config.repository {
            let dir = repo.join(name);
            if dir.is_dir() {
                let own = repository_overrides(&dir).map_err(ApiError::BadRequest)?;
                let found = scan_repository(repo)
                    .map_err(ApiError::BadRequest)?
                    .into_iter()
                    .filter(|(n, ..)| n == name)
                    .map(|(n, version, path, _)| ModelSpec {
                        name: n,
                        version,
                        path,
                        settings: self.config.settings_for(&own),
                    });
                for spec in found {
                    if let Some(s) = specs.iter_mut().find(|s| s.version == spec.version) {
                        *s = spec;
                    } else {
                        specs.push(spec);
                    }
                }
            }
        }
        if specs.is_empty() {
            return Err(ApiError::NotFound(format!("no model named {name} in the repository")));
        }
        let mut errors = Vec::new();
        for spec in specs {
            self.set(&spec, Slot::Loading);
            let (config, metrics, s) = (self.config.clone(), Arc::clone(&self.metrics), spec.clone());
            let loaded = tokio::task::spawn_blocking(move || load_model(&s, &config, &metrics))
                .await
                .unwrap_or_else(|e| Err(kiln_runtime_core::Error::Inference(format!("loader crashed: {e}"))));
            match loaded {
                Ok(model) => {
                    if let Some(Slot::Ready(old)) = self.set(&spec, Slot::Ready(Arc::new(model))) {
                        retire(old);
                    }
                }
                Err(e) => {
                    let msg = format!("model {} version {}: {e}", spec.name, spec.version);
                    tracing::error!("{msg}");
                    self.set(&spec, Slot::Unavailable(e.to_string()));
                    errors.push(msg);
                }
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(ApiError::BadRequest(errors.join("; "))) }
    }

    fn set(&self, spec: &ModelSpec, slot: Slot) -> Option<Slot> {
        let mut models = self.write();
        let versions = models.entry(spec.name.clone()).or_default();
        versions.insert(version_key(&spec.version), (spec.clone(), slot)).map(|(_, old)| old)
    }

    /// Unloads every version of `name`: new requests get 503, queued ones finish.
    pub fn unload(&self, name: &str) -> Result<(), ApiError> {
        let mut models = self.write();
        let versions = models
            .get_mut(name)
            .ok_or_else(|| ApiError::NotFound(format!("no model named {name} in the repository")))?;
        for (_, slot) in versions.values_mut() {
            if let Slot::Ready(old) = std::mem::replace(slot, Slot::Unavailable("unloaded".into())) {
                retire(old);
            }
        }
        tracing::info!(model = name, "model unloaded");
        Ok(())
    }

    /// The model version serving `name` (`version` `None` = the highest ready version).
    pub fn get(&self, name: &str, version: Option<&str>) -> Result<Arc<LoadedModel>, ApiError> {
        let models = self.read();
        let versions = models.get(name).ok_or_else(|| {
            let known: Vec<&str> = models.keys().map(String::as_str).collect();
            ApiError::NotFound(format!("unknown model \"{name}\"; served models: {}", known.join(", ")))
        })?;
        let slot = match version {
            Some(v) => {
                &versions
                    .get(&version_key(v))
                    .ok_or_else(|| ApiError::NotFound(format!("model \"{name}\" has no version \"{v}\"")))?
                    .1
            }
            None => {
                let ready = versions.values().rev().find(|(_, s)| matches!(s, Slot::Ready(_)));
                &ready.or_else(|| versions.values().next_back()).expect("a listed model has a version").1
            }
        };
        match slot {
            Slot::Ready(m) => Ok(Arc::clone(m)),
            Slot::Loading => Err(ApiError::Unavailable(format!("model \"{name}\" is loading"))),
            Slot::Unavailable(why) => {
                Err(ApiError::Unavailable(format!("model \"{name}\" is not available: {why}")))
            }
        }
    }

    /// Every ready model version, for listings and metrics.
    pub fn ready_models(&self) -> Vec<Arc<LoadedModel>> {
        self.read()
            .values()
            .flat_map(|v| v.values())
            .filter_map(|(_, s)| if let Slot::Ready(m) = s { Some(Arc::clone(m)) } else { None })
            .collect()
    }

    /// Names of all models known, ready or not.
    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// Versions of a model, ascending.
    pub fn versions(&self, name: &str) -> Vec<String> {
        self.read()
            .get(name)
            .map(|v| v.values().map(|(s, _)| s.version.clone()).collect())
            .unwrap_or_default()
    }

    /// True when every configured model version is ready.
    pub fn all_ready(&self) -> bool {
        self.read().values().flat_map(|v| v.values()).all(|(_, s)| matches!(s, Slot::Ready(_)))
    }

    /// The repository index.
    pub fn index(&self) -> Vec<IndexEntry> {
        let mut out = Vec::new();
        for versions in self.read().values() {
            for (spec, slot) in versions.values() {
                let (state, reason) = match slot {
                    Slot::Ready(_) => ("READY", String::new()),
                    Slot::Loading => ("LOADING", String::new()),
                    Slot::Unavailable(why) => ("UNAVAILABLE", why.clone()),
                };
                out.push(IndexEntry {
                    name: spec.name.clone(),
                    version: spec.version.clone(),
                    state,
                    reason,
                });
            }
        }
        out
    }

    /// Stops every model's instances after their queued work (blocking).
    pub fn shutdown(&self) {
        for m in self.ready_models() {
            m.shutdown();
        }
    }

    /// The model repository directory, if any.
    pub fn directory(&self) -> Option<&PathBuf> {
        self.config.repository.as_ref()
    }
}

/// Closes a replaced or unloaded model: queued requests finish on a background thread.
fn retire(model: Arc<LoadedModel>) {
    let _ = std::thread::Builder::new().name("kiln-retire".into()).spawn(move || model.shutdown());
}
