//! A content-addressed blob store laid out as an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`), so any OCI tool (skopeo, umoci) can read it.
//!
//! Every write goes to a temporary file in `blobs/.tmp/`, is hashed while it is written, fsynced,
//! and renamed to its digest; the directory is fsynced after the rename. A process killed at any
//! point leaves either no blob or a complete one, plus at most a stray temporary file, which
//! [`Layout::verify`] reports and [`Layout::gc`] removes.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;

/// Errors of the blob store.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// An I/O operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Content did not hash to the digest it was stored or announced under.
    #[error("blob {expected} is corrupt: its content hashes to {actual}")]
    Corrupt {
        /// The digest the blob should have.
        expected: Digest,
        /// What it hashes to.
        actual: Digest,
    },
    /// No blob with this digest.
    #[error("blob {0} is not in the store")]
    Missing(Digest),
    /// The directory is not an OCI layout of a version we read.
    #[error("{} is not an OCI image layout: {reason}", path.display())]
    NotALayout {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LayoutError + 'a {
    move |source| LayoutError::Io { what, path: path.to_path_buf(), source }
}

/// The blob store.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

/// A blob being written: hashed as it goes, committed under its digest by [`BlobWriter::finish`],
/// removed if dropped unfinished.
pub struct BlobWriter<'a> {
    layout: &'a Layout,
    file: Option<File>,
    tmp: PathBuf,
    hasher: Sha256,
    size: u64,
    writeback: Option<Writeback>,
    unsynced: u64,
}

/// Start writing a large blob back to disk after this many bytes, so the final fsync does not
/// wait for all of it: the disk works while the CPU hashes and packs the rest.
const WRITEBACK_EVERY: u64 = 64 << 20;

/// A thread that syncs a blob's data while it is still being written. Its errors are not
/// reported: the final `sync_all` in [`BlobWriter::finish`] is the one that counts.
struct Writeback {
    kick: std::sync::mpsc::SyncSender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Writeback {
    fn start(file: &File) -> Option<Self> {
        let clone = file.try_clone().ok()?;
        let (kick, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("blob-writeback".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    let _ = clone.sync_data();
                }
            })
            .ok()?;
        Some(Writeback { kick, thread })
    }

    fn stop(self) {
        drop(self.kick);
        let _ = self.thread.join();
    }
}

impl BlobWriter<'_> {
    /// Appends bytes.
    pub fn write(&mut self, data: &[u8]) -> Result<(), LayoutError> {
        self.hasher.update(data);
        self.size += data.len() as u64;
        let Some(f) = &mut self.file else { return Ok(()) };
        f.write_all(data).map_err(io_err("writing", &self.tmp))?;
        self.unsynced += data.len() as u64;
        if self.unsynced >= WRITEBACK_EVERY {
            self.unsynced = 0;
            if self.writeback.is_none() {
                self.writeback = Writeback::start(f);
            }
            if let Some(w) = &self.writeback {
                // A sync already pending covers these bytes too: never queue more than one.
                let _ = w.kick.try_send(());
            }
        }
        Ok(())
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Syncs and stores the blob; with `expected`, refuses content that hashes otherwise.
    pub fn finish(mut self, expected: Option<&Digest>) -> Result<(Digest, u64), LayoutError> {
        let file = self.file.take();
        if let Some(w) = self.writeback.take() {
            w.stop();
        }
        let actual = Digest::sha256_from(std::mem::take(&mut self.hasher).finalize().into());
        if let Some(expected) = expected
            && &actual != expected
        {
            return Err(LayoutError::Corrupt { expected: expected.clone(), actual });
        }
        if let Some(f) = file {
            f.sync_all().map_err(io_err("syncing", &self.tmp))?;
        }
        let tmp = std::mem::take(&mut self.tmp);
        self.layout.commit(tmp, &actual)?;
        Ok((actual, self.size))
    }
}

impl Drop for BlobWriter<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.writeback.take() {
            w.stop();
        }
        if !self.tmp.as_os_str().is_empty() {
            self.file.take();
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// A problem found by [`Layout::verify`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BlobProblem {
    /// Blob file (or temporary file) concerned.
    pub path: PathBuf,
    /// What is wrong.
    pub problem: String,
}

/// Copy buffer: large enough that syscalls do not dominate hashing.
const BUF: usize = 1 << 20;

fn fsync_dir(dir: &Path) -> Result<(), LayoutError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("syncing directory", dir))
}

impl Layout {
    /// Opens the layout at `root`, creating it when the directory is empty or missing.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, LayoutError> {
        let root = root.into();
        let marker = root.join("oci-layout");
        if marker.exists() {
            let text = fs::read_to_string(&marker).map_err(io_err("reading", &marker))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| LayoutError::NotALayout {
                path: root.clone(),
                reason: format!("oci-layout: {e}"),
            })?;
            if v["imageLayoutVersion"] != "1.0.0" {
                return Err(LayoutError::NotALayout {
                    path: root,
                    reason: format!("unsupported imageLayoutVersion {}", v["imageLayoutVersion"]),
                });
            }
        } else {
            fs::create_dir_all(root.join("blobs/sha256")).map_err(io_err("creating", &root))?;
            let layout = Layout { root: root.clone() };
            layout.write_atomic(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
            let index = root.join("index.json");
            if !index.exists() {
                layout.write_atomic(
                    &index,
                    br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#,
                )?;
            }
        }
        fs::create_dir_all(root.join("blobs/sha256")).map_err(io_err("creating", &root))?;
        fs::create_dir_all(root.join("blobs/.tmp")).map_err(io_err("creating", &root))?;
        Ok(Layout { root })
    }

    /// The layout's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with `digest` lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join(digest.algorithm()).join(digest.hex())
    }

    /// True when the blob is stored.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    fn temp_file(&self) -> Result<(File, PathBuf), LayoutError> {
        let dir = self.root.join("blobs/.tmp");
        for attempt in 0..100u32 {
            let path = dir.join(format!("{}-{}-{attempt}", std::process::id(), unique_suffix()));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => return Ok((f, path)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("creating", &path)(e)),
            }
        }
        Err(LayoutError::Io {
            what: "creating a temporary file in",
            path: dir,
            source: io::Error::other("too many collisions"),
        })
    }

    /// Moves a complete, synced temporary file into place under its digest.
    fn commit(&self, tmp: PathBuf, digest: &Digest) -> Result<(), LayoutError> {
        let dest = self.blob_path(digest);
        if dest.is_file() {
            // Same content already stored (content addressing): keep the existing file.
            let _ = fs::remove_file(&tmp);
            return Ok(());
        }
        fs::rename(&tmp, &dest).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err("storing", &dest)(e)
        })?;
        fsync_dir(dest.parent().unwrap_or(&self.root))
    }

    /// Starts writing a blob whose digest is known only at the end.
    pub fn writer(&self) -> Result<BlobWriter<'_>, LayoutError> {
        let (file, tmp) = self.temp_file()?;
        Ok(BlobWriter {
            layout: self,
            file: Some(file),
            tmp,
            hasher: Sha256::new(),
            size: 0,
            writeback: None,
            unsynced: 0,
        })
    }

    /// Stores everything `reader` yields; returns its digest and size. `progress` is called
    /// with the bytes written so far. On any error the temporary file is removed.
    pub fn put_reader(
        &self,
        reader: &mut dyn Read,
        mut progress: impl FnMut(u64),
    ) -> Result<(Digest, u64), LayoutError> {
        self.fill(reader, &mut progress)?.finish(None)
    }

    /// A blob writer holding everything `reader` yields, not yet committed.
    fn fill(
        &self,
        reader: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> Result<BlobWriter<'_>, LayoutError> {
        let mut w = self.writer()?;
        let mut buf = vec![0u8; BUF];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("reading the source for", &w.tmp.clone())(e)),
            };
            w.write(&buf[..n])?;
            progress(w.size);
        }
        Ok(w)
    }

    /// Stores a file's content.
    pub fn put_file(&self, path: &Path, progress: impl FnMut(u64)) -> Result<(Digest, u64), LayoutError> {
        let mut f = File::open(path).map_err(io_err("opening", path))?;
        self.put_reader(&mut f, progress)
    }

    /// Stores bytes already in memory.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest, LayoutError> {
        let digest = Digest::of(bytes);
        if self.contains(&digest) {
            return Ok(digest);
        }
        let mut w = self.writer()?;
        w.write(bytes)?;
        w.finish(Some(&digest)).map(|(d, _)| d)
    }

    /// Stores `reader`'s content, which must hash to `expected` (a pulled blob); a mismatch
    /// stores nothing.
    pub fn put_verified(&self, reader: &mut dyn Read, expected: &Digest) -> Result<u64, LayoutError> {
        self.fill(reader, &mut |_| {})?.finish(Some(expected)).map(|(_, n)| n)
    }

    /// Opens a stored blob.
    pub fn open_blob(&self, digest: &Digest) -> Result<File, LayoutError> {
        let path = self.blob_path(digest);
        File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => LayoutError::Missing(digest.clone()),
            _ => io_err("opening", &path)(e),
        })
    }

    /// Reads a whole stored blob (for small blobs: manifests, configs).
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, LayoutError> {
        let mut out = Vec::new();
        self.open_blob(digest)?.read_to_end(&mut out).map_err(io_err("reading", &self.blob_path(digest)))?;
        Ok(out)
    }

    /// Size of a stored blob.
    pub fn blob_size(&self, digest: &Digest) -> Result<u64, LayoutError> {
        let path = self.blob_path(digest);
        fs::metadata(&path).map(|m| m.len()).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => LayoutError::Missing(digest.clone()),
            _ => io_err("reading", &path)(e),
        })
    }

    /// Every stored blob digest.
    pub fn blobs(&self) -> Result<BTreeSet<Digest>, LayoutError> {
        let dir = self.root.join("blobs/sha256");
        let mut out = BTreeSet::new();
        for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let entry = entry.map_err(io_err("listing", &dir))?;
            if let Ok(d) = Digest::parse(&format!("sha256:{}", entry.file_name().to_string_lossy())) {
                out.insert(d);
            }
        }
        Ok(out)
    }

    /// Re-hashes every blob; reports corrupt blobs and stray files.
    pub fn verify(&self, mut progress: impl FnMut(&Digest)) -> Result<Vec<BlobProblem>, LayoutError> {
        let mut problems = Vec::new();
        let dir = self.root.join("blobs/sha256");
        for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let entry = entry.map_err(io_err("listing", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(digest) = Digest::parse(&format!("sha256:{name}")) else {
                problems
                    .push(BlobProblem { path: entry.path(), problem: "not named by a sha256 digest".into() });
                continue;
            };
            progress(&digest);
            let mut f = File::open(entry.path()).map_err(io_err("opening", &entry.path()))?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; BUF];
            loop {
                let n = f.read(&mut buf).map_err(io_err("reading", &entry.path()))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            let actual = Digest::sha256_from(hasher.finalize().into());
            if actual != digest {
                problems.push(BlobProblem {
                    path: entry.path(),
                    problem: format!("content hashes to {actual}, not {digest}"),
                });
            }
        }
        Ok(problems)
    }

    /// Temporary files left by interrupted writes: harmless (never referenced), removed by
    /// [`Layout::gc`].
    pub fn leftover_temp_files(&self) -> Vec<PathBuf> {
        fs::read_dir(self.root.join("blobs/.tmp"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    /// Removes blobs not in `keep` and leftover temporary files; returns (count, bytes) freed.
    pub fn gc(&self, keep: &BTreeSet<Digest>) -> Result<(usize, u64), LayoutError> {
        let (mut count, mut bytes) = (0usize, 0u64);
        for digest in self.blobs()? {
            if !keep.contains(&digest) {
                let path = self.blob_path(&digest);
                bytes += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                fs::remove_file(&path).map_err(io_err("removing", &path))?;
                count += 1;
            }
        }
        let tmp = self.root.join("blobs/.tmp");
        if let Ok(entries) = fs::read_dir(&tmp) {
            for e in entries.flatten() {
                bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
                let _ = fs::remove_file(e.path());
                count += 1;
            }
        }
        Ok((count, bytes))
    }

    /// Replaces a small file (index.json, oci-layout) atomically.
    pub fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), LayoutError> {
        let dir = path.parent().unwrap_or(&self.root);
        let tmp = dir.join(format!(".{}.tmp-{}-{}", file_name(path), std::process::id(), unique_suffix()));
        let written = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("writing", &tmp)(e));
        }
        fs::rename(&tmp, path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err("replacing", path)(e)
        })?;
        fsync_dir(dir)
    }
}

/// One manifest listed in `index.json`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IndexEntry {
    /// `org.opencontainers.image.ref.name`: the tag under which the manifest is listed.
    pub name: String,
    /// Manifest media type.
    pub media_type: String,
    /// Manifest digest.
    pub digest: Digest,
    /// Manifest size.
    pub size: u64,
    /// Other annotations of the descriptor.
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// The annotation naming an index entry.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

impl Layout {
    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    fn read_index_value(&self) -> Result<serde_json::Value, LayoutError> {
        let path = self.index_path();
        let text = fs::read(&path).map_err(io_err("reading", &path))?;
        serde_json::from_slice(&text).map_err(|e| LayoutError::NotALayout {
            path: self.root.clone(),
            reason: format!("index.json: {e}"),
        })
    }

    /// Manifests listed in `index.json` with a ref name.
    pub fn index(&self) -> Result<Vec<IndexEntry>, LayoutError> {
        let v = self.read_index_value()?;
        let mut out = Vec::new();
        for m in v["manifests"].as_array().into_iter().flatten() {
            let Some(name) = m["annotations"][REF_NAME].as_str() else { continue };
            let Ok(digest) = Digest::parse(m["digest"].as_str().unwrap_or_default()) else { continue };
            let annotations = m["annotations"]
                .as_object()
                .map(|o| {
                    o.iter()
                        .filter(|(k, _)| k.as_str() != REF_NAME)
                        .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            out.push(IndexEntry {
                name: name.to_string(),
                media_type: m["mediaType"].as_str().unwrap_or_default().to_string(),
                digest,
                size: m["size"].as_u64().unwrap_or(0),
                annotations,
            });
        }
        Ok(out)
    }

    /// Adds or replaces (by name) an entry of `index.json`, under a lock so concurrent kiln
    /// processes do not lose each other's entries.
    pub fn set_index_entry(&self, entry: &IndexEntry) -> Result<(), LayoutError> {
        self.edit_index(|manifests| {
            manifests.retain(|m| m["annotations"][REF_NAME].as_str() != Some(entry.name.as_str()));
            let mut annotations: serde_json::Map<String, serde_json::Value> =
                entry.annotations.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
            annotations.insert(REF_NAME.into(), entry.name.clone().into());
            manifests.push(serde_json::json!({
                "mediaType": entry.media_type,
                "digest": entry.digest.to_string(),
                "size": entry.size,
                "annotations": annotations,
            }));
        })
    }

    /// Removes the entry named `name`; returns whether there was one.
    pub fn remove_index_entry(&self, name: &str) -> Result<bool, LayoutError> {
        let mut removed = false;
        self.edit_index(|manifests| {
            let before = manifests.len();
            manifests.retain(|m| m["annotations"][REF_NAME].as_str() != Some(name));
            removed = manifests.len() != before;
        })?;
        Ok(removed)
    }

    fn edit_index(&self, edit: impl FnOnce(&mut Vec<serde_json::Value>)) -> Result<(), LayoutError> {
        let lock_path = self.root.join(".index.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("opening", &lock_path))?;
        lock.lock().map_err(io_err("locking", &lock_path))?;
        let mut v = self.read_index_value()?;
        let mut manifests: Vec<serde_json::Value> = v["manifests"].as_array().cloned().unwrap_or_default();
        edit(&mut manifests);
        manifests
            .sort_by(|a, b| a["annotations"][REF_NAME].as_str().cmp(&b["annotations"][REF_NAME].as_str()));
        v["manifests"] = serde_json::Value::Array(manifests);
        let bytes = serde_json::to_vec(&v)
            .map_err(|e| LayoutError::NotALayout { path: self.root.clone(), reason: e.to_string() })?;
        let result = self.write_atomic(&self.index_path(), &bytes);
        let _ = lock.unlock();
        result
    }

    /// Every blob reachable from `index.json`: manifests, their configs and layers (and the
    /// manifests of image indexes).
    pub fn blobs_in_index(&self) -> Result<BTreeSet<Digest>, LayoutError> {
        let mut out = BTreeSet::new();
        let mut todo: Vec<Digest> = self.index()?.into_iter().map(|e| e.digest).collect();
        while let Some(d) = todo.pop() {
            if !out.insert(d.clone()) {
                continue;
            }
            let Ok(bytes) = self.read_blob(&d) else { continue };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
            for desc in v["layers"].as_array().into_iter().flatten().chain(std::iter::once(&v["config"])) {
                if let Some(Ok(d)) = desc["digest"].as_str().map(Digest::parse) {
                    out.insert(d);
                }
            }
            for m in v["manifests"].as_array().into_iter().flatten() {
                if let Some(Ok(d)) = m["digest"].as_str().map(Digest::parse) {
                    todo.push(d);
                }
            }
        }
        Ok(out)
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// A suffix unique within the process, for temporary names.
fn unique_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (u64::from(nanos) << 20) ^ N.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_content_addressed_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open(dir.path().join("store")).unwrap();
        let d = layout.put_bytes(b"hello").unwrap();
        assert_eq!(d.to_string(), "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(layout.read_blob(&d).unwrap(), b"hello");
        let (d2, size) = layout.put_reader(&mut &b"hello"[..], |_| {}).unwrap();
        assert_eq!((d2.clone(), size), (d.clone(), 5));
        assert!(layout.verify(|_| {}).unwrap().is_empty());
        fs::write(layout.blob_path(&d), b"tampered").unwrap();
        let problems = layout.verify(|_| {}).unwrap();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].problem.contains("content hashes to"));
        let e = layout.put_verified(&mut &b"other"[..], &d).unwrap_err();
        assert!(matches!(e, LayoutError::Corrupt { .. }));
        assert!(fs::read_dir(dir.path().join("store/blobs/.tmp")).unwrap().next().is_none(), "no temp left");
    }

    #[test]
    fn large_blobs_written_back_early_are_stored_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open(dir.path()).unwrap();
        // Past two write-back points, with a tail: every byte must land, hashed once.
        let data: Vec<u8> =
            (0..(2 * WRITEBACK_EVERY + 12_345) as usize).map(|i| (i * 31 % 251) as u8).collect();
        let mut w = layout.writer().unwrap();
        for chunk in data.chunks(1 << 20) {
            w.write(chunk).unwrap();
        }
        assert!(w.writeback.is_some(), "a blob this large is written back while it is written");
        let (d, size) = w.finish(None).unwrap();
        assert_eq!((d.clone(), size), (Digest::of(&data), data.len() as u64));
        assert_eq!(layout.read_blob(&d).unwrap(), data);
        // Abandoned half way (an error, a kill of the build): nothing stored, no temp left.
        let mut w = layout.writer().unwrap();
        w.write(&data[..(WRITEBACK_EVERY + 1) as usize]).unwrap();
        drop(w);
        assert_eq!(layout.blobs().unwrap().len(), 1);
        assert!(fs::read_dir(dir.path().join("blobs/.tmp")).unwrap().next().is_none(), "no temp left");
    }

    #[test]
    fn gc_keeps_what_is_referenced() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open(dir.path()).unwrap();
        let keep = layout.put_bytes(b"keep").unwrap();
        let drop_me = layout.put_bytes(b"drop").unwrap();
        fs::write(dir.path().join("blobs/.tmp/123-leftover"), b"partial").unwrap();
        let (n, _) = layout.gc(&[keep.clone()].into_iter().collect()).unwrap();
        assert_eq!(n, 2);
        assert!(layout.contains(&keep) && !layout.contains(&drop_me));
    }
}
