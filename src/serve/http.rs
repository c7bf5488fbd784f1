//! The HTTP front: routing, auth, body limits, response building, request ids and metrics.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use tracing::Instrument;

use super::admission::Admission;
use super::config::ServeConfig;
use super::error::ApiError;
use super::metrics::Metrics;
use super::repository::Repository;
use super::{auth, azure, v1, v2};

/// Responses carry their whole body.
pub type Resp = Response<Full<Bytes>>;

/// Everything a request handler needs.
pub struct AppState {
    /// Models.
    pub repo: Arc<Repository>,
    /// Admission control and the draining switch.
    pub admission: Arc<Admission>,
    /// Telemetry.
    pub metrics: Arc<Metrics>,
    /// Validated configuration.
    pub config: ServeConfig,
}

/// Which protocol a route belongs to: sets the error body shape and the metrics label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// Open Inference Protocol V2.
    V2,
    /// KServe V1 / TF-Serving style.
    V1,
    /// Azure ML `/score` contract.
    Azure,
    /// Metrics and anything unrouted.
    Other,
}

impl Protocol {
    /// Metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::V2 => "v2",
            Protocol::V1 => "v1",
            Protocol::Azure => "azure",
            Protocol::Other => "other",
        }
    }
}

/// A JSON response.
pub fn json<T: Serialize + ?Sized>(status: StatusCode, body: &T) -> Resp {
    match serde_json::to_vec(body) {
        Ok(bytes) => with_type(status, "application/json", bytes.into()),
        Err(e) => {
            with_type(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("encoding failed: {e}").into())
        }
    }
}

/// A response with a body and content type.
pub fn with_type(status: StatusCode, content_type: &'static str, body: Bytes) -> Resp {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// The protocol's error body with the error's status (and Retry-After when it has one).
pub fn error_response(protocol: Protocol, e: &ApiError) -> Resp {
    let message = e.message();
    let mut r = match protocol {
        Protocol::Azure => json(e.status(), &serde_json::json!({ "message": message })),
        _ => json(e.status(), &serde_json::json!({ "error": message })),
    };
    if let Some(secs) = e.retry_after() {
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}

/// Reads the whole body, refusing more than `limit` bytes.
pub async fn read_body(body: Incoming, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let declared =
        headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::PayloadTooLarge(limit)),
        Err(e) => Err(ApiError::BadRequest(format!("could not read the request body: {e}"))),
    }
}

/// Refuses compressed bodies and content types other than JSON (or octet-stream when binary
/// data is allowed). A missing content type is read as JSON: tritonclient sends none.
pub fn check_content(headers: &HeaderMap, allow_binary: bool) -> Result<(), ApiError> {
    if let Some(enc) = headers.get(CONTENT_ENCODING) {
        let enc = enc.to_str().unwrap_or("?");
        if !enc.eq_ignore_ascii_case("identity") {
            return Err(ApiError::UnsupportedMediaType(format!(
                "Content-Encoding {enc:?} is not supported; send the body uncompressed"
            )));
        }
    }
    let Some(ct) = headers.get(CONTENT_TYPE) else { return Ok(()) };
    let ct = ct.to_str().unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let ok = ct.is_empty()
        || ct == "application/json"
        || ct.ends_with("+json")
        || (allow_binary && ct == "application/octet-stream");
    if ok {
        Ok(())
    } else {
        let accepted =
            if allow_binary { "application/json or application/octet-stream" } else { "application/json" };
        let hint = if ct == "application/x-www-form-urlencoded" {
            " (curl -d sets this type: add -H 'Content-Type: application/json')"
        } else {
            ""
        };
        Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type {ct:?} is not supported; send {accepted}{hint}"
        )))
    }
}

/// The routes.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    V2Server,
    V2Live,
    V2Ready,
    V2Models,
    V2AllStats,
    V2Model { name: &'a str, version: Option<&'a str>, action: ModelAction },
    RepoIndex,
    RepoLoad(&'a str),
    RepoUnload(&'a str),
    V1Model(&'a str),
    V1Predict(&'a str),
    AzureHealth,
    AzureScore,
    Swagger,
    Metrics,
    NotFound,
}

/// What a `/v2/models/{m}[/versions/{v}]/...` route does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelAction {
    /// Metadata.
    Metadata,
    /// Model readiness.
    Ready,
    /// Inference.
    Infer,
    /// Triton model configuration.
    Config,
    /// Triton statistics.
    Stats,
}

fn route(path: &str) -> Route<'_> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match segs.as_slice() {
        [""] | [] => Route::AzureHealth,
        ["score"] => Route::AzureScore,
        ["swagger.json"] => Route::Swagger,
        ["metrics"] => Route::Metrics,
        ["v2"] => Route::V2Server,
        ["v2", "health", "live"] => Route::V2Live,
        ["v2", "health", "ready"] => Route::V2Ready,
        ["v2", "models"] => Route::V2Models,
        ["v2", "models", "stats"] => Route::V2AllStats,
        ["v2", "repository", "index"] => Route::RepoIndex,
        ["v2", "repository", "models", m, "load"] => Route::RepoLoad(m),
        ["v2", "repository", "models", m, "unload"] => Route::RepoUnload(m),
        ["v2", "models", m, rest @ ..] => {
            let (version, rest) = match rest {
                ["versions", v, rest @ ..] => (Some(*v), rest),
                _ => (None, rest),
            };
            let action = match rest {
                [] => ModelAction::Metadata,
                ["ready"] => ModelAction::Ready,
                ["infer"] => ModelAction::Infer,
                ["config"] => ModelAction::Config,
                ["stats"] => ModelAction::Stats,
                _ => return Route::NotFound,
            };
            Route::V2Model { name: m, version, action }
        }
        ["v1", "models", m] => match m.split_once(':') {
            Some((name, "predict")) => Route::V1Predict(name),
            Some(_) => Route::NotFound,
            None => Route::V1Model(m),
        },
        _ => Route::NotFound,
    }
}

fn protocol_of(route: &Route<'_>) -> Protocol {
    match route {
        Route::V1Model(_) | Route::V1Predict(_) => Protocol::V1,
        Route::AzureHealth | Route::AzureScore | Route::Swagger => Protocol::Azure,
        Route::Metrics | Route::NotFound => Protocol::Other,
        _ => Protocol::V2,
    }
}

fn exempt_from_auth(route: &Route<'_>) -> bool {
    matches!(route, Route::V2Live | Route::V2Ready | Route::AzureHealth | Route::Metrics)
}

fn request_id(headers: &HeaderMap) -> String {
    ["x-request-id", "x-ms-request-id", "x-ms-client-request-id"]
        .iter()
        .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(new_request_id)
}

/// A random-looking UUID v4 without a syscall per request: a per-process random seed, a counter
/// and the SplitMix64 finaliser.
fn new_request_id() -> String {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let seed = *SEED.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let (a, b) = (mix(seed ^ n), mix(seed.rotate_left(17) ^ n.wrapping_add(0x9e37_79b9_7f4a_7c15)));
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&a.to_le_bytes());
    bytes[8..].copy_from_slice(&b.to_le_bytes());
    uuid::Builder::from_random_bytes(bytes).into_uuid().to_string()
}

/// What a handler tells the access accounting: the model it served, for labels.
#[derive(Default)]
pub struct Served {
    /// Model name, when the route named one.
    pub model: String,
    /// Version label.
    pub version: String,
}

fn method_is(req: &Request<Incoming>, m: Method, allowed: &'static str) -> Result<(), ApiError> {
    if req.method() == m { Ok(()) } else { Err(ApiError::MethodNotAllowed(allowed)) }
}

async fn dispatch(state: &AppState, req: Request<Incoming>, served: &mut Served) -> Result<Resp, ApiError> {
    let path = req.uri().path().to_string();
    let route = route(&path);
    if !exempt_from_auth(&route) {
        auth::check(state.config.auth_key.as_deref(), req.headers())?;
    }
    match route {
        Route::V2Server => {
            method_is(&req, Method::GET, "GET")?;
            Ok(v2::server_metadata())
        }
        Route::V2Live => {
            Ok(with_type(StatusCode::OK, "application/json", Bytes::from_static(b"{\"live\":true}")))
        }
        Route::V2Ready => {
            if !state.admission.is_draining() && state.repo.all_ready() {
                Ok(with_type(StatusCode::OK, "application/json", Bytes::from_static(b"{\"ready\":true}")))
            } else {
                let why = if state.admission.is_draining() {
                    "server is shutting down"
                } else {
                    "models are not ready"
                };
                Err(ApiError::Unavailable(why.into()))
            }
        }
        Route::V2Models => {
            method_is(&req, Method::GET, "GET")?;
            Ok(v2::list_models(&state.repo))
        }
        Route::V2AllStats => Ok(v2::all_stats(&state.repo)),
        Route::V2Model { name, version, action } => {
            served.model = name.to_string();
            v2::model_route(state, req, name, version, action, served).await
        }
        Route::RepoIndex => {
            method_is(&req, Method::POST, "POST")?;
            Ok(json(StatusCode::OK, &state.repo.index()))
        }
        Route::RepoLoad(name) => {
            method_is(&req, Method::POST, "POST")?;
            state.repo.load(name).await?;
            Ok(json(StatusCode::OK, &serde_json::json!({})))
        }
        Route::RepoUnload(name) => {
            method_is(&req, Method::POST, "POST")?;
            state.repo.unload(name)?;
            Ok(json(StatusCode::OK, &serde_json::json!({})))
        }
        Route::V1Model(name) => {
            served.model = name.to_string();
            v1::model_status(state, name)
        }
        Route::V1Predict(name) => {
            method_is(&req, Method::POST, "POST")?;
            served.model = name.to_string();
            v1::predict(state, req, name, served).await
        }
        Route::AzureHealth => {
            Ok(with_type(StatusCode::OK, "text/plain; charset=utf-8", Bytes::from_static(b"Healthy")))
        }
        Route::AzureScore => {
            method_is(&req, Method::POST, "POST")?;
            azure::score(state, req, served).await
        }
        Route::Swagger => {
            method_is(&req, Method::GET, "GET")?;
            azure::swagger(state, &req)
        }
        Route::Metrics => Ok(metrics_response(&state.metrics)),
        Route::NotFound => Err(ApiError::NotFound(format!("no route for {} {path}", req.method()))),
    }
}

/// The Prometheus text exposition.
pub fn metrics_response(metrics: &Metrics) -> Resp {
    with_type(StatusCode::OK, "text/plain; version=0.0.4", metrics.render().into())
}

/// Serves one request: routing, error bodies, request id, metrics and the access log.
pub async fn handle(state: Arc<AppState>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let started = Instant::now();
    let rid = request_id(req.headers());
    let protocol = protocol_of(&route(req.uri().path()));
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let span = tracing::info_span!("request", id = %rid);
    let mut served = Served::default();
    state.metrics.in_flight().inc();
    let result = dispatch(&state, req, &mut served).instrument(span.clone()).await;
    state.metrics.in_flight().dec();
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            let _enter = span.enter();
            match &e {
                ApiError::Internal(m) => tracing::error!(%method, %path, "{m}"),
                ApiError::TooManyRequests(_) => state.metrics.reject("overload"),
                ApiError::Unavailable(_) if state.admission.is_draining() => state.metrics.reject("draining"),
                _ => tracing::debug!(%method, %path, status = e.status().as_u16(), "{}", e.message()),
            }
            error_response(protocol, &e)
        }
    };
    if let Ok(v) = HeaderValue::from_str(&rid) {
        let name = if protocol == Protocol::Azure { "x-ms-request-id" } else { "x-request-id" };
        resp.headers_mut().insert(name, v);
    }
    let status = resp.status().as_u16();
    let elapsed_us = started.elapsed().as_micros() as u64;
    span.in_scope(|| tracing::debug!(%method, %path, status, elapsed_us, "served"));
    state.metrics.observe_request(
        &served.model,
        &served.version,
        protocol.label(),
        status,
        started.elapsed(),
    );
    Ok(resp)
}

/// Serves only `/metrics` (the optional separate metrics listener).
pub async fn handle_metrics(state: Arc<AppState>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    Ok(match req.uri().path() {
        "/metrics" => metrics_response(&state.metrics),
        other => error_response(
            Protocol::Other,
            &ApiError::NotFound(format!("no route for {other}; try /metrics")),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("/v2/health/ready"), Route::V2Ready);
        assert_eq!(
            route("/v2/models/iris/versions/2/infer"),
            Route::V2Model { name: "iris", version: Some("2"), action: ModelAction::Infer }
        );
        assert_eq!(
            route("/v2/models/iris/"),
            Route::V2Model { name: "iris", version: None, action: ModelAction::Metadata }
        );
        assert_eq!(route("/v2/models/iris/versions/2/bogus"), Route::NotFound);
        assert_eq!(route("/v1/models/iris:predict"), Route::V1Predict("iris"));
        assert_eq!(route("/v1/models/iris:explain"), Route::NotFound);
        assert_eq!(route("/"), Route::AzureHealth);
        assert_eq!(route("/v2/repository/models/iris/unload"), Route::RepoUnload("iris"));
    }

    #[test]
    fn content_types() {
        let mut h = HeaderMap::new();
        assert!(check_content(&h, false).is_ok());
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
        assert!(check_content(&h, false).is_ok());
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        assert!(check_content(&h, true).is_ok());
        assert!(check_content(&h, false).is_err());
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/csv"));
        assert_eq!(check_content(&h, true).unwrap_err().status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        h.remove(CONTENT_TYPE);
        h.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert!(check_content(&h, true).is_err());
    }
}
