//! Pushing to and pulling from OCI registries, on `oci-client`.
//!
//! What this adds on top: blobs the registry already has are skipped (HEAD first), blobs can be
//! mounted across repositories, large blobs stream from the local layout in chunks, transient
//! failures (connection refused or reset, 5xx, 429) are retried with exponential backoff — a
//! retried push resumes at the first blob the registry lacks — and every digest is checked: a
//! pushed manifest's digest against the registry's answer, pulled manifests and blobs against the
//! digests that name them.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use tokio::io::AsyncReadExt;

use crate::digest::Digest;
use crate::layout::{Layout, LayoutError};

/// Errors talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The reference does not parse.
    #[error("invalid image reference {reference:?}: {reason}")]
    BadReference {
        /// What the user wrote.
        reference: String,
        /// Why.
        reason: String,
    },
    /// Credentials were refused.
    #[error(
        "registry {registry} refused the credentials ({detail}); set KILN_REGISTRY_USERNAME and KILN_REGISTRY_PASSWORD"
    )]
    Unauthorized {
        /// Registry host.
        registry: String,
        /// The registry's answer.
        detail: String,
    },
    /// The registry could not be reached or kept failing.
    #[error("registry {registry}: {what} failed after {attempts} attempt(s): {detail}")]
    Unavailable {
        /// Registry host.
        registry: String,
        /// The operation.
        what: String,
        /// Attempts made.
        attempts: u32,
        /// Last error.
        detail: String,
    },
    /// The registry answered, but not with what the protocol says.
    #[error("registry {registry}: {what}: {detail}")]
    Protocol {
        /// Registry host.
        registry: String,
        /// The operation.
        what: String,
        /// What was wrong.
        detail: String,
    },
    /// The manifest or blob does not exist.
    #[error("{0} was not found in the registry")]
    NotFound(String),
    /// Local storage failed (or pulled content did not match its digest).
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

/// How to reach a registry.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// Plain HTTP (for registries on loopback); only when asked for explicitly.
    pub insecure: bool,
    /// Basic credentials; anonymous when `None`.
    pub credentials: Option<(String, String)>,
    /// Attempts per operation (at least 1).
    pub attempts: u32,
    /// First backoff delay; doubled per retry.
    pub backoff: Duration,
}

impl RegistryOptions {
    /// Options from flags and the environment (`KILN_REGISTRY_USERNAME`, `KILN_REGISTRY_PASSWORD`,
    /// `KILN_REGISTRY_ATTEMPTS`, default 5).
    pub fn from_env(insecure: bool) -> Self {
        let user = std::env::var("KILN_REGISTRY_USERNAME").ok().filter(|u| !u.is_empty());
        let pass = std::env::var("KILN_REGISTRY_PASSWORD").unwrap_or_default();
        RegistryOptions {
            insecure,
            credentials: user.map(|u| (u, pass)),
            attempts: std::env::var("KILN_REGISTRY_ATTEMPTS").ok().and_then(|v| v.parse().ok()).unwrap_or(5),
            backoff: Duration::from_millis(500),
        }
    }
}

/// Called with the bytes of a blob sent so far.
pub type Progress = std::sync::Arc<dyn Fn(u64) + Send + Sync>;

/// What happened to one blob of a push.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobPush {
    /// The registry had it: nothing sent.
    Present,
    /// Mounted from another repository of the same registry.
    Mounted,
    /// Uploaded.
    Uploaded,
}

/// A registry connection.
pub struct Registry {
    client: Client,
    auth: RegistryAuth,
    options: RegistryOptions,
}

/// Parses `host[:port]/repo[:tag|@digest]`; the registry host is required.
pub fn parse_reference(s: &str) -> Result<Reference, RegistryError> {
    let bad = |reason: String| RegistryError::BadReference { reference: s.to_string(), reason };
    let first = s.split('/').next().unwrap_or_default();
    if !s.contains('/') || !(first.contains('.') || first.contains(':') || first == "localhost") {
        return Err(bad("expected REGISTRY/REPOSITORY[:TAG], e.g. 127.0.0.1:5000/models/iris:1".into()));
    }
    s.parse::<Reference>().map_err(|e| bad(e.to_string()))
}

/// The HTTP status inside an error, whichever way oci-client wrapped it.
fn status(e: &OciDistributionError) -> Option<u16> {
    match e {
        OciDistributionError::RequestError(r) => r.status().map(|s| s.as_u16()),
        OciDistributionError::ServerError { code, .. } => Some(*code),
        _ => None,
    }
}

fn retryable(e: &OciDistributionError) -> bool {
    if let Some(code) = status(e) {
        return code >= 500 || code == 429;
    }
    match e {
        OciDistributionError::RequestError(r) => {
            r.is_connect() || r.is_timeout() || r.is_request() || r.is_body()
        }
        OciDistributionError::ServerError { code, .. } => *code >= 500 || *code == 429,
        OciDistributionError::IoError(_) => true,
        _ => false,
    }
}

fn unauthorized(e: &OciDistributionError) -> bool {
    if matches!(status(e), Some(401 | 403)) {
        return true;
    }
    match e {
        OciDistributionError::AuthenticationFailure(_) | OciDistributionError::UnauthorizedError { .. } => {
            true
        }
        OciDistributionError::ServerError { code, .. } => *code == 401 || *code == 403,
        OciDistributionError::RegistryError { envelope, .. } => envelope
            .errors
            .iter()
            .any(|e| matches!(format!("{:?}", e.code).as_str(), "Unauthorized" | "Denied")),
        _ => false,
    }
}

fn not_found(e: &OciDistributionError) -> bool {
    if status(e) == Some(404) {
        return true;
    }
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        OciDistributionError::ServerError { code, .. } => *code == 404,
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| {
            matches!(format!("{:?}", e.code).as_str(), "ManifestUnknown" | "BlobUnknown" | "NameUnknown")
        }),
        _ => false,
    }
}

/// One line per cause, without repeating.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        src = s.source();
    }
    parts.join(": ")
}

impl Registry {
    /// A client for registries reached with `options`.
    pub fn new(options: RegistryOptions) -> Self {
        crate::init_tls();
        let config = ClientConfig {
            protocol: if options.insecure { ClientProtocol::Http } else { ClientProtocol::Https },
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(120)),
            ..Default::default()
        };
        let auth = match &options.credentials {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        };
        Registry {
            client: Client::new(config),
            auth,
            options: RegistryOptions { attempts: options.attempts.max(1), ..options },
        }
    }

    /// Runs `op` with retries on transient failures, mapping errors to what the user can act on.
    async fn retry<T, F, Fut>(&self, reference: &Reference, what: &str, mut op: F) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, OciDistributionError>>,
    {
        let registry = reference.resolve_registry().to_string();
        let mut delay = self.options.backoff;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if unauthorized(&e) => {
                    return Err(RegistryError::Unauthorized { registry, detail: describe(&e) });
                }
                Err(e) if not_found(&e) => return Err(RegistryError::NotFound(reference.to_string())),
                Err(e) if retryable(&e) && attempt < self.options.attempts => {
                    tracing::warn!(registry = %registry, attempt, "{what} failed ({}); retrying in {} ms", describe(&e), delay.as_millis());
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) if retryable(&e) => {
                    return Err(RegistryError::Unavailable {
                        registry,
                        what: what.into(),
                        attempts: attempt,
                        detail: describe(&e),
                    });
                }
                Err(e) => {
                    return Err(RegistryError::Protocol {
                        registry,
                        what: what.into(),
                        detail: describe(&e),
                    });
                }
            }
        }
    }

    /// Authenticates for pushing (or pulling) to `reference`'s repository.
    pub async fn login(&self, reference: &Reference, push: bool) -> Result<(), RegistryError> {
        let op = if push { RegistryOperation::Push } else { RegistryOperation::Pull };
        self.retry(reference, "authentication", || self.client.auth(reference, &self.auth, op))
            .await
            .map(|_| ())
    }

    /// Pushes one blob from the layout unless the registry already has it; tries a
    /// cross-repository mount from `mount_from` first. `progress` gets bytes sent so far.
    pub async fn push_blob(
        &self,
        reference: &Reference,
        layout: &Layout,
        digest: &Digest,
        mount_from: Option<&Reference>,
        progress: Progress,
    ) -> Result<BlobPush, RegistryError> {
        let d = digest.to_string();
        let size = layout.blob_size(digest)?;
        // Re-checked on every attempt: a retried push resumes where the registry stands.
        let exists = self
            .retry(reference, &format!("checking blob {d}"), || self.client.blob_exists(reference, &d))
            .await?;
        if exists {
            return Ok(BlobPush::Present);
        }
        if let Some(src) = mount_from
            && src.resolve_registry() == reference.resolve_registry()
            && self.client.mount_blob(reference, src, &d).await.is_ok()
            && self.client.blob_exists(reference, &d).await.unwrap_or(false)
        {
            return Ok(BlobPush::Mounted);
        }
        let path = layout.blob_path(digest);
        self.retry(reference, &format!("uploading blob {d}"), || {
            let path = path.clone();
            let d = d.clone();
            let progress = progress.clone();
            async move {
                let exists = self.client.blob_exists(reference, &d).await?;
                if exists {
                    return Ok(());
                }
                let file = tokio::fs::File::open(&path).await.map_err(OciDistributionError::IoError)?;
                let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
                let stream = futures_util::stream::try_unfold(file, move |mut f| async move {
                    let mut buf = vec![0u8; 4 << 20];
                    let n = f.read(&mut buf).await.map_err(OciDistributionError::IoError)?;
                    if n == 0 {
                        return Ok(None);
                    }
                    buf.truncate(n);
                    Ok(Some((Bytes::from(buf), f)))
                })
                .inspect_ok({
                    let sent = sent.clone();
                    move |chunk: &Bytes| {
                        let total = sent.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed)
                            + chunk.len() as u64;
                        progress(total);
                    }
                });
                self.client.push_blob_stream(reference, stream, &d, Some(size)).await.map(|_| ())
            }
        })
        .await?;
        Ok(BlobPush::Uploaded)
    }

    /// Pushes a manifest as these exact bytes; checks that the registry stored it under the
    /// digest of those bytes.
    pub async fn push_manifest(
        &self,
        reference: &Reference,
        bytes: Bytes,
        media_type: &str,
    ) -> Result<Digest, RegistryError> {
        let digest = Digest::of(&bytes);
        let content_type = http::HeaderValue::from_str(media_type).map_err(|e| RegistryError::Protocol {
            registry: reference.resolve_registry().to_string(),
            what: "manifest".into(),
            detail: e.to_string(),
        })?;
        self.retry(reference, "pushing the manifest", || {
            self.client.push_manifest_raw(reference, bytes.clone(), content_type.clone())
        })
        .await?;
        let stored = self
            .retry(reference, "reading back the manifest digest", || {
                self.client.fetch_manifest_digest(reference, &self.auth)
            })
            .await?;
        if stored != digest.to_string() {
            return Err(RegistryError::Protocol {
                registry: reference.resolve_registry().to_string(),
                what: "pushing the manifest".into(),
                detail: format!(
                    "the registry reports digest {stored}, but the bytes pushed hash to {digest}"
                ),
            });
        }
        Ok(digest)
    }

    /// Pulls a manifest's exact bytes, checking them against the digest the registry gives and,
    /// for a by-digest reference, against that digest.
    pub async fn pull_manifest(
        &self,
        reference: &Reference,
        accept: &[&str],
    ) -> Result<(Bytes, Digest), RegistryError> {
        let (bytes, announced) = self
            .retry(reference, "pulling the manifest", || {
                self.client.pull_manifest_raw(reference, &self.auth, accept)
            })
            .await?;
        let actual = Digest::of(&bytes);
        let protocol = |detail: String| RegistryError::Protocol {
            registry: reference.resolve_registry().to_string(),
            what: "pulling the manifest".into(),
            detail,
        };
        if !announced.is_empty() && announced != actual.to_string() {
            return Err(protocol(format!(
                "the registry announced digest {announced}, the bytes hash to {actual}"
            )));
        }
        if let Some(want) = reference.digest()
            && want != actual.to_string()
        {
            return Err(protocol(format!("asked for {want}, received content hashing to {actual}")));
        }
        Ok((bytes, actual))
    }

    /// Pulls a blob into the layout (unless already there), verifying its digest and size.
    pub async fn pull_blob(
        &self,
        reference: &Reference,
        layout: &Layout,
        digest: &Digest,
        size: u64,
        media_type: &str,
    ) -> Result<(), RegistryError> {
        if layout.contains(digest) {
            return Ok(());
        }
        let descriptor = oci_client::manifest::OciDescriptor {
            media_type: media_type.to_string(),
            digest: digest.to_string(),
            size: size as i64,
            ..Default::default()
        };
        self.retry(reference, &format!("pulling blob {digest}"), || {
            let descriptor = descriptor.clone();
            async move {
                let mut stream = self.client.pull_blob_stream(reference, &descriptor).await?;
                let mut writer =
                    layout.writer().map_err(|e| OciDistributionError::GenericError(Some(e.to_string())))?;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk?;
                    writer
                        .write(&chunk)
                        .map_err(|e| OciDistributionError::GenericError(Some(e.to_string())))?;
                    if writer.size() > size {
                        return Err(OciDistributionError::GenericError(Some(format!(
                            "blob {digest} is larger than the {size} bytes its descriptor says"
                        ))));
                    }
                }
                writer
                    .finish(Some(digest))
                    .map_err(|e| OciDistributionError::GenericError(Some(e.to_string())))?;
                Ok(())
            }
        })
        .await
    }
}
