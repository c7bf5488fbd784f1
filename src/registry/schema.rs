//! The workspace database: schema, versioning and connection settings.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

use super::RegistryError;

/// Schema version this build reads and writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA_V1: &str = r#"
CREATE TABLE models (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    description TEXT    NOT NULL DEFAULT '',
    created_at  TEXT    NOT NULL,
    size_bytes  INTEGER NOT NULL,
    UNIQUE (name, version)
);
CREATE TABLE model_files (
    model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    path     TEXT    NOT NULL,
    digest   TEXT    NOT NULL,
    size     INTEGER NOT NULL,
    onnx     TEXT,
    PRIMARY KEY (model_id, path)
);
CREATE TABLE model_tags (
    model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    key      TEXT    NOT NULL,
    value    TEXT    NOT NULL,
    PRIMARY KEY (model_id, key)
);
CREATE TABLE model_properties (
    model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    key      TEXT    NOT NULL,
    value    TEXT    NOT NULL,
    PRIMARY KEY (model_id, key)
);
CREATE TABLE model_references (
    model_id INTEGER NOT NULL REFERENCES models(id),
    kind     TEXT    NOT NULL,
    ref      TEXT    NOT NULL,
    PRIMARY KEY (model_id, kind, ref)
);
CREATE INDEX model_files_digest ON model_files (digest);
CREATE INDEX model_tags_kv ON model_tags (key, value);
CREATE INDEX model_properties_kv ON model_properties (key, value);
"#;

/// Opens (creating when new) the database, with the settings every connection needs: foreign
/// keys, a WAL journal (readers never block the writer), full fsync, and a busy timeout so
/// concurrent `kiln` processes queue instead of failing.
pub fn open(path: &Path) -> Result<Connection, RegistryError> {
    let conn = Connection::open(path).map_err(|e| RegistryError::db(path, e))?;
    conn.busy_timeout(Duration::from_secs(60)).map_err(|e| RegistryError::db(path, e))?;
    conn.execute_batch("PRAGMA foreign_keys = ON; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
        .map_err(|e| RegistryError::db(path, e))?;
    let version: i64 =
        conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| RegistryError::db(path, e))?;
    if version > SCHEMA_VERSION {
        return Err(RegistryError::NewerSchema {
            path: path.to_path_buf(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    if version == 0 {
        // Create under an exclusive transaction: two processes opening a new workspace at once
        // must not both create the tables.
        let tx = conn.unchecked_transaction().map_err(|e| RegistryError::db(path, e))?;
        let current: i64 =
            tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| RegistryError::db(path, e))?;
        if current == 0 {
            tx.execute_batch(SCHEMA_V1).map_err(|e| RegistryError::db(path, e))?;
            tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
                .map_err(|e| RegistryError::db(path, e))?;
        }
        tx.commit().map_err(|e| RegistryError::db(path, e))?;
    }
    Ok(conn)
}
