//! Models as OCI artifacts in the CNCF ModelPack format, so any OCI registry (distribution,
//! Harbor, ACR, ECR) serves as the shared model registry.
//!
//! A model version becomes: a config blob (`application/vnd.cncf.model.config.v1+json`) with the
//! ModelPack descriptor, one uncompressed layer per file (`org.cncf.model.filepath` names it),
//! and a manifest with `artifactType` `application/vnd.cncf.model.manifest.v1+json` whose
//! annotations carry name, version, description, tags and properties, so they survive a round
//! trip exactly. Manifest and config are canonical JSON (sorted keys, no spaces) and stored in
//! the workspace's layout before pushing, so the bytes pushed are the bytes hashed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use bytes::Bytes;
use kiln_images::digest::Digest;
use kiln_images::layout::{IndexEntry, Layout, LayoutError};
use kiln_images::registry::{BlobPush, Registry};
use serde_json::{Value, json};

use super::{ModelFileEntry, ModelRef, ModelVersion, Registration, RegistryError, Workspace};

/// The manifest's artifact type.
pub const ARTIFACT_TYPE: &str = "application/vnd.cncf.model.manifest.v1+json";
/// The config blob's media type.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.cncf.model.config.v1+json";
/// Model weights, uncompressed.
pub const WEIGHT_RAW: &str = "application/vnd.cncf.model.weight.v1.raw";
/// Files that configure the weights (JSON, YAML, tokenizers...), uncompressed.
pub const WEIGHT_CONFIG_RAW: &str = "application/vnd.cncf.model.weight.config.v1.raw";
/// Code (scoring scripts), uncompressed.
pub const CODE_RAW: &str = "application/vnd.cncf.model.code.v1.raw";
/// Documentation, uncompressed.
pub const DOC_RAW: &str = "application/vnd.cncf.model.doc.v1.raw";
/// OCI image manifest media type.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Layer annotation naming the file.
pub const FILEPATH: &str = "org.cncf.model.filepath";

const ANN_NAME: &str = "dev.kiln.model.name";
const ANN_VERSION: &str = "dev.kiln.model.version";
const ANN_TAGS: &str = "dev.kiln.model.tags";
const ANN_PROPERTIES: &str = "dev.kiln.model.properties";
const ANN_DESCRIPTION: &str = "org.opencontainers.image.description";
const ANN_CREATED: &str = "org.opencontainers.image.created";

fn media_type_for(path: &str) -> &'static str {
    let ext = Path::new(path).extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
    match ext.as_str() {
        "onnx" | "bin" | "safetensors" | "pt" | "pth" | "pb" | "gguf" | "npy" | "npz" | "h5" | "ckpt" => {
            WEIGHT_RAW
        }
        "py" | "sh" | "r" | "js" => CODE_RAW,
        "md" | "txt" | "rst" | "pdf" => DOC_RAW,
        _ => WEIGHT_CONFIG_RAW,
    }
}

/// Canonical JSON: serde_json's maps are sorted (no `preserve_order`), compact output.
fn canonical(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// The config and manifest of a model version, stored in the workspace layout.
pub struct BuiltArtifact {
    /// Manifest bytes (canonical JSON).
    pub manifest: Bytes,
    /// Manifest digest.
    pub digest: Digest,
    /// Config digest.
    pub config: Digest,
    /// Layer digests, in manifest order.
    pub layers: Vec<Digest>,
}

/// Builds the ModelPack manifest of `mv` and stores config and manifest as blobs.
pub fn build(layout: &Layout, mv: &ModelVersion) -> Result<BuiltArtifact, RegistryError> {
    let diff_ids: Vec<String> = mv.files.iter().map(|f| f.digest.to_string()).collect();
    let has_onnx = mv.files.iter().any(|f| f.onnx.is_some());
    let config = json!({
        "descriptor": {
            "createdAt": mv.created_at,
            "name": mv.name,
            "version": mv.version.to_string(),
            "description": mv.description,
        },
        "config": if has_onnx { json!({"format": "onnx"}) } else { json!({}) },
        "modelfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config_bytes = canonical(&config);
    let config_digest = layout.put_bytes(&config_bytes)?;
    let layers: Vec<Value> = mv
        .files
        .iter()
        .map(|f| {
            json!({
                "mediaType": media_type_for(&f.path),
                "digest": f.digest.to_string(),
                "size": f.size,
                "annotations": {FILEPATH: f.path},
            })
        })
        .collect();
    let mut annotations = serde_json::Map::new();
    annotations.insert(ANN_NAME.into(), mv.name.clone().into());
    annotations.insert(ANN_VERSION.into(), mv.version.to_string().into());
    annotations.insert(ANN_CREATED.into(), mv.created_at.clone().into());
    annotations.insert("org.opencontainers.image.title".into(), mv.name.clone().into());
    annotations.insert("org.opencontainers.image.version".into(), mv.version.to_string().into());
    if !mv.description.is_empty() {
        annotations.insert(ANN_DESCRIPTION.into(), mv.description.clone().into());
    }
    annotations
        .insert(ANN_TAGS.into(), String::from_utf8(canonical(&json!(mv.tags))).unwrap_or_default().into());
    annotations.insert(
        ANN_PROPERTIES.into(),
        String::from_utf8(canonical(&json!(mv.properties))).unwrap_or_default().into(),
    );
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest.to_string(), "size": config_bytes.len()},
        "layers": layers,
        "annotations": annotations,
    });
    let manifest_bytes = canonical(&manifest);
    let digest = layout.put_bytes(&manifest_bytes)?;
    Ok(BuiltArtifact {
        manifest: Bytes::from(manifest_bytes),
        digest,
        config: config_digest,
        layers: mv.files.iter().map(|f| f.digest.clone()).collect(),
    })
}

/// What a push did.
#[derive(Debug, Default, serde::Serialize)]
pub struct PushReport {
    /// Manifest digest in the registry.
    pub digest: String,
    /// Blobs uploaded.
    pub uploaded: usize,
    /// Blobs the registry already had.
    pub skipped: usize,
    /// Blobs mounted from another repository.
    pub mounted: usize,
    /// Bytes uploaded.
    pub bytes_uploaded: u64,
}

/// Called with (file, bytes sent, file size) during a push.
pub type PushProgress = std::sync::Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

/// Pushes a model version to `reference`.
pub async fn push(
    ws: &Workspace,
    mv: &ModelVersion,
    registry: &Registry,
    reference: &oci_client::Reference,
    progress: PushProgress,
) -> Result<PushReport, anyhow::Error> {
    let built = build(ws.layout(), mv)?;
    registry.login(reference, true).await?;
    let mut report = PushReport::default();
    let mut blobs: Vec<(Digest, String)> =
        mv.files.iter().map(|f| (f.digest.clone(), f.path.clone())).collect();
    blobs.push((built.config.clone(), "config".into()));
    let mut seen = BTreeSet::new();
    for (digest, label) in blobs {
        if !seen.insert(digest.clone()) {
            continue;
        }
        let size = ws.layout().blob_size(&digest)?;
        let p = progress.clone();
        let on_bytes: kiln_images::registry::Progress = std::sync::Arc::new(move |n| p(&label, n, size));
        let outcome = registry.push_blob(reference, ws.layout(), &digest, None, on_bytes).await?;
        match outcome {
            BlobPush::Present => report.skipped += 1,
            BlobPush::Mounted => report.mounted += 1,
            BlobPush::Uploaded => {
                report.uploaded += 1;
                report.bytes_uploaded += size;
            }
        }
    }
    let digest = registry.push_manifest(reference, built.manifest.clone(), MANIFEST_MEDIA_TYPE).await?;
    report.digest = digest.to_string();
    Ok(report)
}

fn annotation<'a>(manifest: &'a Value, key: &str) -> Option<&'a str> {
    manifest["annotations"][key].as_str()
}

/// Pulls a model artifact into the workspace under its original name and version. If that
/// version exists locally with the same files, nothing changes; with other files, it is an error.
pub async fn pull(
    ws: &mut Workspace,
    registry: &Registry,
    reference: &oci_client::Reference,
) -> Result<(ModelRef, bool), anyhow::Error> {
    registry.login(reference, false).await?;
    let (bytes, digest) = registry.pull_manifest(reference, &[MANIFEST_MEDIA_TYPE]).await?;
    let manifest: Value = serde_json::from_slice(&bytes)
        .map_err(|e| anyhow::anyhow!("{reference}: the manifest is not JSON: {e}"))?;
    if manifest["artifactType"] != ARTIFACT_TYPE {
        anyhow::bail!(
            "{reference} is not a model artifact (artifactType {}, expected {ARTIFACT_TYPE})",
            manifest["artifactType"]
        );
    }
    let name = annotation(&manifest, ANN_NAME)
        .ok_or_else(|| anyhow::anyhow!("{reference}: the manifest has no {ANN_NAME} annotation"))?
        .to_string();
    super::check_name(&name)?;
    let version: i64 = annotation(&manifest, ANN_VERSION)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{reference}: the manifest has no valid {ANN_VERSION} annotation"))?;
    let parse_map = |key: &str| -> Result<BTreeMap<String, String>, anyhow::Error> {
        match annotation(&manifest, key) {
            Some(s) => {
                serde_json::from_str(s).map_err(|e| anyhow::anyhow!("{reference}: annotation {key}: {e}"))
            }
            None => Ok(BTreeMap::new()),
        }
    };
    let reg = Registration {
        name: name.clone(),
        description: annotation(&manifest, ANN_DESCRIPTION).unwrap_or_default().to_string(),
        tags: parse_map(ANN_TAGS)?,
        properties: parse_map(ANN_PROPERTIES)?,
    };
    let created = annotation(&manifest, ANN_CREATED).map(str::to_string).unwrap_or_else(super::now_rfc3339);
    let config = &manifest["config"];
    let config_digest = Digest::parse(config["digest"].as_str().unwrap_or_default())?;
    registry
        .pull_blob(
            reference,
            ws.layout(),
            &config_digest,
            config["size"].as_u64().unwrap_or(0),
            CONFIG_MEDIA_TYPE,
        )
        .await?;
    let mut files = Vec::new();
    for layer in manifest["layers"].as_array().into_iter().flatten() {
        let d = Digest::parse(layer["digest"].as_str().unwrap_or_default())?;
        let size = layer["size"].as_u64().unwrap_or(0);
        let path = layer["annotations"][FILEPATH]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("{reference}: layer {d} has no {FILEPATH} annotation"))?;
        if path.is_empty()
            || path.starts_with('/')
            || Path::new(path).components().any(|c| matches!(c, std::path::Component::ParentDir))
        {
            anyhow::bail!("{reference}: layer {d} has an unsafe file path {path:?}");
        }
        registry
            .pull_blob(reference, ws.layout(), &d, size, layer["mediaType"].as_str().unwrap_or(WEIGHT_RAW))
            .await?;
        let ext = Path::new(path).extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        let onnx = match ext.as_deref().and_then(super::ServedKind::from_extension) {
            Some(kind) => kind.describe(&ws.layout().read_blob(&d)?).ok(),
            None => None,
        };
        files.push(ModelFileEntry { path: path.to_string(), digest: d, size, onnx });
    }
    tracing::debug!(%digest, "model artifact pulled");
    match ws.resolve(&name, Some(version)) {
        Ok(_) => {
            let existing = ws.show(&name, Some(version))?;
            let same = existing.files.len() == files.len()
                && existing.files.iter().zip(&files).all(|(a, b)| a.path == b.path && a.digest == b.digest);
            if same {
                Ok((ModelRef { name, version }, false))
            } else {
                anyhow::bail!("{name}:{version} already exists in this workspace with different files")
            }
        }
        Err(RegistryError::NotFound(_)) => {
            Ok((ws.insert_exact_version(&reg, version, &files, &created)?, true))
        }
        Err(e) => Err(e.into()),
    }
}

/// Digests reachable from the layout's `index.json` (images and pulled artifacts).
pub fn blobs_in_index(layout: &Layout) -> Result<BTreeSet<Digest>, LayoutError> {
    layout.blobs_in_index()
}

/// Entries of the layout's `index.json`.
pub fn index_entries(layout: &Layout) -> Result<Vec<IndexEntry>, LayoutError> {
    layout.index()
}
