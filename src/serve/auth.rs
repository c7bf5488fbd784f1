//! Bearer-key authentication, compared in constant time.

use http::HeaderMap;
use http::header::AUTHORIZATION;
use subtle::ConstantTimeEq;

use super::error::ApiError;

/// Checks `Authorization: Bearer <key>` when a key is configured.
pub fn check(key: Option<&str>, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = key else { return Ok(()) };
    let presented = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .unwrap_or("");
    // `ct_eq` on slices of different lengths returns false without comparing contents; the only
    // thing a timing observer can learn is the key's length.
    if bool::from(presented.as_bytes().ct_eq(key.as_bytes())) { Ok(()) } else { Err(ApiError::Unauthorized) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn bearer_keys() {
        let mut h = HeaderMap::new();
        assert!(check(None, &h).is_ok());
        assert_eq!(check(Some("k3y"), &h), Err(ApiError::Unauthorized));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer k3y"));
        assert!(check(Some("k3y"), &h).is_ok());
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer k3"));
        assert!(check(Some("k3y"), &h).is_err());
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic k3y"));
        assert!(check(Some("k3y"), &h).is_err());
    }
}
