//! Base images: pulled by tag or digest, every digest verified, every layer checked for entries
//! that would write outside the root filesystem when unpacked.

use std::io::Read;

use oci_client::Reference;
use oci_spec::image::ImageConfiguration;
use serde_json::Value;

use crate::digest::Digest;
use crate::image::{ImageLayer, MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST, MEDIA_INDEX, MEDIA_MANIFEST};
use crate::layout::Layout;
use crate::registry::{Registry, RegistryError};

/// Why a base image is refused.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    /// Registry or storage trouble.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The image is not usable as a base.
    #[error("base image {reference}: {reason}")]
    Refused {
        /// The base reference.
        reference: String,
        /// Why.
        reason: String,
    },
}

/// A hostile or unsupported entry in a layer.
pub fn check_entry(path: &[u8], kind: tar::EntryType, link: Option<&[u8]>) -> Result<(), String> {
    let name = String::from_utf8_lossy(path);
    let components: Vec<&str> = name.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    if name.starts_with('/') {
        return Err(format!("entry {name:?} has an absolute path"));
    }
    if components.contains(&"..") {
        return Err(format!("entry {name:?} has a '..' component"));
    }
    match kind {
        tar::EntryType::Char | tar::EntryType::Block => {
            return Err(format!("entry {name:?} is a device file"));
        }
        tar::EntryType::Fifo => return Err(format!("entry {name:?} is a FIFO")),
        _ => {}
    }
    if let Some(target) = link {
        let target = String::from_utf8_lossy(target);
        let escapes = |start_depth: isize, t: &str| {
            let mut depth = start_depth;
            for c in t.split('/').filter(|c| !c.is_empty() && *c != ".") {
                depth += if c == ".." { -1 } else { 1 };
                if depth < 0 {
                    return true;
                }
            }
            false
        };
        match kind {
            tar::EntryType::Symlink => {
                let from = if target.starts_with('/') { 0 } else { components.len() as isize - 1 };
                if escapes(from, &target) {
                    return Err(format!("symlink {name:?} -> {target:?} escapes the root filesystem"));
                }
            }
            tar::EntryType::Link if (target.starts_with('/') || escapes(0, &target)) => {
                return Err(format!("hard link {name:?} -> {target:?} points outside the layer"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Scans a stored layer; the first hostile entry refuses it.
pub fn check_layer(layout: &Layout, digest: &Digest, media_type: &str) -> Result<usize, String> {
    let file = layout.open_blob(digest).map_err(|e| e.to_string())?;
    let reader: Box<dyn Read> = if media_type.contains("gzip") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else if media_type.ends_with(".tar")
        || media_type.ends_with("tar.diff")
        || media_type.contains("rootfs.diff.tar")
    {
        Box::new(file)
    } else {
        return Err(format!(
            "layer {digest} has media type {media_type}, which kiln cannot check (use gzip or plain tar layers)"
        ));
    };
    let mut archive = tar::Archive::new(reader);
    let mut n = 0;
    for entry in archive.entries().map_err(|e| format!("layer {digest}: {e}"))? {
        let entry = entry.map_err(|e| format!("layer {digest} is not a valid tar: {e}"))?;
        let path = entry.path_bytes().into_owned();
        let link = entry.link_name_bytes().map(|l| l.into_owned());
        check_entry(&path, entry.header().entry_type(), link.as_deref())
            .map_err(|e| format!("layer {digest}: {e}"))?;
        n += 1;
    }
    Ok(n)
}

/// Pulls a base image (choosing linux/amd64 from an index) into the layout and checks it.
pub async fn pull(
    registry: &Registry,
    reference: &Reference,
    layout: &Layout,
) -> Result<(ImageConfiguration, Vec<ImageLayer>, Digest), BaseError> {
    let refused = |reason: String| BaseError::Refused { reference: reference.to_string(), reason };
    let accept = [MEDIA_MANIFEST, MEDIA_INDEX, MEDIA_DOCKER_MANIFEST, MEDIA_DOCKER_LIST];
    registry.login(reference, false).await?;
    let (mut bytes, mut digest) = registry.pull_manifest(reference, &accept).await?;
    let mut manifest: Value =
        serde_json::from_slice(&bytes).map_err(|e| refused(format!("manifest is not JSON: {e}")))?;
    if manifest["manifests"].is_array() {
        let pick = manifest["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == "amd64")
            .and_then(|m| m["digest"].as_str())
            .ok_or_else(|| refused("the image index has no linux/amd64 image".into()))?
            .to_string();
        let by_digest: Reference =
            format!("{}/{}@{pick}", reference.resolve_registry(), reference.repository())
                .parse()
                .map_err(|e| refused(format!("{e}")))?;
        (bytes, digest) = registry.pull_manifest(&by_digest, &accept).await?;
        manifest =
            serde_json::from_slice(&bytes).map_err(|e| refused(format!("manifest is not JSON: {e}")))?;
    }
    layout.put_bytes(&bytes).map_err(RegistryError::from)?;
    let config_digest = Digest::parse(manifest["config"]["digest"].as_str().unwrap_or_default())
        .map_err(|e| refused(e.to_string()))?;
    registry
        .pull_blob(
            reference,
            layout,
            &config_digest,
            manifest["config"]["size"].as_u64().unwrap_or(0),
            "config",
        )
        .await?;
    let config_bytes = layout.read_blob(&config_digest).map_err(RegistryError::from)?;
    let config: ImageConfiguration = serde_json::from_slice(&config_bytes)
        .map_err(|e| refused(format!("config is not an OCI image config: {e}")))?;
    let diff_ids = config.rootfs().diff_ids().clone();
    let descs = manifest["layers"].as_array().cloned().unwrap_or_default();
    if diff_ids.len() != descs.len() {
        return Err(refused(format!("{} layers but {} diff IDs in the config", descs.len(), diff_ids.len())));
    }
    let mut layers = Vec::new();
    for (desc, diff) in descs.iter().zip(diff_ids) {
        let d =
            Digest::parse(desc["digest"].as_str().unwrap_or_default()).map_err(|e| refused(e.to_string()))?;
        let media_type = desc["mediaType"].as_str().unwrap_or_default().to_string();
        registry.pull_blob(reference, layout, &d, desc["size"].as_u64().unwrap_or(0), &media_type).await?;
        check_layer(layout, &d, &media_type).map_err(refused)?;
        layers.push(ImageLayer {
            diff_id: Digest::parse(&diff).map_err(|e| refused(e.to_string()))?,
            size: desc["size"].as_u64().unwrap_or(0),
            digest: d,
            media_type,
            created_by: format!("base {reference}"),
        });
    }
    Ok((config, layers, digest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tar::EntryType as T;

    #[test]
    fn hostile_entries_are_named() {
        assert!(check_entry(b"usr/bin/x", T::Regular, None).is_ok());
        assert!(check_entry(b"./etc/passwd", T::Regular, None).is_ok());
        assert!(
            check_entry(b"usr/lib/libc.so", T::Symlink, Some(b"/lib/x86_64-linux-gnu/libc.so.6")).is_ok()
        );
        assert!(check_entry(b"usr/lib/a", T::Symlink, Some(b"../../etc/x")).is_ok());
        for (p, k, l, why) in [
            (&b"../evil"[..], T::Regular, None, "'..'"),
            (b"/etc/evil", T::Regular, None, "absolute path"),
            (b"dev/sda", T::Block, None, "device file"),
            (b"dev/tty", T::Char, None, "device file"),
            (b"usr/lib/a", T::Symlink, Some(&b"../../../etc/shadow"[..]), "escapes"),
            (b"a", T::Symlink, Some(&b"/../../host"[..]), "escapes"),
            (b"a", T::Link, Some(&b"/etc/shadow"[..]), "outside"),
        ] {
            let e = check_entry(p, k, l).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }
}
