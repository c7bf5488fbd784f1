//! `kiln workspace ...`: the workspace itself.

use std::path::PathBuf;

use clap::Subcommand;

use super::model::{classify, human_bytes};
use crate::registry::Workspace;

/// `kiln workspace` subcommands.
#[derive(Debug, Subcommand)]
pub enum WorkspaceCommand {
    /// Where the workspace is and what it holds.
    Show {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the database and re-hash every blob; exit 1 on any problem, each reported.
    Verify,
    /// Remove blobs no model version or image references, and leftovers of interrupted writes.
    Gc,
}

/// Runs `kiln workspace ...`.
pub fn run(workspace: PathBuf, cmd: WorkspaceCommand) -> anyhow::Result<()> {
    let ws = Workspace::open(&workspace).map_err(classify)?;
    match cmd {
        WorkspaceCommand::Show { json } => {
            let s = ws.summary().map_err(classify)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("workspace    {}", s.path);
                println!("schema       {}", s.schema_version);
                println!("models       {} ({} versions)", s.models, s.versions);
                println!("images       {}", s.images);
                println!("blobs        {} ({})", s.blobs, human_bytes(s.blob_bytes));
            }
        }
        WorkspaceCommand::Verify => {
            let mut checked = 0usize;
            let problems = ws.verify(|_| checked += 1).map_err(classify)?;
            let leftovers = ws.layout().leftover_temp_files().len();
            if leftovers > 0 {
                println!(
                    "note: {leftovers} temporary file(s) of interrupted writes; `kiln workspace gc` removes them"
                );
            }
            if problems.is_empty() {
                println!("workspace {} is clean ({checked} blobs re-hashed)", ws.root().display());
            } else {
                for p in &problems {
                    println!("problem: {p}");
                }
                anyhow::bail!("workspace {}: {} problem(s) found", ws.root().display(), problems.len());
            }
        }
        WorkspaceCommand::Gc => {
            let (n, bytes) = ws.gc().map_err(classify)?;
            println!("removed {n} unreferenced file(s), {}", human_bytes(bytes));
        }
    }
    Ok(())
}
