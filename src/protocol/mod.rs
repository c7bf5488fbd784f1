//! Wire formats Kiln speaks.

pub mod v2;
