//! Every error a client can see, and the one mapping from error kind to HTTP status.

use std::time::Duration;

use http::StatusCode;

/// An error answered to an HTTP client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// The request is malformed or does not fit the model.
    BadRequest(String),
    /// No or wrong bearer key.
    Unauthorized,
    /// Unknown route, model or version.
    NotFound(String),
    /// The route exists, not for this method.
    MethodNotAllowed(&'static str),
    /// The body exceeds `--max-body-bytes`.
    PayloadTooLarge(usize),
    /// A content type or encoding the route does not read.
    UnsupportedMediaType(String),
    /// Admission limits reached (in-flight or queue); retry shortly.
    TooManyRequests(String),
    /// Not ready, draining, or the model is not loaded.
    Unavailable(String),
    /// The request did not finish within `--request-timeout`.
    Timeout(Duration),
    /// The backend failed on a valid request.
    Internal(String),
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Seconds a client should wait before retrying, for overload and unavailability.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            ApiError::TooManyRequests(_) => Some(1),
            ApiError::Unavailable(_) => Some(5),
            _ => None,
        }
    }

    /// The message for the client.
    pub fn message(&self) -> String {
        match self {
            ApiError::BadRequest(m)
            | ApiError::NotFound(m)
            | ApiError::UnsupportedMediaType(m)
            | ApiError::TooManyRequests(m)
            | ApiError::Unavailable(m)
            | ApiError::Internal(m) => m.clone(),
            ApiError::Unauthorized => {
                "missing or invalid credentials: send the header `Authorization: Bearer <key>`".into()
            }
            ApiError::MethodNotAllowed(allowed) => format!("method not allowed; use {allowed}"),
            ApiError::PayloadTooLarge(limit) => {
                format!("request body exceeds the limit of {limit} bytes (--max-body-bytes)")
            }
            ApiError::Timeout(t) => {
                format!("request did not complete within {} ms (--request-timeout)", t.as_millis())
            }
        }
    }
}

impl From<kiln_runtime_core::Error> for ApiError {
    fn from(e: kiln_runtime_core::Error) -> Self {
        use kiln_runtime_core::Error as E;
        match e {
            E::InvalidInput(m) => ApiError::BadRequest(m),
            E::Unavailable { .. } => ApiError::Unavailable(e.to_string()),
            E::Inference(_) | E::ModelFile { .. } | E::InvalidModel { .. } | E::Unsupported { .. } => {
                ApiError::Internal(e.to_string())
            }
        }
    }
}
