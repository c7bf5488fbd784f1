//! OCI image configs and manifests, assembled the ko way: append layers to a base, set the
//! entrypoint on a copy of the base config. Written as canonical JSON (sorted keys, no spaces;
//! oci-spec's maps are unordered, so they go through `serde_json::Value`, whose maps are sorted).

use std::collections::BTreeMap;

use oci_spec::image::{
    Arch, ConfigBuilder, HistoryBuilder, ImageConfiguration, ImageConfigurationBuilder, Os, RootFsBuilder,
};
use serde_json::{Value, json};

use crate::digest::Digest;
use crate::layer::LayerInfo;
use crate::layout::{Layout, LayoutError};

/// OCI image manifest media type.
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker schema 2 manifest (accepted for bases).
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list (accepted for bases).
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// A layer of an image: the descriptor fields and its diff ID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageLayer {
    /// Stored digest.
    pub digest: Digest,
    /// Uncompressed digest.
    pub diff_id: Digest,
    /// Stored size.
    pub size: u64,
    /// Media type.
    pub media_type: String,
    /// What made it, for the config's history.
    pub created_by: String,
}

impl ImageLayer {
    /// From a freshly written layer.
    pub fn new(info: &LayerInfo, created_by: impl Into<String>) -> Self {
        ImageLayer {
            digest: info.digest.clone(),
            diff_id: info.diff_id.clone(),
            size: info.size,
            media_type: info.media_type.to_string(),
            created_by: created_by.into(),
        }
    }
}

/// Everything that defines an image.
#[derive(Clone, Debug, Default)]
pub struct ImageSpec {
    /// The base image's config, when not built from scratch.
    pub base_config: Option<ImageConfiguration>,
    /// The base image's layers.
    pub base_layers: Vec<ImageLayer>,
    /// Layers added on top, in order.
    pub layers: Vec<ImageLayer>,
    /// Entrypoint.
    pub entrypoint: Vec<String>,
    /// User (numeric `uid:gid`).
    pub user: String,
    /// Exposed ports (`8080/tcp`).
    pub exposed_ports: Vec<String>,
    /// Environment (`K=V`), overriding the base's for the same keys.
    pub env: Vec<String>,
    /// Labels, merged over the base's.
    pub labels: BTreeMap<String, String>,
    /// Manifest annotations.
    pub annotations: BTreeMap<String, String>,
    /// Creation time (RFC 3339), from `SOURCE_DATE_EPOCH`.
    pub created: String,
}

/// An assembled image, stored in the layout.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    /// Manifest digest (the image's identity).
    pub digest: Digest,
    /// Manifest size.
    pub size: u64,
    /// Config digest.
    pub config: Digest,
    /// Every layer, base first.
    pub layers: Vec<ImageLayer>,
}

fn canonical(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn spec_err(e: impl std::fmt::Display) -> LayoutError {
    LayoutError::NotALayout { path: std::path::PathBuf::from("image config"), reason: e.to_string() }
}

/// Builds config and manifest, stores both, returns the image.
pub fn assemble(layout: &Layout, spec: &ImageSpec) -> Result<BuiltImage, LayoutError> {
    let mut config = spec.base_config.clone().unwrap_or_else(|| {
        ImageConfigurationBuilder::default()
            .architecture(Arch::Amd64)
            .os(Os::Linux)
            .rootfs(
                RootFsBuilder::default()
                    .typ("layers")
                    .diff_ids(Vec::<String>::new())
                    .build()
                    .unwrap_or_default(),
            )
            .build()
            .unwrap_or_default()
    });
    let base_exec = config.config().clone().unwrap_or_default();
    // Environment: the base's, with ours replacing the same names.
    let mut env: Vec<String> = base_exec.env().clone().unwrap_or_default();
    for e in &spec.env {
        let key = e.split('=').next().unwrap_or_default();
        env.retain(|b| b.split('=').next() != Some(key));
        env.push(e.clone());
    }
    let mut labels: BTreeMap<String, String> =
        base_exec.labels().clone().unwrap_or_default().into_iter().collect();
    labels.extend(spec.labels.clone());
    let mut exec = ConfigBuilder::default()
        .user(spec.user.clone())
        .exposed_ports(spec.exposed_ports.clone())
        .env(env)
        .entrypoint(spec.entrypoint.clone())
        .labels(labels.into_iter().collect::<std::collections::HashMap<_, _>>())
        .stop_signal("SIGTERM")
        .working_dir(base_exec.working_dir().clone().unwrap_or_else(|| "/".into()));
    if let Some(v) = base_exec.volumes() {
        exec = exec.volumes(v.clone());
    }
    config.set_config(Some(exec.build().map_err(spec_err)?));
    config.set_created(Some(spec.created.clone()));
    let mut diff_ids: Vec<String> = spec.base_layers.iter().map(|l| l.diff_id.to_string()).collect();
    if spec.base_config.is_some() {
        // The base config's own rootfs is authoritative for its layers.
        diff_ids = config.rootfs().diff_ids().clone();
    }
    diff_ids.extend(spec.layers.iter().map(|l| l.diff_id.to_string()));
    config.set_rootfs(RootFsBuilder::default().typ("layers").diff_ids(diff_ids).build().map_err(spec_err)?);
    let mut history = config.history().clone().unwrap_or_default();
    for l in &spec.layers {
        history.push(
            HistoryBuilder::default()
                .created(spec.created.clone())
                .created_by(l.created_by.clone())
                .comment("kiln image build")
                .build()
                .map_err(spec_err)?,
        );
    }
    config.set_history(Some(history));
    let config_value = serde_json::to_value(&config).map_err(spec_err)?;
    let config_bytes = canonical(&config_value);
    let config_digest = layout.put_bytes(&config_bytes)?;

    let layers: Vec<ImageLayer> = spec.base_layers.iter().chain(&spec.layers).cloned().collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest.to_string(), "size": config_bytes.len()},
        "layers": layers.iter().map(|l| json!({"mediaType": l.media_type, "digest": l.digest.to_string(), "size": l.size})).collect::<Vec<_>>(),
        "annotations": spec.annotations,
    });
    let manifest_bytes = canonical(&manifest);
    let digest = layout.put_bytes(&manifest_bytes)?;
    Ok(BuiltImage { digest, size: manifest_bytes.len() as u64, config: config_digest, layers })
}

/// A manifest read back from the layout.
#[derive(Clone, Debug)]
pub struct StoredImage {
    /// Parsed manifest.
    pub manifest: Value,
    /// Parsed config.
    pub config: Value,
    /// Config digest.
    pub config_digest: Digest,
    /// Layers (digest, size, media type).
    pub layers: Vec<(Digest, u64, String)>,
}

/// Reads an image (manifest + config) from the layout.
pub fn read_image(layout: &Layout, manifest: &Digest) -> Result<StoredImage, LayoutError> {
    let bytes = layout.read_blob(manifest)?;
    let m: Value = serde_json::from_slice(&bytes).map_err(spec_err)?;
    let config_digest =
        Digest::parse(m["config"]["digest"].as_str().unwrap_or_default()).map_err(spec_err)?;
    let config: Value = serde_json::from_slice(&layout.read_blob(&config_digest)?).map_err(spec_err)?;
    let layers = m["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            Ok((
                Digest::parse(l["digest"].as_str().unwrap_or_default()).map_err(spec_err)?,
                l["size"].as_u64().unwrap_or(0),
                l["mediaType"].as_str().unwrap_or_default().to_string(),
            ))
        })
        .collect::<Result<Vec<_>, LayoutError>>()?;
    Ok(StoredImage { manifest: m, config, config_digest, layers })
}

/// Formats Unix seconds as RFC 3339 UTC (civil-from-days, Howard Hinnant's algorithm).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", tod / 3600, tod % 3600 / 60, tod % 60)
}
