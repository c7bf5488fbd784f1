//! Kiln: register, package, push, deploy and serve ONNX models from one binary.
//!
//! The crate map, data path and commands are in the README. This library is what the `kiln`
//! binary is made of, exposed so integration tests and benches drive the same code.
#![forbid(unsafe_code)]

pub mod backends;
pub mod cli;
pub mod logging;
pub mod package;
pub mod protocol;
pub mod registry;
pub mod serve;
