//! `kiln image ...`: build, list, show, delete, export and push OCI images.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::UsageError;
use super::model::{classify, human_bytes};
use crate::backends::{BackendChoice, BackendConfig};
use crate::package::export::{self, Format};
use crate::package::{self, BuildError, BuildRequest};
use crate::registry::{Workspace, parse_model_ref};

/// `kiln image` subcommands.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Package registered models and a serving configuration into an OCI image; prints its digest.
    Build(BuildArgs),
    /// List the images in the workspace.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show an image: digest, layers, entrypoint, user, ports, labels, models.
    Show {
        /// NAME:TAG.
        #[arg(value_name = "NAME:TAG")]
        image: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete an image tag (its blobs go at `workspace gc`); its models can then be deleted.
    Delete {
        /// NAME:TAG.
        #[arg(value_name = "NAME:TAG")]
        image: String,
    },
    /// Export an image as an OCI directory, OCI archive or docker archive.
    Export {
        /// NAME:TAG.
        #[arg(value_name = "NAME:TAG")]
        image: String,
        /// Output format.
        #[arg(long, value_enum)]
        format: Format,
        /// Output path.
        path: PathBuf,
    },
    /// Push an image to an OCI registry.
    Push(PushArgs),
}

/// Arguments of `kiln image build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// A registered model, NAME or NAME:VERSION (repeatable).
    #[arg(long = "model", required = true, value_name = "NAME[:VERSION]")]
    pub models: Vec<String>,
    /// Serving settings (kiln.toml: [serve] and [models.NAME] sections) to package.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Engine to package for: auto adds ONNX Runtime only when a model needs it.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// ONNX Runtime library to package (default: the one kiln finds).
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
    /// Base image REF (registry/repo:tag or @digest), or `scratch` (the default: nothing else).
    #[arg(long, default_value = "scratch", value_name = "REF|scratch")]
    pub base: String,
    /// Talk plain HTTP to the base image's registry.
    #[arg(long)]
    pub insecure_registry: bool,
    /// Record the image as NAME:TAG.
    #[arg(long, value_name = "NAME:TAG")]
    pub tag: String,
    /// Replace NAME:TAG if it exists.
    #[arg(long)]
    pub force: bool,
    /// The kiln binary to package [default: the running one].
    #[arg(long, value_name = "PATH", hide = true)]
    pub kiln_binary: Option<PathBuf>,
    /// Print the build report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `kiln image push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// NAME:TAG in the workspace.
    #[arg(value_name = "NAME:TAG")]
    pub image: String,
    /// Destination REGISTRY/REPO:TAG.
    #[arg(value_name = "REGISTRY/REPO:TAG")]
    pub reference: String,
    /// Talk plain HTTP to the registry.
    #[arg(long)]
    pub insecure_registry: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn build_error(e: BuildError) -> anyhow::Error {
    match e {
        BuildError::Invalid(m) => UsageError(m).into(),
        BuildError::Failed(m) => anyhow::anyhow!(m),
    }
}

/// Runs `kiln image ...`.
pub fn run(workspace: PathBuf, cmd: ImageCommand) -> anyhow::Result<()> {
    let ws = Workspace::open(&workspace).map_err(classify)?;
    match cmd {
        ImageCommand::Build(a) => {
            let models = a
                .models
                .iter()
                .map(|m| parse_model_ref(m).map_err(classify))
                .collect::<Result<Vec<_>, _>>()?;
            let req = BuildRequest {
                models,
                config: a.config.clone(),
                backend: BackendConfig {
                    choice: a.backend,
                    ort_lib: a.ort_lib.clone(),
                    ..Default::default()
                },
                base: (a.base != "scratch").then(|| a.base.clone()),
                insecure_registry: a.insecure_registry,
                tag: a.tag.clone(),
                force: a.force,
                kiln_binary: a.kiln_binary.clone(),
            };
            let verbose = std::io::stderr().is_terminal();
            let report = super::registry_runtime()?
                .block_on(package::build(&ws, &req, &|line| {
                    if verbose {
                        eprintln!("  {line}");
                    } else {
                        tracing::info!("{line}");
                    }
                }))
                .map_err(build_error)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for l in &report.layers {
                    eprintln!(
                        "  layer {:<32} {:>10}  {}{}",
                        l.content,
                        human_bytes(l.size),
                        &l.digest[..19],
                        if l.cached { "  (cached)" } else { "" }
                    );
                }
                eprintln!("  {} compressed", human_bytes(report.compressed_size));
                println!("{}", report.digest);
            }
        }
        ImageCommand::List { json } => {
            let mut rows = Vec::new();
            for e in ws.layout().index()? {
                let img = kiln_images::image::read_image(ws.layout(), &e.digest)?;
                let size: u64 = img.layers.iter().map(|l| l.1).sum();
                let models = img.config["config"]["Labels"]["dev.kiln.models"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                rows.push(serde_json::json!({
                    "tag": e.name, "digest": e.digest.to_string(), "created": img.config["created"],
                    "compressed_size": size, "models": models,
                }));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{:<32} {:<21} {:>10}  MODELS", "TAG", "DIGEST", "SIZE");
                for r in rows {
                    let digest = r["digest"].as_str().unwrap_or_default();
                    println!(
                        "{:<32} {:<21} {:>10}  {}",
                        r["tag"].as_str().unwrap_or_default(),
                        &digest[..digest.len().min(19)],
                        human_bytes(r["compressed_size"].as_u64().unwrap_or(0)),
                        r["models"].as_str().unwrap_or_default()
                    );
                }
            }
        }
        ImageCommand::Show { image, json } => {
            let (entry, img) = export::load(&ws, &image).map_err(build_error)?;
            let doc = serde_json::json!({
                "tag": entry.name,
                "digest": entry.digest.to_string(),
                "manifest": img.manifest,
                "config": img.config,
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                let c = &img.config["config"];
                println!("tag          {}", entry.name);
                println!("digest       {}", entry.digest);
                println!("created      {}", img.config["created"].as_str().unwrap_or_default());
                println!("entrypoint   {}", c["Entrypoint"]);
                println!("user         {}", c["User"].as_str().unwrap_or_default());
                println!("ports        {}", c["ExposedPorts"]);
                println!("env          {}", c["Env"]);
                let history = img.config["history"].as_array().cloned().unwrap_or_default();
                let offset = history.len().saturating_sub(img.layers.len());
                for (i, (d, size, media)) in img.layers.iter().enumerate() {
                    let by =
                        history.get(offset + i).and_then(|h| h["created_by"].as_str()).unwrap_or_default();
                    println!(
                        "{:<12} {}  {:>10}  {}  {}",
                        if i == 0 { "layers" } else { "" },
                        &d.to_string()[..19],
                        human_bytes(*size),
                        media.rsplit('.').next().unwrap_or_default(),
                        by
                    );
                }
                if let Some(labels) = c["Labels"].as_object() {
                    for (i, (k, v)) in labels.iter().enumerate() {
                        println!(
                            "{:<12} {k}={}",
                            if i == 0 { "labels" } else { "" },
                            v.as_str().unwrap_or_default()
                        );
                    }
                }
            }
        }
        ImageCommand::Delete { image } => {
            export::find(&ws, &image).map_err(build_error)?;
            ws.layout().remove_index_entry(&image)?;
            ws.remove_references("image", &image).map_err(classify)?;
            println!("deleted {image}");
        }
        ImageCommand::Export { image, format, path } => {
            export::export(&ws, &image, format, &path).map_err(build_error)?;
            println!("{image} -> {}", path.display());
        }
        ImageCommand::Push(a) => {
            let reference = kiln_images::registry::parse_reference(&a.reference)
                .map_err(|e| UsageError(e.to_string()))?;
            let registry = kiln_images::registry::Registry::new(
                kiln_images::registry::RegistryOptions::from_env(a.insecure_registry),
            );
            let bars = std::io::stderr().is_terminal().then(indicatif::MultiProgress::new);
            let active: std::sync::Arc<
                std::sync::Mutex<std::collections::HashMap<String, indicatif::ProgressBar>>,
            > = Default::default();
            let progress: crate::registry::artifact::PushProgress =
                std::sync::Arc::new(move |label: &str, n: u64, total: u64| {
                    let Some(bars) = &bars else { return };
                    if total < (16 << 20) {
                        return;
                    }
                    let mut active = active.lock().unwrap_or_else(|p| p.into_inner());
                    let bar = active.entry(label.to_string()).or_insert_with(|| {
                        let b = bars.add(indicatif::ProgressBar::new(total));
                        b.set_style(
                            indicatif::ProgressStyle::with_template(
                                "{msg:14} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
                            )
                            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                        );
                        b.set_message(label.to_string());
                        b
                    });
                    bar.set_position(n);
                    if n >= total {
                        bar.finish();
                    }
                });
            let report = super::registry_runtime()?
                .block_on(export::push(&ws, &a.image, &registry, &reference, progress))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "pushed {} to {reference}@{} ({} blob(s) uploaded, {} already present, {} mounted)",
                    a.image, report.digest, report.uploaded, report.skipped, report.mounted
                );
            }
        }
    }
    Ok(())
}
