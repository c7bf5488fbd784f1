//! Deterministic layer tarballs, written straight into the blob store.
//!
//! The same inputs give the same bytes whatever the build directory, umask or clock: entries are
//! sorted by path, owners are 0:0 with empty names, modes are fixed (0755 for directories and
//! executables, 0644 otherwise), every timestamp is `mtime` (from `SOURCE_DATE_EPOCH`), and gzip
//! has no file name and a zero header mtime at a fixed compression level. The tar is hashed as it
//! is produced (the diff ID) and the compressed stream as it is stored (the digest): one pass.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::layout::{BlobWriter, Layout, LayoutError};

/// OCI media type of an uncompressed layer.
pub const MEDIA_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI media type of a gzip layer.
pub const MEDIA_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Where a file's bytes come from.
#[derive(Clone, Debug)]
pub enum Content {
    /// A file on disk (followed if a symlink).
    Path(PathBuf),
    /// Bytes in memory.
    Bytes(Vec<u8>),
}

#[derive(Clone, Debug)]
enum Entry {
    Dir,
    File { content: Content, executable: bool },
    Symlink(String),
}

/// A layer being assembled; paths are absolute inside the image (`/usr/local/bin/kiln`).
#[derive(Debug, Default)]
pub struct LayerBuilder {
    entries: BTreeMap<String, Entry>,
}

/// A written layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    /// Digest of the stored (possibly compressed) blob.
    pub digest: Digest,
    /// Digest of the uncompressed tar (goes into the image config's `rootfs.diff_ids`).
    pub diff_id: Digest,
    /// Stored size.
    pub size: u64,
    /// Media type.
    pub media_type: &'static str,
}

/// Compression of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar (model layers: already dense, and pulled without a decompression step).
    None,
    /// gzip at level 6.
    Gzip,
}

fn normalize(path: &str) -> Result<String, LayoutError> {
    let trimmed = path.trim_start_matches('/');
    if trimmed.is_empty() || trimmed.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(LayoutError::Io {
            what: "adding to a layer",
            path: PathBuf::from(path),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "paths must be absolute and normal (no '.', '..', '//')",
            ),
        });
    }
    Ok(trimmed.to_string())
}

/// Hashes everything written through it, then passes it on.
struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Adapts the blob writer to `io::Write`.
struct BlobSink<'a>(BlobWriter<'a>);

impl Write for BlobSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(io::Error::other)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl LayerBuilder {
    /// An empty layer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory (parents are added automatically).
    pub fn dir(&mut self, path: &str) -> Result<&mut Self, LayoutError> {
        let p = normalize(path)?;
        self.parents(&p);
        self.entries.insert(p, Entry::Dir);
        Ok(self)
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, content: Content, executable: bool) -> Result<&mut Self, LayoutError> {
        let p = normalize(path)?;
        self.parents(&p);
        self.entries.insert(p, Entry::File { content, executable });
        Ok(self)
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, LayoutError> {
        let p = normalize(path)?;
        self.parents(&p);
        self.entries.insert(p, Entry::Symlink(target.to_string()));
        Ok(self)
    }

    fn parents(&mut self, p: &str) {
        let mut acc = String::new();
        let parts: Vec<&str> = p.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            self.entries.entry(acc.clone()).or_insert(Entry::Dir);
        }
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the layer into `layout`.
    pub fn write(
        &self,
        layout: &Layout,
        compression: Compression,
        mtime: u64,
    ) -> Result<LayerInfo, LayoutError> {
        let sink = BlobSink(layout.writer()?);
        let io_err = |e: io::Error| LayoutError::Io {
            what: "writing a layer into",
            path: layout.root().to_path_buf(),
            source: e,
        };
        match compression {
            Compression::None => {
                // The blob is the tar itself: the store's own hash is the diff id too.
                // tar copies in 8 KiB pieces: buffer them into large writes.
                let mut out = io::BufWriter::with_capacity(1 << 20, sink);
                self.write_tar(&mut out, mtime).map_err(io_err)?;
                let sink = out.into_inner().map_err(|e| io_err(e.into_error()))?;
                let (digest, size) = sink.0.finish(None)?;
                Ok(LayerInfo { digest: digest.clone(), diff_id: digest, size, media_type: MEDIA_TAR })
            }
            Compression::Gzip => {
                let gz = flate2::GzBuilder::new()
                    .mtime(0)
                    .operating_system(255)
                    .write(sink, flate2::Compression::new(6));
                let mut hashing = HashingWriter { inner: gz, hasher: Sha256::new() };
                self.write_tar(&mut hashing, mtime).map_err(io_err)?;
                let diff = Digest::sha256_from(hashing.hasher.finalize().into());
                let sink = hashing.inner.finish().map_err(io_err)?;
                let (digest, size) = sink.0.finish(None)?;
                Ok(LayerInfo { digest, diff_id: diff, size, media_type: MEDIA_TAR_GZIP })
            }
        }
    }

    fn write_tar(&self, out: &mut dyn Write, mtime: u64) -> io::Result<()> {
        let mut tar = tar::Builder::new(out);
        tar.mode(tar::HeaderMode::Deterministic);
        tar.follow_symlinks(false);
        for (path, entry) in &self.entries {
            let mut h = tar::Header::new_ustar();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(mtime);
            match entry {
                Entry::Dir => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    tar.append_data(&mut h, format!("{path}/"), io::empty())?;
                }
                Entry::Symlink(target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    tar.append_link(&mut h, path, target)?;
                }
                Entry::File { content, executable } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(if *executable { 0o755 } else { 0o644 });
                    match content {
                        Content::Bytes(b) => {
                            h.set_size(b.len() as u64);
                            tar.append_data(&mut h, path, &b[..])?;
                        }
                        Content::Path(p) => {
                            let f = File::open(p)
                                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
                            let len = f.metadata()?.len();
                            h.set_size(len);
                            tar.append_data(&mut h, path, LimitedReader { inner: f, left: len, path: p })?;
                        }
                    }
                }
            }
        }
        tar.into_inner()?.flush()
    }
}

/// Reads exactly the length announced in the header, failing if the file changes size.
struct LimitedReader<'a> {
    inner: File,
    left: u64,
    path: &'a Path,
}

impl Read for LimitedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let max = buf.len().min(self.left as usize);
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while it was being packed", self.path.display()),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// The `SOURCE_DATE_EPOCH` timestamp (seconds), 0 when unset: builds are reproducible by default.
pub fn source_date_epoch() -> Result<u64, String> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.trim().is_empty() => {
            v.trim().parse().map_err(|_| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds"))
        }
        _ => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(layout: &Layout, order: &[&str], c: Compression) -> LayerInfo {
        let mut l = LayerBuilder::new();
        for p in order {
            l.file(p, Content::Bytes(p.as_bytes().to_vec()), false).unwrap();
        }
        l.write(layout, c, 1_700_000_000).unwrap()
    }

    #[test]
    fn same_inputs_same_bytes_whatever_the_order() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open(dir.path()).unwrap();
        for c in [Compression::None, Compression::Gzip] {
            let a = build(&layout, &["/b/x", "/a/y", "/a/z"], c);
            let b = build(&layout, &["/a/z", "/b/x", "/a/y"], c);
            assert_eq!(a, b);
        }
        let plain = build(&layout, &["/a"], Compression::None);
        assert_eq!(plain.digest, plain.diff_id);
    }

    #[test]
    fn unsafe_paths_are_refused() {
        let mut l = LayerBuilder::new();
        for bad in ["/a/../b", "/", "/a//b", "/./a"] {
            assert!(l.file(bad, Content::Bytes(vec![]), false).is_err(), "{bad}");
        }
    }
}
