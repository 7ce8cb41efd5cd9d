//! Wire protocol.
/// Wire errors.
#[derive(Debug, thiserror::Error)]
pub enum WireError { /// placeholder
#[error("x")] X }
