//! `kiln image build`: registered models + serving configuration -> a reproducible OCI image,
//! without Docker.
//!
//! Layers, rarely-changing first: [base layers] -> runtime (this `kiln` binary, every shared
//! library it needs and the dynamic loader, plus libonnxruntime when the ort backend is packaged)
//! -> one uncompressed layer per model version under `/models/NAME/VERSION/` -> the serving
//! configuration `/etc/kiln/kiln.toml`. The entrypoint serves exactly what was packaged, as user
//! 65532. Layers are cached by their inputs: rebuilding after a config-only change reuses the
//! runtime and model layers without rewriting them.

pub mod elf;
pub mod export;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_images::digest::Digest;
use kiln_images::image::{self, ImageLayer, ImageSpec};
use kiln_images::layer::{Compression, Content, LayerBuilder, LayerInfo, source_date_epoch};
use kiln_images::layout::{IndexEntry, Layout};
use kiln_runtime_core::ModelFile;
use serde::{Deserialize, Serialize};

use crate::backends::BackendConfig;
use crate::registry::{ModelVersion, RegistryError, Workspace};
use crate::serve::config::ConfigFile;

/// Where things live inside the image.
pub const KILN_PATH: &str = "/usr/local/bin/kiln";
/// The serving configuration inside the image.
pub const CONFIG_PATH: &str = "/etc/kiln/kiln.toml";
/// ONNX Runtime inside the image, when packaged.
pub const ORT_PATH: &str = "/usr/local/lib/kiln/libonnxruntime.so";
/// The non-root user the server runs as.
pub const USER: &str = "65532:65532";
/// Bump when the layout of a layer changes, so cached layers are not reused across formats.
const LAYER_FORMAT: &str = "kiln-layer-v1";

/// What to build.
#[derive(Clone, Debug)]
pub struct BuildRequest {
    /// `NAME` or `NAME:VERSION` of registered models.
    pub models: Vec<(String, Option<i64>)>,
    /// A kiln.toml with `[serve]` settings and `[models.NAME]` overrides.
    pub config: Option<PathBuf>,
    /// Backend to package for.
    pub backend: BackendConfig,
    /// Base image reference; `None` = scratch.
    pub base: Option<String>,
    /// Plain HTTP for the base's registry.
    pub insecure_registry: bool,
    /// `NAME:TAG` to record the image under.
    pub tag: String,
    /// Replace an existing tag.
    pub force: bool,
    /// The kiln binary to package (default: this process's executable).
    pub kiln_binary: Option<PathBuf>,
}

/// What was built.
#[derive(Clone, Debug, Serialize)]
pub struct BuildReport {
    /// Tag.
    pub tag: String,
    /// Manifest digest.
    pub digest: String,
    /// Sum of layer sizes plus config and manifest.
    pub compressed_size: u64,
    /// Layers, with whether each was reused from the cache.
    pub layers: Vec<LayerReport>,
}

/// One layer of a build.
#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    /// What it holds.
    pub content: String,
    /// Digest.
    pub digest: String,
    /// Size.
    pub size: u64,
    /// Reused from an earlier build without rewriting.
    pub cached: bool,
}

/// Errors of a build, split by whose fault.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The request is wrong (unknown model, tag exists, bad config, unsupported operators).
    #[error("{0}")]
    Invalid(String),
    /// Something failed while doing it.
    #[error("{0}")]
    Failed(String),
}

impl From<RegistryError> for BuildError {
    fn from(e: RegistryError) -> Self {
        if e.is_usage() { BuildError::Invalid(e.to_string()) } else { BuildError::Failed(e.to_string()) }
    }
}

impl From<kiln_images::layout::LayoutError> for BuildError {
    fn from(e: kiln_images::layout::LayoutError) -> Self {
        BuildError::Failed(e.to_string())
    }
}

/// Checks `NAME:TAG` (lowercase repository name, tag of letters, digits, `_.-`).
pub fn check_tag(tag: &str) -> Result<(), BuildError> {
    let bad = || BuildError::Invalid(format!("invalid tag {tag:?}: expected NAME:TAG, e.g. iris-service:1"));
    let (name, t) = tag.rsplit_once(':').ok_or_else(bad)?;
    let name_ok = !name.is_empty()
        && name.split('/').all(|c| {
            !c.is_empty()
                && c.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-".contains(ch))
        });
    let tag_ok = !t.is_empty()
        && t.len() <= 128
        && t.chars().all(|ch| ch.is_ascii_alphanumeric() || "_.-".contains(ch));
    if name_ok && tag_ok { Ok(()) } else { Err(bad()) }
}

#[derive(Serialize, Deserialize)]
struct CachedLayer {
    digest: Digest,
    diff_id: Digest,
    size: u64,
    media_type: String,
}

/// Writes a layer unless one with the same key is stored already (`cache_dir` holds the keys).
fn cached_layer(
    layout: &Layout,
    cache_dir: &Path,
    key: &str,
    build: impl FnOnce() -> Result<LayerInfo, BuildError>,
) -> Result<(ImageLayer, bool), BuildError> {
    let key_digest = Digest::of(key.as_bytes());
    let path = cache_dir.join(format!("{}.json", key_digest.hex()));
    if let Ok(text) = std::fs::read(&path)
        && let Ok(c) = serde_json::from_slice::<CachedLayer>(&text)
        && layout.blob_size(&c.digest).ok() == Some(c.size)
    {
        let layer = ImageLayer {
            digest: c.digest,
            diff_id: c.diff_id,
            size: c.size,
            media_type: c.media_type,
            created_by: String::new(),
        };
        return Ok((layer, true));
    }
    let info = build()?;
    std::fs::create_dir_all(cache_dir)
        .map_err(|e| BuildError::Failed(format!("creating {}: {e}", cache_dir.display())))?;
    let c = CachedLayer {
        digest: info.digest.clone(),
        diff_id: info.diff_id.clone(),
        size: info.size,
        media_type: info.media_type.into(),
    };
    layout.write_atomic(&path, &serde_json::to_vec(&c).unwrap_or_default())?;
    Ok((ImageLayer::new(&info, ""), false))
}

/// The uncompressed layer of one model version under `/models/NAME/VERSION/`, reused when an
/// earlier build wrote the same one.
fn model_layer(
    layout: &Layout,
    cache_dir: &Path,
    mv: &ModelVersion,
    mtime: u64,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<(ImageLayer, bool), BuildError> {
    let root = model_root(mv);
    let mut key = format!("{LAYER_FORMAT}\nmodel\n{mtime}\n{root}\n");
    for f in &mv.files {
        key.push_str(&format!("{} {}\n", f.path, f.digest));
    }
    cached_layer(layout, cache_dir, &key, || {
        progress(&format!("writing the model layer of {}:{}", mv.name, mv.version));
        let mut l = LayerBuilder::new();
        for f in &mv.files {
            l.file(&format!("{root}/{}", f.path), Content::Path(layout.blob_path(&f.digest)), false)?;
        }
        Ok(l.write(layout, Compression::None, mtime)?)
    })
}

fn model_root(mv: &ModelVersion) -> String {
    format!("/models/{}/{}", mv.name, mv.version)
}

/// The backend a packaged model will run on: its `[models.NAME]` setting, else `--backend`.
fn choose_backend(
    layout: &Layout,
    user_config: &ConfigFile,
    req: &BuildRequest,
    mv: &ModelVersion,
) -> Result<crate::backends::Selected, BuildError> {
    let file = serving_file(mv)?;
    let choice =
        user_config.models.get(&mv.name).and_then(|m| m.settings.backend).unwrap_or(req.backend.choice);
    let bytes = kiln_runtime_core::read_shared(&layout.blob_path(&file.digest)).map_err(|e| {
        BuildError::Failed(format!("reading {}:{} from the workspace: {e}", mv.name, mv.version))
    })?;
    let model = ModelFile::from_bytes(&file.path, bytes);
    let cfg = BackendConfig { choice, ..req.backend.clone() };
    cfg.select(&model).map_err(|e| BuildError::Invalid(format!("{}:{}: {e}", mv.name, mv.version)))
}

/// The ONNX file of a version that the server loads (the only one, or `model.onnx`).
pub fn serving_file(mv: &ModelVersion) -> Result<&crate::registry::ModelFileEntry, BuildError> {
    let onnx: Vec<_> = mv.files.iter().filter(|f| f.onnx.is_some()).collect();
    match onnx.as_slice() {
        [one] => Ok(one),
        [] => Err(BuildError::Invalid(format!(
            "{}:{} has no ONNX model or accelerator image to serve",
            mv.name, mv.version
        ))),
        many => many
            .iter()
            .find(|f| f.path == "model.onnx" || f.path.ends_with("/model.onnx"))
            .copied()
            .ok_or_else(|| {
                BuildError::Invalid(format!(
                    "{}:{} has several ONNX files and none is model.onnx",
                    mv.name, mv.version
                ))
            }),
    }
}

fn passwd_files(layer: &mut LayerBuilder) -> Result<(), BuildError> {
    layer.file("/etc/passwd", Content::Bytes(b"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n".to_vec()), false)?;
    layer.file("/etc/group", Content::Bytes(b"root:x:0:\nnonroot:x:65532:\n".to_vec()), false)?;
    Ok(())
}

/// Builds and records an image. `progress` receives one line per step.
pub async fn build(
    ws: &Workspace,
    req: &BuildRequest,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<BuildReport, BuildError> {
    check_tag(&req.tag)?;
    let existing = ws.layout().index()?.into_iter().find(|e| e.name == req.tag);
    if existing.is_some() && !req.force {
        return Err(BuildError::Invalid(format!("image {} exists; pass --force to replace it", req.tag)));
    }
    let mtime = source_date_epoch().map_err(BuildError::Invalid)?;
    let created = image::rfc3339(mtime as i64);
    let user_config = match &req.config {
        Some(p) => ConfigFile::read(p).map_err(BuildError::Invalid)?,
        None => ConfigFile::default(),
    };
    if user_config.serve.model_repository.is_some() {
        return Err(BuildError::Invalid(
            "[serve] model_repository cannot be packaged; list the models with --model".into(),
        ));
    }
    if req.models.is_empty() {
        return Err(BuildError::Invalid("no models to package: give --model NAME[:VERSION]".into()));
    }

    // Models, and which engine each needs. Choosing reads and parses every model, and writing
    // the model layers reads, hashes and stores them again: for large models each takes
    // seconds, so the layers are written on a second thread while the backends are chosen.
    let mut found = Vec::new();
    for (name, version) in &req.models {
        let mv = ws.show(name, *version)?;
        serving_file(&mv)?;
        found.push(mv);
    }
    let layout = ws.layout().clone();
    let cache_dir = ws.root().join("cache/layers");
    let (model_layers, selected) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            found
                .iter()
                .map(|mv| model_layer(&layout, &cache_dir, mv, mtime, progress))
                .collect::<Result<Vec<_>, BuildError>>()
        });
        let selected =
            found.iter().map(|mv| choose_backend(&layout, &user_config, req, mv)).collect::<Vec<_>>();
        let layers = writer
            .join()
            .unwrap_or_else(|_| Err(BuildError::Failed("the model layer writer panicked".into())));
        (layers, selected)
    });
    let mut versions = Vec::new();
    let mut needs_ort = false;
    for (mv, selected) in found.into_iter().zip(selected) {
        let selected = selected?;
        progress(&format!(
            "{}:{} will run on {} ({})",
            mv.name,
            mv.version,
            selected.backend.name(),
            selected.reason
        ));
        needs_ort |= selected.backend.name() == "ort";
        versions.push((mv, selected.backend.name()));
    }
    let model_layers = model_layers?;
    let ort_lib = if needs_ort { kiln_runtime_ort::OrtBackend::loaded_library() } else { None };
    if needs_ort && ort_lib.is_none() {
        return Err(BuildError::Failed("a model needs ONNX Runtime, but its library was not loaded".into()));
    }

    let mut spec = ImageSpec { created: created.clone(), user: USER.into(), ..Default::default() };

    // Base.
    if let Some(base) = &req.base {
        let reference =
            kiln_images::registry::parse_reference(base).map_err(|e| BuildError::Invalid(e.to_string()))?;
        progress(&format!("pulling base {reference}"));
        let registry = kiln_images::registry::Registry::new(
            kiln_images::registry::RegistryOptions::from_env(req.insecure_registry),
        );
        let (config, layers, digest) =
            kiln_images::base::pull(&registry, &reference, ws.layout()).await.map_err(|e| match e {
                kiln_images::base::BaseError::Refused { .. } => BuildError::Invalid(e.to_string()),
                kiln_images::base::BaseError::Registry(kiln_images::registry::RegistryError::NotFound(_)) => {
                    BuildError::Invalid(e.to_string())
                }
                other => BuildError::Failed(other.to_string()),
            })?;
        spec.annotations.insert("org.opencontainers.image.base.name".into(), base.clone());
        spec.annotations.insert("org.opencontainers.image.base.digest".into(), digest.to_string());
        spec.base_config = Some(config);
        spec.base_layers = layers;
    }

    let mut report_layers = Vec::new();

    // Runtime layer: this binary, its shared libraries and the loader, ONNX Runtime if needed.
    let kiln_binary = match &req.kiln_binary {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| BuildError::Failed(format!("cannot find the running kiln binary: {e}")))?,
    };
    let extra: Vec<PathBuf> = ort_lib.iter().cloned().collect();
    let libs = elf::closure(&kiln_binary, &extra).map_err(BuildError::Failed)?;
    let mut key = format!("{LAYER_FORMAT}\nruntime\n{mtime}\n");
    for p in std::iter::once(&kiln_binary).chain(libs.keys()).chain(extra.iter()) {
        let bytes =
            std::fs::read(p).map_err(|e| BuildError::Failed(format!("reading {}: {e}", p.display())))?;
        key.push_str(&format!("{} {}\n", p.display(), Digest::of(&bytes)));
    }
    let (runtime, cached) = cached_layer(&layout, &cache_dir, &key, || {
        progress("writing the runtime layer");
        let mut l = LayerBuilder::new();
        l.file(KILN_PATH, Content::Path(kiln_binary.clone()), true)?;
        for (host, in_image) in &libs {
            l.file(&in_image.to_string_lossy(), Content::Path(host.clone()), true)?;
        }
        if let Some(ort) = &ort_lib {
            l.file(ORT_PATH, Content::Path(ort.clone()), true)?;
        }
        passwd_files(&mut l)?;
        l.dir("/tmp")?;
        Ok(l.write(ws.layout(), Compression::Gzip, mtime)?)
    })?;
    let runtime_desc = if needs_ort { "kiln runtime + ONNX Runtime" } else { "kiln runtime" };
    report_layers.push(LayerReport {
        content: runtime_desc.into(),
        digest: runtime.digest.to_string(),
        size: runtime.size,
        cached,
    });
    spec.layers.push(ImageLayer {
        created_by: format!("{runtime_desc}: {KILN_PATH} and {} shared libraries", libs.len()),
        ..runtime
    });

    // One layer per model version.
    let mut serve_models = toml::Table::new();
    for ((mv, backend), (layer, cached)) in versions.iter().zip(model_layers) {
        let root = model_root(mv);
        report_layers.push(LayerReport {
            content: format!("model {}:{}", mv.name, mv.version),
            digest: layer.digest.to_string(),
            size: layer.size,
            cached,
        });
        spec.layers
            .push(ImageLayer { created_by: format!("model {}:{} at {root}", mv.name, mv.version), ..layer });
        let file = serving_file(mv)?;
        let mut section = toml::Table::new();
        section.insert("path".into(), format!("{root}/{}", file.path).into());
        section.insert("version".into(), mv.version.to_string().into());
        section.insert("backend".into(), (*backend).into());
        if let Some(own) = user_config.models.get(&mv.name) {
            let s = &own.settings;
            if let Some(v) = s.instances {
                section.insert("instances".into(), (v as i64).into());
            }
            if let Some(v) = s.max_batch_size {
                section.insert("max_batch_size".into(), (v as i64).into());
            }
            if let Some(v) = s.max_queue_delay_us {
                section.insert("max_queue_delay_us".into(), (v as i64).into());
            }
            if let Some(v) = s.max_queue {
                section.insert("max_queue".into(), (v as i64).into());
            }
        }
        serve_models.insert(mv.name.clone(), section.into());
        spec.labels.insert(format!("dev.kiln.model.{}.version", mv.name), mv.version.to_string());
        spec.labels.insert(format!("dev.kiln.model.{}.digest", mv.name), file.digest.to_string());
    }

    // Configuration layer: the user's [serve] settings plus the packaged models.
    let mut doc = toml::Table::new();
    if let Some(p) = &req.config {
        let text = std::fs::read_to_string(p)
            .map_err(|e| BuildError::Invalid(format!("cannot read {}: {e}", p.display())))?;
        let user: toml::Table =
            toml::from_str(&text).map_err(|e| BuildError::Invalid(format!("{}: {e}", p.display())))?;
        if let Some(serve) = user.get("serve") {
            doc.insert("serve".into(), serve.clone());
        }
    }
    let mut serve_table = doc.get("serve").and_then(|s| s.as_table()).cloned().unwrap_or_default();
    if !serve_table.contains_key("listen") {
        serve_table.insert("listen".into(), crate::serve::config::DEFAULT_LISTEN.into());
    }
    let port = serve_table
        .get("listen")
        .and_then(|l| l.as_str())
        .and_then(|l| l.rsplit(':').next())
        .unwrap_or("8080")
        .to_string();
    doc.insert("serve".into(), serve_table.into());
    doc.insert("models".into(), serve_models.into());
    let config_text = format!(
        "# Generated by kiln image build: the models packaged in this image.\n{}",
        toml::to_string(&doc).map_err(|e| BuildError::Failed(e.to_string()))?
    );
    let mut l = LayerBuilder::new();
    l.file(CONFIG_PATH, Content::Bytes(config_text.into_bytes()), false)?;
    let info = l.write(ws.layout(), Compression::Gzip, mtime)?;
    report_layers.push(LayerReport {
        content: "serving configuration".into(),
        digest: info.digest.to_string(),
        size: info.size,
        cached: false,
    });
    spec.layers.push(ImageLayer::new(&info, format!("serving configuration at {CONFIG_PATH}")));

    spec.entrypoint = vec![KILN_PATH.into(), "serve".into(), "--config".into(), CONFIG_PATH.into()];
    spec.exposed_ports = vec![format!("{port}/tcp")];
    spec.env = vec!["PATH=/usr/local/bin:/usr/bin:/bin".into(), "KILN_LOG_FORMAT=json".into()];
    if needs_ort {
        spec.env.push(format!("ORT_DYLIB_PATH={ORT_PATH}"));
    }
    let (image_name, image_tag) = req.tag.rsplit_once(':').unwrap_or((&req.tag, "latest"));
    let models_text =
        versions.iter().map(|(m, _)| format!("{}:{}", m.name, m.version)).collect::<Vec<_>>().join(",");
    for (k, v) in [
        ("org.opencontainers.image.created", created.clone()),
        ("org.opencontainers.image.title", image_name.to_string()),
        ("org.opencontainers.image.version", image_tag.to_string()),
        ("org.opencontainers.image.description", format!("kiln serving {models_text}")),
        ("dev.kiln.models", models_text.clone()),
    ] {
        spec.labels.insert(k.into(), v.clone());
        spec.annotations.insert(k.into(), v);
    }
    let built = image::assemble(ws.layout(), &spec)?;
    progress(&format!("image {} is {}", req.tag, built.digest));

    // Record: references first, so a model is never unprotected while an image lists it.
    for (mv, _) in &versions {
        ws.add_reference(&mv.name, mv.version, "image", &req.tag)?;
    }
    if let Some(old) = &existing {
        tracing::info!(tag = %req.tag, old = %old.digest, new = %built.digest, "replacing the image tag");
    }
    let mut annotations = BTreeMap::new();
    annotations.insert("org.opencontainers.image.created".to_string(), created);
    ws.layout().set_index_entry(&IndexEntry {
        name: req.tag.clone(),
        media_type: image::MEDIA_MANIFEST.into(),
        digest: built.digest.clone(),
        size: built.size,
        annotations,
    })?;
    // A replaced tag may have used other models: drop references this image no longer has.
    let current: std::collections::BTreeSet<String> =
        versions.iter().map(|(m, _)| format!("{}:{}", m.name, m.version)).collect();
    ws.retain_references("image", &req.tag, &current)?;
    let compressed_size = built.layers.iter().map(|l| l.size).sum::<u64>()
        + ws.layout().blob_size(&built.config).unwrap_or(0)
        + built.size;
    Ok(BuildReport {
        tag: req.tag.clone(),
        digest: built.digest.to_string(),
        compressed_size,
        layers: report_layers,
    })
}

/// Where a model's files sit inside an image (for tests and `image show`).
pub fn model_dir(name: &str, version: i64) -> PathBuf {
    Path::new("/models").join(name).join(version.to_string())
}
