//! The workspace and its model registry.
//!
//! A workspace is a directory: an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/`)
//! holding every file's content by digest, and `kiln.db` (SQLite) holding models, versions, tags,
//! properties and which images or deployments reference them. Blobs are written first (atomically,
//! see `kiln_images::layout`), the metadata last in one transaction: a crash at any point leaves
//! every earlier model intact and at most unreferenced blobs behind, which `gc` removes.

pub mod artifact;
mod schema;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use kiln_images::digest::Digest;
use kiln_images::layout::{Layout, LayoutError};
use kiln_runtime_core::onnx::{OnnxInfo, ValueDecl};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

pub use schema::SCHEMA_VERSION;

/// Errors of the registry. `is_usage()` tells the CLI which are the user's to fix (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The database failed.
    #[error("workspace database {}: {source}", path.display())]
    Db {
        /// Database file.
        path: PathBuf,
        /// Cause.
        source: rusqlite::Error,
    },
    /// The blob store failed.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The workspace was written by a newer kiln.
    #[error("workspace {} has schema version {found}, newer than the {supported} this kiln reads; upgrade kiln", path.display())]
    NewerSchema {
        /// Database file.
        path: PathBuf,
        /// Version found.
        found: i64,
        /// Version supported.
        supported: i64,
    },
    /// Unknown model or version.
    #[error("{0}")]
    NotFound(String),
    /// The request is not valid (names, paths, K=V, add-only properties, references).
    #[error("{0}")]
    Invalid(String),
    /// A file could not be read or written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

impl RegistryError {
    fn db(path: &Path, source: rusqlite::Error) -> Self {
        RegistryError::Db { path: path.to_path_buf(), source }
    }

    /// True when the user's input is at fault.
    pub fn is_usage(&self) -> bool {
        matches!(self, RegistryError::NotFound(_) | RegistryError::Invalid(_))
    }
}

/// A model version's identity, `NAME:VERSION`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModelRef {
    /// Model name.
    pub name: String,
    /// Version number (1, 2, ...).
    pub version: i64,
}

impl std::fmt::Display for ModelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, self.version)
    }
}

/// `NAME` or `NAME:VERSION`, as users write it.
pub fn parse_model_ref(s: &str) -> Result<(String, Option<i64>), RegistryError> {
    let (name, version) = match s.rsplit_once(':') {
        Some((n, v)) => {
            let v: i64 = v.parse().ok().filter(|&v| v > 0).ok_or_else(|| {
                RegistryError::Invalid(format!("{s:?}: the version after ':' must be a positive integer"))
            })?;
            (n, Some(v))
        }
        None => (s, None),
    };
    check_name(name)?;
    Ok((name.to_string(), version))
}

/// Model names: safe in URLs, file names and OCI repository paths.
pub fn check_name(name: &str) -> Result<(), RegistryError> {
    crate::serve::config::check_name(name).map_err(RegistryError::Invalid)
}

/// Parses `K=V`.
pub fn parse_kv(s: &str) -> Result<(String, String), RegistryError> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(RegistryError::Invalid(format!("{s:?} is not KEY=VALUE"))),
    }
}

/// The kinds of file a server can load, recognised by extension at registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServedKind {
    /// An ONNX model (`.onnx`).
    Onnx,
    /// An accelerator image from `kiln fpga compile` (`.kacc`), served with `--backend fpga`.
    AcceleratorImage,
}

impl ServedKind {
    /// The kind named by a (lower-case) file extension.
    pub fn from_extension(ext: &str) -> Option<Self> {
        match ext {
            "onnx" => Some(ServedKind::Onnx),
            "kacc" => Some(ServedKind::AcceleratorImage),
            _ => None,
        }
    }

    fn extension(self) -> &'static str {
        match self {
            ServedKind::Onnx => "onnx",
            ServedKind::AcceleratorImage => "kacc",
        }
    }

    /// What the file declares (for an accelerator image: its host graph's inputs and outputs),
    /// or why it is not such a file.
    pub fn describe(self, bytes: &[u8]) -> Result<OnnxSummary, String> {
        let info = match self {
            ServedKind::Onnx => OnnxInfo::parse(bytes).map_err(|e| e.to_string())?,
            ServedKind::AcceleratorImage => {
                let image = kiln_fpga::image::AcceleratorImage::parse(bytes).map_err(|e| e.to_string())?;
                OnnxInfo::parse(image.host_graph()).map_err(|e| format!("its host graph: {e}"))?
            }
        };
        Ok(OnnxSummary::from(&info))
    }
}

/// One file of a model version.
#[derive(Clone, Debug, Serialize)]
pub struct ModelFileEntry {
    /// Path relative to the model root.
    pub path: String,
    /// Content digest.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// For files a server loads (ONNX models, accelerator images): what the file declares.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub onnx: Option<OnnxSummary>,
}

/// The parts of an ONNX description worth keeping per version.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct OnnxSummary {
    /// Operator sets by domain.
    pub opsets: BTreeMap<String, i64>,
    /// Graph inputs.
    pub inputs: Vec<ValueDeclJson>,
    /// Graph outputs.
    pub outputs: Vec<ValueDeclJson>,
    /// Producing tool.
    pub producer: String,
}

/// A graph input or output.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct ValueDeclJson {
    /// Name.
    pub name: String,
    /// Datatype.
    pub datatype: String,
    /// Shape, -1 dynamic.
    pub shape: Option<Vec<i64>>,
}

impl From<&OnnxInfo> for OnnxSummary {
    fn from(i: &OnnxInfo) -> Self {
        let conv = |v: &ValueDecl| ValueDeclJson {
            name: v.name.clone(),
            datatype: v.datatype.clone(),
            shape: v.shape.clone(),
        };
        OnnxSummary {
            opsets: i.opsets.clone(),
            inputs: i.inputs.iter().map(conv).collect(),
            outputs: i.outputs.iter().map(conv).collect(),
            producer: i.producer.clone(),
        }
    }
}

/// Everything known about a model version.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ModelVersion {
    /// Name.
    pub name: String,
    /// Version.
    pub version: i64,
    /// Free text.
    pub description: String,
    /// Registration time, RFC 3339 UTC.
    pub created_at: String,
    /// Total size of the files.
    pub size_bytes: u64,
    /// Mutable tags.
    pub tags: BTreeMap<String, String>,
    /// Add-only properties.
    pub properties: BTreeMap<String, String>,
    /// Files.
    pub files: Vec<ModelFileEntry>,
    /// Images and deployments that use this version (`kind:ref`).
    pub referenced_by: Vec<String>,
}

/// A file to register: where it is read from and the path it gets in the model.
#[derive(Clone, Debug)]
pub struct Source {
    /// On disk.
    pub from: PathBuf,
    /// Relative path inside the model.
    pub path: String,
}

/// What to register.
#[derive(Clone, Debug, Default)]
pub struct Registration {
    /// Model name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Properties.
    pub properties: BTreeMap<String, String>,
}

/// A filter for listing.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    /// Only this name.
    pub name: Option<String>,
    /// Tags that must be present (`Some(v)`: with this value).
    pub tags: Vec<(String, Option<String>)>,
    /// Properties that must have these values.
    pub properties: Vec<(String, String)>,
    /// Every version, not only the latest per name.
    pub all_versions: bool,
}

/// RFC 3339 UTC timestamp of now (hand-written to avoid a date crate for one format).
pub fn now_rfc3339() -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    rfc3339(secs as i64)
}

/// Formats Unix seconds as RFC 3339 UTC.
pub fn rfc3339(secs: i64) -> String {
    kiln_images::image::rfc3339(secs)
}

/// Collects the files to register from command-line paths: a file keeps its file name, a
/// directory contributes every regular file under it with its path relative to the directory.
pub fn collect_sources(paths: &[PathBuf]) -> Result<Vec<Source>, RegistryError> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<Source>) -> Result<(), RegistryError> {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .map_err(|e| RegistryError::Io { what: "listing", path: dir.to_path_buf(), source: e })?
            .collect::<Result<_, _>>()
            .map_err(|e| RegistryError::Io { what: "listing", path: dir.to_path_buf(), source: e })?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let meta = fs::metadata(&p).map_err(|source| RegistryError::Io {
                what: "reading",
                path: p.clone(),
                source,
            })?;
            if meta.is_dir() {
                walk(&p, base, out)?;
            } else if meta.is_file() {
                let rel = p.strip_prefix(base).unwrap_or(&p);
                let rel = rel
                    .to_str()
                    .ok_or_else(|| RegistryError::Invalid(format!("{} is not a UTF-8 path", p.display())))?;
                out.push(Source { from: p.clone(), path: rel.to_string() });
            } else {
                return Err(RegistryError::Invalid(format!("{} is not a regular file", p.display())));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        let meta = fs::metadata(p).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => RegistryError::Invalid(format!("{} does not exist", p.display())),
            _ => RegistryError::Io { what: "reading", path: p.clone(), source },
        })?;
        if meta.is_dir() {
            walk(p, p, &mut out)?;
        } else if meta.is_file() {
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| RegistryError::Invalid(format!("{} has no UTF-8 file name", p.display())))?;
            out.push(Source { from: p.clone(), path: name.to_string() });
        } else {
            return Err(RegistryError::Invalid(format!(
                "{} is not a regular file or directory",
                p.display()
            )));
        }
    }
    if out.is_empty() {
        return Err(RegistryError::Invalid("no files to register (empty directory?)".into()));
    }
    let mut seen = BTreeSet::new();
    for s in &out {
        if !seen.insert(s.path.clone()) {
            return Err(RegistryError::Invalid(format!("two files would both be stored as {:?}", s.path)));
        }
    }
    Ok(out)
}

/// An open workspace.
pub struct Workspace {
    root: PathBuf,
    db_path: PathBuf,
    conn: Connection,
    layout: Layout,
}

/// The default workspace directory: `$XDG_DATA_HOME/kiln` or `~/.local/share/kiln`.
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("kiln");
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".local/share/kiln")
}

impl Workspace {
    /// Opens the workspace at `root`, creating it on first use.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, RegistryError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|source| RegistryError::Io {
            what: "creating workspace",
            path: root.clone(),
            source,
        })?;
        let layout = Layout::open(&root)?;
        let db_path = root.join("kiln.db");
        let conn = schema::open(&db_path)?;
        rusqlite::vtab::array::load_module(&conn).map_err(|e| RegistryError::db(&db_path, e))?;
        Ok(Workspace { root, db_path, conn, layout })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The blob store.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The database connection (for other modules sharing the workspace).
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    fn db(&self, e: rusqlite::Error) -> RegistryError {
        RegistryError::db(&self.db_path, e)
    }

    /// Registers `sources` as the next version of `reg.name`. ONNX files (by extension) are
    /// parsed first; one that is not ONNX refuses the whole registration before anything is
    /// stored. `progress(file, bytes_done)` reports copying.
    pub fn register(
        &mut self,
        reg: &Registration,
        sources: &[Source],
        mut progress: impl FnMut(&str, u64),
    ) -> Result<ModelRef, RegistryError> {
        check_name(&reg.name)?;
        let mut files = Vec::with_capacity(sources.len());
        for s in sources {
            let ext = Path::new(&s.path).extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
            let (digest, size, onnx) = if let Some(kind) = ext.as_deref().and_then(ServedKind::from_extension)
            {
                // ONNX files are protobuf messages (under 2 GiB by format), accelerator images
                // hold one: read once, parse, then store from memory.
                let bytes = fs::read(&s.from).map_err(|source| RegistryError::Io {
                    what: "reading",
                    path: s.from.clone(),
                    source,
                })?;
                let summary = kind.describe(&bytes).map_err(|e| {
                    RegistryError::Invalid(format!(
                        "{} is named .{} but {e}; nothing was registered",
                        s.from.display(),
                        kind.extension()
                    ))
                })?;
                let digest = self.layout.put_bytes(&bytes)?;
                progress(&s.path, bytes.len() as u64);
                (digest, bytes.len() as u64, Some(summary))
            } else {
                let path = s.path.clone();
                let (digest, size) = self.layout.put_file(&s.from, |n| progress(&path, n))?;
                (digest, size, None)
            };
            files.push(ModelFileEntry { path: s.path.clone(), digest, size, onnx });
        }
        self.insert_version(reg, &files, &now_rfc3339())
    }

    /// Records the next version of a model whose blobs are already stored.
    pub fn insert_version(
        &mut self,
        reg: &Registration,
        files: &[ModelFileEntry],
        created_at: &str,
    ) -> Result<ModelRef, RegistryError> {
        self.insert(reg, None, files, created_at)
    }

    /// Records a version under a given number (a pulled artifact keeps its version).
    pub fn insert_exact_version(
        &mut self,
        reg: &Registration,
        version: i64,
        files: &[ModelFileEntry],
        created_at: &str,
    ) -> Result<ModelRef, RegistryError> {
        self.insert(reg, Some(version), files, created_at)
    }

    fn insert(
        &mut self,
        reg: &Registration,
        exact: Option<i64>,
        files: &[ModelFileEntry],
        created_at: &str,
    ) -> Result<ModelRef, RegistryError> {
        let db_path = self.db_path.clone();
        let db = |e| RegistryError::db(&db_path, e);
        // IMMEDIATE: take the write lock before reading max(version), so two concurrent
        // registrations of one name get distinct versions.
        let tx = rusqlite::Transaction::new(&mut self.conn, TransactionBehavior::Immediate).map_err(db)?;
        let version: i64 = match exact {
            Some(v) => v,
            None => tx
                .query_row(
                    "SELECT COALESCE(MAX(version), 0) + 1 FROM models WHERE name = ?1",
                    [&reg.name],
                    |r| r.get(0),
                )
                .map_err(db)?,
        };
        let size: u64 = files.iter().map(|f| f.size).sum();
        tx.execute(
            "INSERT INTO models (name, version, description, created_at, size_bytes) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![reg.name, version, reg.description, created_at, size as i64],
        )
        .map_err(db)?;
        let id = tx.last_insert_rowid();
        for f in files {
            let onnx = f.onnx.as_ref().map(|o| serde_json::to_string(o).unwrap_or_default());
            tx.execute(
                "INSERT INTO model_files (model_id, path, digest, size, onnx) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, f.path, f.digest.to_string(), f.size as i64, onnx],
            )
            .map_err(db)?;
        }
        for (k, v) in &reg.tags {
            tx.execute(
                "INSERT INTO model_tags (model_id, key, value) VALUES (?1, ?2, ?3)",
                params![id, k, v],
            )
            .map_err(db)?;
        }
        for (k, v) in &reg.properties {
            tx.execute(
                "INSERT INTO model_properties (model_id, key, value) VALUES (?1, ?2, ?3)",
                params![id, k, v],
            )
            .map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(ModelRef { name: reg.name.clone(), version })
    }

    /// The id and version of `name[:version]` (latest when no version).
    pub fn resolve(&self, name: &str, version: Option<i64>) -> Result<(i64, i64), RegistryError> {
        let row = match version {
            Some(v) => self
                .conn
                .query_row(
                    "SELECT id, version FROM models WHERE name = ?1 AND version = ?2",
                    params![name, v],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional(),
            None => self
                .conn
                .query_row(
                    "SELECT id, version FROM models WHERE name = ?1 ORDER BY version DESC LIMIT 1",
                    params![name],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional(),
        }
        .map_err(|e| self.db(e))?;
        row.ok_or_else(|| {
            let versions: Vec<String> = self
                .conn
                .prepare("SELECT version FROM models WHERE name = ?1 ORDER BY version")
                .and_then(|mut s| {
                    s.query_map([name], |r| r.get::<_, i64>(0))?.collect::<Result<Vec<i64>, _>>()
                })
                .unwrap_or_default()
                .into_iter()
                .map(|v: i64| v.to_string())
                .collect();
            match (version, versions.is_empty()) {
                (_, true) => RegistryError::NotFound(format!("no model named {name:?} in the workspace")),
                (Some(v), false) => RegistryError::NotFound(format!(
                    "model {name:?} has no version {v}; versions: {}",
                    versions.join(", ")
                )),
                (None, false) => RegistryError::NotFound(format!("no model named {name:?}")),
            }
        })
    }

    /// Everything about one version.
    pub fn show(&self, name: &str, version: Option<i64>) -> Result<ModelVersion, RegistryError> {
        let (id, _) = self.resolve(name, version)?;
        self.load(id)
    }

    fn load(&self, id: i64) -> Result<ModelVersion, RegistryError> {
        self.load_many("SELECT CAST(?1 AS INTEGER)", &[id.to_string()])?
            .pop()
            .ok_or_else(|| RegistryError::NotFound(format!("model version {id} vanished")))
    }

    /// Lists versions matching `filter`: the latest per name unless `all_versions`.
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<ModelVersion>, RegistryError> {
        let mut sql = String::from("SELECT m.id FROM models m WHERE 1=1");
        let mut args: Vec<String> = Vec::new();
        if let Some(n) = &filter.name {
            args.push(n.clone());
            sql.push_str(&format!(" AND m.name = ?{}", args.len()));
        }
        if !filter.all_versions {
            // SQLite takes a bare column of a MAX() aggregate from the row holding the maximum:
            // one pass over the (name, version) index, not a subquery per version.
            sql.push_str(" AND m.id IN (SELECT id FROM (SELECT id, MAX(version) FROM models GROUP BY name))");
        }
        for (k, v) in &filter.tags {
            args.push(k.clone());
            let kn = args.len();
            match v {
                Some(v) => {
                    args.push(v.clone());
                    sql.push_str(&format!(
                        " AND EXISTS (SELECT 1 FROM model_tags t WHERE t.model_id = m.id AND t.key = ?{kn} AND t.value = ?{})",
                        args.len()
                    ));
                }
                None => sql.push_str(&format!(
                    " AND EXISTS (SELECT 1 FROM model_tags t WHERE t.model_id = m.id AND t.key = ?{kn})"
                )),
            }
        }
        for (k, v) in &filter.properties {
            args.push(k.clone());
            args.push(v.clone());
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM model_properties p WHERE p.model_id = m.id AND p.key = ?{} AND p.value = ?{})",
                args.len() - 1,
                args.len()
            ));
        }
        self.load_many(&sql, &args)
    }

    /// Loads every version whose id `ids_sql` (a `SELECT m.id FROM models m ...`) selects: the
    /// ids once, then one query per table, not one per version. A few ids are looked up through
    /// `rarray`; when they are most of the registry (listing 10,000 latest versions), each table
    /// is read in one sequential scan and filtered here, which beats 10,000 index seeks.
    fn load_many(&self, ids_sql: &str, args: &[String]) -> Result<Vec<ModelVersion>, RegistryError> {
        let db = |e| self.db(e);
        let ids: Vec<i64> = {
            let mut st = self.conn.prepare(ids_sql).map_err(db)?;
            st.query_map(rusqlite::params_from_iter(args.iter()), |r| r.get(0))
                .map_err(db)?
                .collect::<Result<_, _>>()
                .map_err(db)?
        };
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let total: i64 = self.conn.query_row("SELECT COUNT(*) FROM models", [], |r| r.get(0)).map_err(db)?;
        let scan = ids.len() >= 256 && ids.len() as i64 * 2 >= total;
        let id_array =
            std::rc::Rc::new(ids.iter().copied().map(rusqlite::types::Value::from).collect::<Vec<_>>());
        // `{ids}` becomes a filter on the ids, or nothing when whole tables are scanned.
        let query = |sql: &str, column: &str| -> (String, Vec<&dyn rusqlite::ToSql>) {
            if scan {
                (sql.replace("{ids}", ""), Vec::new())
            } else {
                (sql.replace("{ids}", &format!("WHERE {column} IN rarray(?1)")), vec![&id_array])
            }
        };
        let mut by_id: std::collections::HashMap<i64, ModelVersion> =
            std::collections::HashMap::with_capacity(ids.len());
        for id in &ids {
            by_id.insert(*id, ModelVersion::default());
        }
        let mut order = Vec::with_capacity(ids.len());
        let (sql, params) = query(
            "SELECT id, name, version, description, created_at, size_bytes FROM models {ids} ORDER BY name, version",
            "id",
        );
        let mut st = self.conn.prepare_cached(&sql).map_err(db)?;
        let mut rows = st.query(params.as_slice()).map_err(db)?;
        while let Some(r) = rows.next().map_err(db)? {
            let id: i64 = r.get(0).map_err(db)?;
            if let Some(m) = by_id.get_mut(&id) {
                order.push(id);
                m.name = r.get(1).map_err(db)?;
                m.version = r.get(2).map_err(db)?;
                m.description = r.get(3).map_err(db)?;
                m.created_at = r.get(4).map_err(db)?;
                m.size_bytes = r.get::<_, i64>(5).map_err(db)? as u64;
            }
        }
        for (table, is_tag) in [("model_tags", true), ("model_properties", false)] {
            let (sql, params) =
                query(&format!("SELECT model_id, key, value FROM {table} {{ids}}"), "model_id");
            let mut st = self.conn.prepare_cached(&sql).map_err(db)?;
            let mut rows = st.query(params.as_slice()).map_err(db)?;
            while let Some(r) = rows.next().map_err(db)? {
                if let Some(m) = by_id.get_mut(&r.get::<_, i64>(0).map_err(db)?) {
                    let (k, v): (String, String) = (r.get(1).map_err(db)?, r.get(2).map_err(db)?);
                    if is_tag {
                        m.tags.insert(k, v)
                    } else {
                        m.properties.insert(k, v)
                    };
                }
            }
        }
        let (sql, params) = query(
            "SELECT model_id, path, digest, size, onnx FROM model_files {ids} ORDER BY model_id, path",
            "model_id",
        );
        let mut st = self.conn.prepare_cached(&sql).map_err(db)?;
        let mut rows = st.query(params.as_slice()).map_err(db)?;
        while let Some(r) = rows.next().map_err(db)? {
            if let Some(m) = by_id.get_mut(&r.get::<_, i64>(0).map_err(db)?) {
                let digest: String = r.get(2).map_err(db)?;
                let onnx: Option<String> = r.get(4).map_err(db)?;
                m.files.push(ModelFileEntry {
                    path: r.get(1).map_err(db)?,
                    digest: Digest::parse(&digest).map_err(|e| RegistryError::Invalid(e.to_string()))?,
                    size: r.get::<_, i64>(3).map_err(db)? as u64,
                    onnx: onnx.and_then(|o| serde_json::from_str(&o).ok()),
                });
            }
        }
        let (sql, params) = query(
            "SELECT model_id, kind, ref FROM model_references {ids} ORDER BY model_id, kind, ref",
            "model_id",
        );
        let mut st = self.conn.prepare_cached(&sql).map_err(db)?;
        let mut rows = st.query(params.as_slice()).map_err(db)?;
        while let Some(r) = rows.next().map_err(db)? {
            if let Some(m) = by_id.get_mut(&r.get::<_, i64>(0).map_err(db)?) {
                let (kind, reference): (String, String) = (r.get(1).map_err(db)?, r.get(2).map_err(db)?);
                m.referenced_by.push(format!("{kind} {reference}"));
            }
        }
        Ok(order.into_iter().filter_map(|id| by_id.remove(&id)).collect())
    }

    /// Sets tags (replacing values) and removes tags by key.
    pub fn tag(
        &mut self,
        name: &str,
        version: i64,
        set: &[(String, String)],
        remove: &[String],
    ) -> Result<(), RegistryError> {
        let (id, _) = self.resolve(name, Some(version))?;
        let db_path = self.db_path.clone();
        let db = |e| RegistryError::db(&db_path, e);
        let tx = rusqlite::Transaction::new(&mut self.conn, TransactionBehavior::Immediate).map_err(db)?;
        for k in remove {
            let n = tx
                .execute("DELETE FROM model_tags WHERE model_id = ?1 AND key = ?2", params![id, k])
                .map_err(db)?;
            if n == 0 {
                return Err(RegistryError::Invalid(format!("{name}:{version} has no tag {k:?}")));
            }
        }
        for (k, v) in set {
            tx.execute(
                "INSERT OR REPLACE INTO model_tags (model_id, key, value) VALUES (?1, ?2, ?3)",
                params![id, k, v],
            )
            .map_err(db)?;
        }
        tx.commit().map_err(db)
    }

    /// Adds properties; changing an existing property is refused (as Azure ML does).
    pub fn add_properties(
        &mut self,
        name: &str,
        version: i64,
        add: &[(String, String)],
    ) -> Result<(), RegistryError> {
        let (id, _) = self.resolve(name, Some(version))?;
        let db_path = self.db_path.clone();
        let db = |e| RegistryError::db(&db_path, e);
        let tx = rusqlite::Transaction::new(&mut self.conn, TransactionBehavior::Immediate).map_err(db)?;
        for (k, v) in add {
            let existing: Option<String> = tx
                .query_row(
                    "SELECT value FROM model_properties WHERE model_id = ?1 AND key = ?2",
                    params![id, k],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db)?;
            match existing {
                Some(old) if &old == v => {}
                Some(old) => {
                    return Err(RegistryError::Invalid(format!(
                        "property {k:?} of {name}:{version} is {old:?}; properties are add-only and cannot be changed"
                    )));
                }
                None => {
                    tx.execute(
                        "INSERT INTO model_properties (model_id, key, value) VALUES (?1, ?2, ?3)",
                        params![id, k, v],
                    )
                    .map_err(db)?;
                }
            }
        }
        tx.commit().map_err(db)
    }

    /// Records that an image or deployment uses a model version (it then cannot be deleted).
    pub fn add_reference(
        &self,
        name: &str,
        version: i64,
        kind: &str,
        reference: &str,
    ) -> Result<(), RegistryError> {
        let (id, _) = self.resolve(name, Some(version))?;
        self.conn
            .execute(
                "INSERT OR IGNORE INTO model_references (model_id, kind, ref) VALUES (?1, ?2, ?3)",
                params![id, kind, reference],
            )
            .map_err(|e| self.db(e))?;
        Ok(())
    }

    /// Keeps only the references of (`kind`, `reference`) to the versions in `keep`
    /// (`NAME:VERSION`): a replaced image tag no longer protects models it stopped using.
    pub fn retain_references(
        &self,
        kind: &str,
        reference: &str,
        keep: &BTreeSet<String>,
    ) -> Result<(), RegistryError> {
        let mut st = self
            .conn
            .prepare("SELECT r.model_id, m.name, m.version FROM model_references r JOIN models m ON m.id = r.model_id WHERE r.kind = ?1 AND r.ref = ?2")
            .map_err(|e| self.db(e))?;
        let rows: Vec<(i64, String, i64)> = st
            .query_map(params![kind, reference], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(|e| self.db(e))?
            .collect::<Result<_, _>>()
            .map_err(|e| self.db(e))?;
        for (id, name, version) in rows {
            if !keep.contains(&format!("{name}:{version}")) {
                self.conn
                    .execute(
                        "DELETE FROM model_references WHERE model_id = ?1 AND kind = ?2 AND ref = ?3",
                        params![id, kind, reference],
                    )
                    .map_err(|e| self.db(e))?;
            }
        }
        Ok(())
    }

    /// Drops every reference with this kind and ref (an image deleted).
    pub fn remove_references(&self, kind: &str, reference: &str) -> Result<(), RegistryError> {
        self.conn
            .execute("DELETE FROM model_references WHERE kind = ?1 AND ref = ?2", params![kind, reference])
            .map_err(|e| self.db(e))?;
        Ok(())
    }

    /// Deletes a version, refused while anything references it. Its blobs stay until `gc`.
    pub fn delete(&mut self, name: &str, version: i64) -> Result<(), RegistryError> {
        let mv = self.show(name, Some(version))?;
        if !mv.referenced_by.is_empty() {
            return Err(RegistryError::Invalid(format!(
                "{name}:{version} is used by {}; delete those first",
                mv.referenced_by.join(", ")
            )));
        }
        let (id, _) = self.resolve(name, Some(version))?;
        self.conn.execute("DELETE FROM models WHERE id = ?1", [id]).map_err(|e| self.db(e))?;
        Ok(())
    }

    /// Writes a version's files under `dir` (created if missing); existing files are not
    /// overwritten.
    pub fn download(
        &self,
        name: &str,
        version: Option<i64>,
        dir: &Path,
    ) -> Result<ModelVersion, RegistryError> {
        let mv = self.show(name, version)?;
        for f in &mv.files {
            let dest = dir.join(&f.path);
            if dest.exists() {
                return Err(RegistryError::Invalid(format!(
                    "{} already exists; choose an empty directory",
                    dest.display()
                )));
            }
        }
        for f in &mv.files {
            let dest = dir.join(&f.path);
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).map_err(|source| RegistryError::Io {
                    what: "creating",
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
            let mut src = self.layout.open_blob(&f.digest)?;
            let tmp = dest.with_extension("kiln-partial");
            let copied = fs::File::create(&tmp).and_then(|mut out| {
                std::io::copy(&mut src, &mut out)?;
                out.sync_all()
            });
            if let Err(source) = copied {
                let _ = fs::remove_file(&tmp);
                return Err(RegistryError::Io { what: "writing", path: dest, source });
            }
            fs::rename(&tmp, &dest).map_err(|source| RegistryError::Io {
                what: "writing",
                path: dest.clone(),
                source,
            })?;
        }
        Ok(mv)
    }

    /// Every blob digest the metadata references (model files and recorded images).
    pub fn referenced_blobs(&self) -> Result<BTreeSet<Digest>, RegistryError> {
        let mut out = BTreeSet::new();
        let mut st = self.conn.prepare("SELECT DISTINCT digest FROM model_files").map_err(|e| self.db(e))?;
        for d in st.query_map([], |r| r.get::<_, String>(0)).map_err(|e| self.db(e))? {
            let d = d.map_err(|e| self.db(e))?;
            if let Ok(d) = Digest::parse(&d) {
                out.insert(d);
            }
        }
        out.extend(crate::registry::artifact::blobs_in_index(&self.layout)?);
        Ok(out)
    }

    /// Database and blob checks: integrity, missing or corrupt blobs, sizes, stray files.
    pub fn verify(&self, progress: impl FnMut(&Digest)) -> Result<Vec<String>, RegistryError> {
        let mut problems = Vec::new();
        let integrity: String =
            self.conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).map_err(|e| self.db(e))?;
        if integrity != "ok" {
            problems.push(format!("database: {integrity}"));
        }
        for p in self.layout.verify(progress)? {
            problems.push(format!("{}: {}", p.path.display(), p.problem));
        }
        let mut st = self
            .conn
            .prepare("SELECT m.name, m.version, f.path, f.digest, f.size FROM model_files f JOIN models m ON m.id = f.model_id ORDER BY m.name, m.version, f.path")
            .map_err(|e| self.db(e))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .map_err(|e| self.db(e))?;
        for row in rows {
            let (name, version, path, digest, size) = row.map_err(|e| self.db(e))?;
            let Ok(d) = Digest::parse(&digest) else {
                problems.push(format!("{name}:{version} {path}: invalid digest {digest:?} in the database"));
                continue;
            };
            match self.layout.blob_size(&d) {
                Ok(n) if n == size as u64 => {}
                Ok(n) => {
                    problems.push(format!("{name}:{version} {path}: blob {d} has {n} bytes, expected {size}"))
                }
                Err(_) => problems.push(format!("{name}:{version} {path}: blob {d} is missing")),
            }
        }
        Ok(problems)
    }

    /// Removes blobs nothing references; returns (files removed, bytes freed).
    pub fn gc(&self) -> Result<(usize, u64), RegistryError> {
        let keep = self.referenced_blobs()?;
        Ok(self.layout.gc(&keep)?)
    }

    /// Counts for `workspace show`.
    pub fn summary(&self) -> Result<WorkspaceSummary, RegistryError> {
        let count = |sql: &str| -> Result<i64, RegistryError> {
            self.conn.query_row(sql, [], |r| r.get(0)).map_err(|e| self.db(e))
        };
        let blobs = self.layout.blobs()?;
        let bytes = blobs.iter().map(|d| self.layout.blob_size(d).unwrap_or(0)).sum();
        Ok(WorkspaceSummary {
            path: self.root.display().to_string(),
            schema_version: SCHEMA_VERSION,
            models: count("SELECT COUNT(DISTINCT name) FROM models")? as u64,
            versions: count("SELECT COUNT(*) FROM models")? as u64,
            images: crate::registry::artifact::index_entries(&self.layout)?.len() as u64,
            blobs: blobs.len() as u64,
            blob_bytes: bytes,
        })
    }
}

/// `kiln workspace show`.
#[derive(Debug, Serialize)]
pub struct WorkspaceSummary {
    /// Directory.
    pub path: String,
    /// Database schema version.
    pub schema_version: i64,
    /// Distinct model names.
    pub models: u64,
    /// Model versions.
    pub versions: u64,
    /// Entries in the OCI index (images and pulled artifacts).
    pub images: u64,
    /// Blobs stored.
    pub blobs: u64,
    /// Their total size.
    pub blob_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_380_406), "2026-11-22T20:46:46Z");
    }

    /// Listing many versions scans whole tables; listing a few looks them up by id. Both must
    /// give every version exactly its own tags, properties, files and references.
    #[test]
    fn scanned_and_looked_up_listings_agree() {
        let dir = tempfile::tempdir().unwrap();
        let mut ws = Workspace::open(dir.path()).unwrap();
        let a = ws.layout().put_bytes(b"a").unwrap();
        let b = ws.layout().put_bytes(b"b").unwrap();
        for n in 0..150 {
            for v in 0..2 {
                let reg = Registration {
                    name: format!("m{n:03}"),
                    description: format!("{n}/{v}"),
                    tags: [("n".to_string(), n.to_string()), (format!("only{v}"), "x".into())]
                        .into_iter()
                        .collect(),
                    properties: [("v".to_string(), v.to_string())].into_iter().collect(),
                };
                let mut files =
                    vec![ModelFileEntry { path: "a.bin".into(), digest: a.clone(), size: 1, onnx: None }];
                if (n + v) % 3 == 0 {
                    files.push(ModelFileEntry {
                        path: "b/b.bin".into(),
                        digest: b.clone(),
                        size: 1,
                        onnx: None,
                    });
                }
                ws.insert_version(&reg, &files, "2026-11-22T00:00:00Z").unwrap();
            }
            if n % 7 == 0 {
                ws.add_reference(&format!("m{n:03}"), 2, "image", &format!("img{n}:1")).unwrap();
            }
        }
        let json = |v: &[ModelVersion]| serde_json::to_value(v).unwrap();
        // 300 of 300 versions: whole-table scans.
        let all = ws.list(&ListFilter { all_versions: true, ..Default::default() }).unwrap();
        assert_eq!(all.len(), 300);
        assert_eq!(all[17].tags.get("n").map(String::as_str), Some("8"));
        assert_eq!(all[0].files.len(), 2);
        assert_eq!(all[1].referenced_by, vec!["image img0:1".to_string()]);
        // Two at a time, and the 150 latest: lookups by id.
        for n in [0, 1, 7, 149] {
            let f = ListFilter { name: Some(format!("m{n:03}")), all_versions: true, ..Default::default() };
            assert_eq!(json(&ws.list(&f).unwrap()), json(&all[2 * n..2 * n + 2]), "m{n:03}");
        }
        let latest = ws.list(&ListFilter::default()).unwrap();
        let expected: Vec<_> = all.iter().filter(|m| m.version == 2).cloned().collect();
        assert_eq!(json(&latest), json(&expected));
        // 300 of 400 versions: scanned, and what was not selected stays out.
        for n in 0..100 {
            let reg = Registration {
                name: format!("z{n:03}"),
                tags: [("z".to_string(), "1".to_string())].into_iter().collect(),
                ..Default::default()
            };
            let files = vec![ModelFileEntry { path: "z.bin".into(), digest: b.clone(), size: 1, onnx: None }];
            ws.insert_version(&reg, &files, "2026-11-22T00:00:00Z").unwrap();
        }
        let f = ListFilter { tags: vec![("n".into(), None)], all_versions: true, ..Default::default() };
        assert_eq!(json(&ws.list(&f).unwrap()), json(&all));
    }

    #[test]
    fn refs_and_kv() {
        assert_eq!(parse_model_ref("iris:3").unwrap(), ("iris".into(), Some(3)));
        assert_eq!(parse_model_ref("iris").unwrap(), ("iris".into(), None));
        assert!(parse_model_ref("iris:x").is_err());
        assert!(parse_model_ref("iris:0").is_err());
        assert!(parse_model_ref("../x").is_err());
        assert_eq!(parse_kv("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_kv("novalue").is_err());
        assert!(parse_kv("=v").is_err());
    }
}
