//! ferry daemon library
