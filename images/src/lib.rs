//! Kiln's OCI library: a content-addressed blob store laid out as an OCI image layout, and a
//! registry client for pushing and pulling artifacts and images.
#![forbid(unsafe_code)]

pub mod base;
pub mod digest;
pub mod image;
pub mod layer;
pub mod layout;
pub mod registry;

/// Installs the TLS crypto provider once per process (ring: builds with a C compiler only).
pub fn init_tls() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
