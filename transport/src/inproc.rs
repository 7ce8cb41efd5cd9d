//! In-process transport.
