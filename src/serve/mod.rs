//! `kiln serve`: the hyper server that runs models in-process.
//!
//! Request path: connection -> route -> protocol adapter (V2, V1, Azure) -> admission (bounded
//! in flight) -> the model's batch queue -> an idle instance thread -> `Session::infer` -> split
//! -> response. Configuration is validated before anything binds; listeners come up first so
//! liveness answers while models load, and readiness turns 200 once every model is loaded. On
//! SIGTERM or SIGINT readiness turns 503 at once, new requests get 503, and admitted ones finish
//! within the grace period before the process exits 0.

pub mod admission;
pub mod auth;
pub mod azure;
pub mod batcher;
pub mod binary;
pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
pub mod nested;
pub mod repository;
pub mod stats;
pub mod v1;
pub mod v2;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use self::admission::Admission;
use self::config::ServeConfig;
use self::http::AppState;
use self::metrics::Metrics;
use self::repository::Repository;

/// Which handler a listener runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Listener {
    Api,
    MetricsOnly,
}

async fn accept_loop(
    listener: TcpListener,
    kind: Listener,
    state: Arc<AppState>,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Slow or stalled clients may not hold a connection open forever before sending headers.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(30));
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let state = Arc::clone(&state);
                let service = service_fn(move |req| {
                    let state = Arc::clone(&state);
                    async move {
                        match kind {
                            Listener::Api => http::handle(state, req).await,
                            Listener::MetricsOnly => http::handle_metrics(state, req).await,
                        }
                    }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!("connection ended with an error: {e}");
                    }
                });
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    // Idle keep-alive connections close now; busy ones after their current response.
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await.is_err() {
        tracing::warn!("some connections did not close within 5 s");
    }
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    let listener =
        TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} ({what})"))?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, listener = what, "listening");
    Ok(listener)
}

/// Resolves on SIGTERM or SIGINT.
async fn termination() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = terminate => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

/// Runs the server until SIGTERM/SIGINT and the drain that follows.
pub async fn run(config: ServeConfig) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let repo = Arc::new(Repository::new(config.clone(), Arc::clone(&metrics)));
    let admission = Admission::new(config.max_in_flight);
    let grace = config.grace_period;
    let state =
        Arc::new(AppState { repo: Arc::clone(&repo), admission: Arc::clone(&admission), metrics, config });

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut loops = Vec::new();
    let api = bind(state.config.listen, "api").await?;
    loops.push(tokio::spawn(accept_loop(api, Listener::Api, Arc::clone(&state), stop_rx.clone())));
    if let Some(addr) = state.config.metrics_listen {
        let m = bind(addr, "metrics").await?;
        loops.push(tokio::spawn(accept_loop(m, Listener::MetricsOnly, Arc::clone(&state), stop_rx.clone())));
    }

    let signal = termination();
    tokio::pin!(signal);
    let started = Instant::now();
    tokio::select! {
        failures = repo.load_all() => {
            if !failures.is_empty() {
                anyhow::bail!("{} model(s) failed to load: {}", failures.len(), failures.join("; "));
            }
            tracing::info!(models = repo.ready_models().len(), ms = started.elapsed().as_millis() as u64, "server ready");
        }
        _ = &mut signal => {
            tracing::info!("stopping before the models finished loading");
            let _ = stop_tx.send(true);
            return Ok(());
        }
    }

    signal.await;
    admission.start_draining();
    let pending = admission.in_flight();
    tracing::info!(
        in_flight = pending,
        grace_ms = grace.as_millis() as u64,
        "draining: readiness is 503, finishing admitted requests"
    );
    let drained = tokio::time::timeout(grace, admission.wait_idle()).await.is_ok();
    let _ = stop_tx.send(true);
    for l in loops {
        let _ = l.await;
    }
    let repo_for_stop = Arc::clone(&repo);
    let _ = tokio::task::spawn_blocking(move || repo_for_stop.shutdown()).await;
    if drained {
        tracing::info!("drained; exiting");
        Ok(())
    } else {
        anyhow::bail!(
            "grace period of {} ms ended with {} request(s) unfinished",
            grace.as_millis(),
            admission.in_flight()
        )
    }
}
