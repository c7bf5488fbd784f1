//! Image export (OCI directory, OCI archive, docker archive) and push.

use std::io::Read;
use std::path::Path;

use kiln_images::digest::Digest;
use kiln_images::image::{MEDIA_MANIFEST, StoredImage, read_image};
use kiln_images::layout::{IndexEntry, Layout};
use kiln_images::registry::{BlobPush, Registry};
use serde_json::json;

use super::BuildError;
use crate::registry::Workspace;

/// Export formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An OCI image layout directory (`skopeo copy oci:DIR:TAG ...`).
    OciDir,
    /// The same layout in a tar file (`skopeo copy oci-archive:FILE ...`).
    OciArchive,
    /// `docker save` format (`docker load -i FILE`).
    DockerArchive,
}

/// The index entry of `tag`, or an error listing the tags there are.
pub fn find(ws: &Workspace, tag: &str) -> Result<IndexEntry, BuildError> {
    let index = ws.layout().index()?;
    index.iter().find(|e| e.name == tag).cloned().ok_or_else(|| {
        let tags: Vec<&str> = index.iter().map(|e| e.name.as_str()).collect();
        BuildError::Invalid(format!(
            "no image {tag:?} in the workspace{}",
            if tags.is_empty() { String::new() } else { format!("; images: {}", tags.join(", ")) }
        ))
    })
}

/// The manifest and config of a recorded image.
pub fn load(ws: &Workspace, tag: &str) -> Result<(IndexEntry, StoredImage), BuildError> {
    let entry = find(ws, tag)?;
    let img = read_image(ws.layout(), &entry.digest)?;
    Ok((entry, img))
}

fn copy_blob(src: &Layout, dst: &Layout, d: &Digest) -> Result<(), BuildError> {
    if dst.contains(d) {
        return Ok(());
    }
    let mut f = src.open_blob(d)?;
    dst.put_verified(&mut f, d)?;
    Ok(())
}

fn write_oci_dir(ws: &Workspace, tag: &str, dir: &Path) -> Result<(), BuildError> {
    let (entry, img) = load(ws, tag)?;
    if dir.exists()
        && std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(true)
        && !dir.join("oci-layout").is_file()
    {
        return Err(BuildError::Invalid(format!(
            "{} exists and is not an empty directory or OCI layout",
            dir.display()
        )));
    }
    let out = Layout::open(dir)?;
    copy_blob(ws.layout(), &out, &entry.digest)?;
    copy_blob(ws.layout(), &out, &img.config_digest)?;
    for (d, _, _) in &img.layers {
        copy_blob(ws.layout(), &out, d)?;
    }
    out.set_index_entry(&entry)?;
    Ok(())
}

/// Exports `tag` to `path` in `format`.
pub fn export(ws: &Workspace, tag: &str, format: Format, path: &Path) -> Result<(), BuildError> {
    match format {
        Format::OciDir => write_oci_dir(ws, tag, path),
        Format::OciArchive => {
            let staging = tempfile::tempdir_in(
                path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")),
            )
            .map_err(|e| BuildError::Failed(format!("creating a staging directory: {e}")))?;
            write_oci_dir(ws, tag, staging.path())?;
            write_tar(path, |tar| {
                for rel in ["oci-layout", "index.json"] {
                    append_file(tar, rel, &staging.path().join(rel))?;
                }
                let mut blobs: Vec<_> = std::fs::read_dir(staging.path().join("blobs/sha256"))?
                    .flatten()
                    .map(|e| e.path())
                    .collect();
                blobs.sort();
                for b in blobs {
                    let name = format!(
                        "blobs/sha256/{}",
                        b.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
                    );
                    append_file(tar, &name, &b)?;
                }
                Ok(())
            })
        }
        Format::DockerArchive => {
            let (_, img) = load(ws, tag)?;
            write_tar(path, |tar| {
                let config_name = format!("{}.json", img.config_digest.hex());
                append_bytes(
                    tar,
                    &config_name,
                    &ws.layout().read_blob(&img.config_digest).map_err(std::io::Error::other)?,
                )?;
                let mut layer_names = Vec::new();
                for (d, _, media_type) in &img.layers {
                    let name = format!("{}/layer.tar", d.hex());
                    // docker-archive layers are plain tar: gzip layers are inflated on the way.
                    let blob = ws.layout().open_blob(d).map_err(std::io::Error::other)?;
                    let mut data = Vec::new();
                    if media_type.contains("gzip") {
                        flate2::read::GzDecoder::new(blob).read_to_end(&mut data)?;
                    } else {
                        let mut blob = blob;
                        blob.read_to_end(&mut data)?;
                    }
                    append_bytes(tar, &name, &data)?;
                    layer_names.push(name);
                }
                let manifest = json!([{"Config": config_name, "RepoTags": [tag], "Layers": layer_names}]);
                append_bytes(tar, "manifest.json", &serde_json::to_vec(&manifest).unwrap_or_default())
            })
        }
    }
}

fn write_tar(
    path: &Path,
    fill: impl FnOnce(&mut tar::Builder<std::fs::File>) -> std::io::Result<()>,
) -> Result<(), BuildError> {
    let tmp = path.with_extension("kiln-partial");
    let result = (|| {
        let f = std::fs::File::create(&tmp)?;
        let mut tar = tar::Builder::new(f);
        tar.mode(tar::HeaderMode::Deterministic);
        fill(&mut tar)?;
        let f = tar.into_inner()?;
        f.sync_all()
    })();
    match result {
        Ok(()) => std::fs::rename(&tmp, path)
            .map_err(|e| BuildError::Failed(format!("writing {}: {e}", path.display()))),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(BuildError::Failed(format!("writing {}: {e}", path.display())))
        }
    }
}

fn header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

fn append_bytes(tar: &mut tar::Builder<std::fs::File>, name: &str, data: &[u8]) -> std::io::Result<()> {
    let mut h = header(data.len() as u64);
    tar.append_data(&mut h, name, data)
}

fn append_file(tar: &mut tar::Builder<std::fs::File>, name: &str, path: &Path) -> std::io::Result<()> {
    let f = std::fs::File::open(path)?;
    let mut h = header(f.metadata()?.len());
    tar.append_data(&mut h, name, f)
}

/// What a push did.
#[derive(Debug, Default, serde::Serialize)]
pub struct ImagePushReport {
    /// Manifest digest.
    pub digest: String,
    /// Blobs uploaded.
    pub uploaded: usize,
    /// Blobs the registry had.
    pub skipped: usize,
    /// Blobs mounted from the base's repository.
    pub mounted: usize,
}

/// Pushes `tag` to `reference`: blobs the registry lacks (mounting base layers from the base's
/// repository when it is on the same registry), then the manifest's exact bytes.
pub async fn push(
    ws: &Workspace,
    tag: &str,
    registry: &Registry,
    reference: &oci_client::Reference,
    progress: crate::registry::artifact::PushProgress,
) -> Result<ImagePushReport, anyhow::Error> {
    let (entry, img) = load(ws, tag)?;
    registry.login(reference, true).await?;
    let base = img.manifest["annotations"]["org.opencontainers.image.base.name"]
        .as_str()
        .and_then(|b| kiln_images::registry::parse_reference(b).ok());
    let mut report = ImagePushReport::default();
    let mut blobs: Vec<(Digest, u64)> = img.layers.iter().map(|(d, s, _)| (d.clone(), *s)).collect();
    blobs.push((img.config_digest.clone(), ws.layout().blob_size(&img.config_digest)?));
    for (d, size) in blobs {
        let label = d.hex()[..12].to_string();
        progress(&label, 0, size);
        let p: kiln_images::registry::Progress = {
            let (label, progress) = (label.clone(), progress.clone());
            std::sync::Arc::new(move |n| progress(&label, n, size))
        };
        match registry.push_blob(reference, ws.layout(), &d, base.as_ref(), p).await? {
            BlobPush::Present => report.skipped += 1,
            BlobPush::Mounted => report.mounted += 1,
            BlobPush::Uploaded => report.uploaded += 1,
        }
        progress(&label, size, size);
    }
    let bytes = ws.layout().read_blob(&entry.digest)?;
    let digest = registry.push_manifest(reference, bytes.into(), MEDIA_MANIFEST).await?;
    report.digest = digest.to_string();
    Ok(report)
}
