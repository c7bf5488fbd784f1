//! `kiln model ...`: the model registry.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::UsageError;
use crate::registry::{
    self, ListFilter, ModelVersion, Registration, RegistryError, Workspace, parse_kv, parse_model_ref,
};

/// `kiln model` subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Register a file or directory (several files form one model) as the next version of NAME;
    /// prints NAME:VERSION. ONNX files are parsed and their inputs/outputs recorded.
    Register(RegisterArgs),
    /// List models: the latest version per name, filtered by name, tags and properties.
    List(ListArgs),
    /// Show one version (the latest when no :VERSION).
    Show(ShowArgs),
    /// Set tags (K=V) or remove them (--remove K); tags are mutable.
    Tag(TagArgs),
    /// Add properties (K=V); properties are add-only: changing one is refused.
    Property(PropertyArgs),
    /// Copy a version's files into DIR.
    Download(DownloadArgs),
    /// Delete a version; refused while an image or deployment uses it. Blobs go at `workspace gc`.
    Delete(DeleteArgs),
    /// Push a version to an OCI registry as a ModelPack artifact.
    Push(PushArgs),
    /// Pull a ModelPack artifact from an OCI registry into the workspace.
    Pull(PullArgs),
}

/// Arguments of `kiln model register`.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// Model name (letters, digits, '_', '-', '.').
    pub name: String,
    /// Files or directories to register.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Free-text description.
    #[arg(long, default_value = "")]
    pub description: String,
    /// Tag as K=V (repeatable).
    #[arg(long = "tag", value_name = "K=V")]
    pub tags: Vec<String>,
    /// Property as K=V (repeatable).
    #[arg(long = "property", value_name = "K=V")]
    pub properties: Vec<String>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `kiln model list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this model name.
    pub name: Option<String>,
    /// Only versions with this tag (K) or tag value (K=V) (repeatable).
    #[arg(long = "tag", value_name = "K[=V]")]
    pub tags: Vec<String>,
    /// Only versions with this property value (repeatable).
    #[arg(long = "property", value_name = "K=V")]
    pub properties: Vec<String>,
    /// Every version, not only the latest per name.
    #[arg(long)]
    pub all_versions: bool,
    /// Print JSON (an array of the objects `model show --json` prints).
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `kiln model show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// NAME or NAME:VERSION.
    #[arg(value_name = "NAME[:VERSION]")]
    pub model: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `kiln model tag`.
#[derive(Debug, Args)]
pub struct TagArgs {
    /// NAME:VERSION.
    #[arg(value_name = "NAME:VERSION")]
    pub model: String,
    /// Tags to set.
    #[arg(value_name = "K=V")]
    pub tags: Vec<String>,
    /// Tag keys to remove (repeatable).
    #[arg(long = "remove", value_name = "K")]
    pub remove: Vec<String>,
}

/// Arguments of `kiln model property`.
#[derive(Debug, Args)]
pub struct PropertyArgs {
    /// NAME:VERSION.
    #[arg(value_name = "NAME:VERSION")]
    pub model: String,
    /// Properties to add.
    #[arg(required = true, value_name = "K=V")]
    pub properties: Vec<String>,
}

/// Arguments of `kiln model download`.
#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// NAME or NAME:VERSION.
    #[arg(value_name = "NAME[:VERSION]")]
    pub model: String,
    /// Destination directory (created if missing; existing files are not overwritten).
    pub dir: PathBuf,
}

/// Arguments of `kiln model delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// NAME:VERSION.
    #[arg(value_name = "NAME:VERSION")]
    pub model: String,
}

/// Arguments of `kiln model push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// NAME:VERSION (NAME = latest).
    #[arg(value_name = "NAME[:VERSION]")]
    pub model: String,
    /// Destination, REGISTRY/REPOSITORY[:TAG]; the tag defaults to the version.
    #[arg(value_name = "REGISTRY/REPO[:TAG]")]
    pub reference: String,
    /// Talk plain HTTP to the registry (e.g. one on loopback).
    #[arg(long)]
    pub insecure_registry: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `kiln model pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// REGISTRY/REPOSITORY:TAG or REGISTRY/REPOSITORY@sha256:...
    #[arg(value_name = "REF")]
    pub reference: String,
    /// Talk plain HTTP to the registry.
    #[arg(long)]
    pub insecure_registry: bool,
}

/// Maps registry errors to exit codes: the user's input (2) or a failure (1).
pub fn classify(e: RegistryError) -> anyhow::Error {
    if e.is_usage() { UsageError(e.to_string()).into() } else { e.into() }
}

fn kvs(items: &[String]) -> Result<Vec<(String, String)>, anyhow::Error> {
    items.iter().map(|s| parse_kv(s).map_err(classify)).collect()
}

fn exact(model: &str) -> Result<(String, i64), anyhow::Error> {
    match parse_model_ref(model).map_err(classify)? {
        (name, Some(v)) => Ok((name, v)),
        (name, None) => Err(UsageError(format!("give the version too: {name}:VERSION")).into()),
    }
}

/// Human-readable byte counts.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

fn kv_text(m: &std::collections::BTreeMap<String, String>) -> String {
    m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

fn print_table(rows: &[ModelVersion]) {
    let head = ["NAME", "VERSION", "CREATED", "SIZE", "TAGS", "DESCRIPTION"];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|m| {
            [
                m.name.clone(),
                m.version.to_string(),
                m.created_at.clone(),
                human_bytes(m.size_bytes),
                kv_text(&m.tags),
                m.description.chars().take(50).collect(),
            ]
        })
        .collect();
    let mut widths = head.map(str::len);
    for r in &cells {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |r: &[String]| {
        r.iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    // One write: `println!` per row is a syscall per row on a pipe (10,000 rows, 10,000 writes).
    let mut out = line(&head.map(String::from));
    out.push('\n');
    for r in &cells {
        out.push_str(&line(r));
        out.push('\n');
    }
    print!("{out}");
}

fn print_version(m: &ModelVersion) {
    println!("name         {}", m.name);
    println!("version      {}", m.version);
    println!("created      {}", m.created_at);
    println!("size         {}", human_bytes(m.size_bytes));
    if !m.description.is_empty() {
        println!("description  {}", m.description);
    }
    println!("tags         {}", kv_text(&m.tags));
    println!("properties   {}", kv_text(&m.properties));
    for (i, f) in m.files.iter().enumerate() {
        let head = if i == 0 { "files" } else { "" };
        println!("{head:<12} {}  {}  {}", f.path, human_bytes(f.size), f.digest);
        if let Some(o) = &f.onnx {
            let opsets: Vec<String> = o.opsets.iter().map(|(d, v)| format!("{d} {v}")).collect();
            println!("{:<12}   opsets: {}", "", opsets.join(", "));
            for (kind, vals) in [("input", &o.inputs), ("output", &o.outputs)] {
                for v in vals {
                    let shape = v
                        .shape
                        .as_ref()
                        .map(|s| kiln_runtime_core::format_shape(s))
                        .unwrap_or_else(|| "(unknown)".into());
                    println!("{:<12}   {kind}: {} {} {shape}", "", v.name, v.datatype);
                }
            }
        }
    }
    if !m.referenced_by.is_empty() {
        println!("used by      {}", m.referenced_by.join(", "));
    }
}

/// A progress bar for long copies and uploads, only on a terminal and for large files.
fn bar(total: u64, label: &str) -> Option<indicatif::ProgressBar> {
    if total < (64 << 20) || !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:20} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_message(label.to_string());
    Some(pb)
}

/// Runs `kiln model ...`.
pub fn run(workspace: PathBuf, cmd: ModelCommand) -> anyhow::Result<()> {
    let mut ws = Workspace::open(&workspace).map_err(classify)?;
    match cmd {
        ModelCommand::Register(a) => {
            registry::check_name(&a.name).map_err(classify)?;
            let reg = Registration {
                name: a.name.clone(),
                description: a.description.clone(),
                tags: kvs(&a.tags)?.into_iter().collect(),
                properties: kvs(&a.properties)?.into_iter().collect(),
            };
            let sources = registry::collect_sources(&a.paths).map_err(classify)?;
            let total: u64 =
                sources.iter().filter_map(|s| std::fs::metadata(&s.from).ok()).map(|m| m.len()).sum();
            let pb = bar(total, &format!("registering {}", a.name));
            let mut done_before = 0u64;
            let mut current = String::new();
            let mut last = 0u64;
            let r = ws
                .register(&reg, &sources, |file, n| {
                    if file != current {
                        done_before += last;
                        current = file.to_string();
                    }
                    last = n;
                    if let Some(pb) = &pb {
                        pb.set_position(done_before + n);
                    }
                })
                .map_err(classify)?;
            if let Some(pb) = pb {
                pb.finish_and_clear();
            }
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&ws.show(&r.name, Some(r.version)).map_err(classify)?)?
                );
            } else {
                println!("{r}");
            }
        }
        ModelCommand::List(a) => {
            if let Some(n) = &a.name {
                registry::check_name(n).map_err(classify)?;
            }
            let filter = ListFilter {
                name: a.name.clone(),
                tags: a
                    .tags
                    .iter()
                    .map(|t| match t.split_once('=') {
                        Some((k, v)) => (k.to_string(), Some(v.to_string())),
                        None => (t.clone(), None),
                    })
                    .collect(),
                properties: kvs(&a.properties)?,
                all_versions: a.all_versions,
            };
            let rows = ws.list(&filter).map_err(classify)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print_table(&rows);
            }
        }
        ModelCommand::Show(a) => {
            let (name, version) = parse_model_ref(&a.model).map_err(classify)?;
            let m = ws.show(&name, version).map_err(classify)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                print_version(&m);
            }
        }
        ModelCommand::Tag(a) => {
            let (name, version) = exact(&a.model)?;
            if a.tags.is_empty() && a.remove.is_empty() {
                return Err(UsageError("give tags to set (K=V) or --remove K".into()).into());
            }
            ws.tag(&name, version, &kvs(&a.tags)?, &a.remove).map_err(classify)?;
        }
        ModelCommand::Property(a) => {
            let (name, version) = exact(&a.model)?;
            ws.add_properties(&name, version, &kvs(&a.properties)?).map_err(classify)?;
        }
        ModelCommand::Download(a) => {
            let (name, version) = parse_model_ref(&a.model).map_err(classify)?;
            let m = ws.download(&name, version, &a.dir).map_err(classify)?;
            println!("{}:{} -> {} ({} files)", m.name, m.version, a.dir.display(), m.files.len());
        }
        ModelCommand::Delete(a) => {
            let (name, version) = exact(&a.model)?;
            ws.delete(&name, version).map_err(classify)?;
            println!("deleted {name}:{version}");
        }
        ModelCommand::Push(a) => {
            let (name, version) = parse_model_ref(&a.model).map_err(classify)?;
            let m = ws.show(&name, version).map_err(classify)?;
            let mut reference = kiln_images::registry::parse_reference(&a.reference)
                .map_err(|e| UsageError(e.to_string()))?;
            if reference.tag().is_none() && reference.digest().is_none() {
                reference = format!("{}:{}", a.reference, m.version)
                    .parse()
                    .map_err(|e| UsageError(format!("{e}")))?;
            }
            let registry = kiln_images::registry::Registry::new(
                kiln_images::registry::RegistryOptions::from_env(a.insecure_registry),
            );
            let total = m.size_bytes;
            let pb = bar(total, &format!("pushing {}:{}", m.name, m.version));
            let pb_for_push = pb.clone();
            let report = super::registry_runtime()?.block_on(registry::artifact::push(
                &ws,
                &m,
                &registry,
                &reference,
                std::sync::Arc::new(move |_, n, _| {
                    if let Some(pb) = &pb_for_push {
                        pb.set_position(n.min(total));
                    }
                }),
            ))?;
            if let Some(pb) = pb {
                pb.finish_and_clear();
            }
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "pushed {}:{} to {reference}@{} ({} blob(s) uploaded, {}; {} already present)",
                    m.name,
                    m.version,
                    report.digest,
                    report.uploaded,
                    human_bytes(report.bytes_uploaded),
                    report.skipped + report.mounted
                );
            }
        }
        ModelCommand::Pull(a) => {
            let reference = kiln_images::registry::parse_reference(&a.reference)
                .map_err(|e| UsageError(e.to_string()))?;
            let registry = kiln_images::registry::Registry::new(
                kiln_images::registry::RegistryOptions::from_env(a.insecure_registry),
            );
            let (r, new) = super::registry_runtime()?
                .block_on(registry::artifact::pull(&mut ws, &registry, &reference))?;
            if new {
                println!("{r}");
            } else {
                println!("{r} (already in the workspace)");
            }
        }
    }
    Ok(())
}
