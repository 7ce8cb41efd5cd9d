//! `--report FILE`: one JSON object per line for each lifecycle event, so
//! tests and benchmarks can compare the source's memory and disk hashes at
//! pause with the target's at restore (`disk_hash` is empty without a disk;
//! a disk that cannot be hashed at pause adds `disk_hash_error`).
//!
//! ```text
//! {"event":"registered","ts_ms":..,"vm_id":"vm0","role":"source"}
//! {"event":"paused","ts_ms":..,"mem_hash":"<16 hex>","disk_hash":"<16 hex or empty>",
//!  "blocks_written":N,"progress":N,"pause_us":..,"hash_ms":..}
//! {"event":"resumed","ts_ms":..,"progress":N}
//! {"event":"restored","ts_ms":..,"checked":true,"mem_hash":"..","pages_checked":..,"pages_bad":..,
//!  "verify_ms":..,"disk_hash":"..","blocks_checked":..,"blocks_bad":..}
//! {"event":"running","ts_ms":..,"progress":N}
//! {"event":"quit","ts_ms":..,"reason":"..","progress":N}
//! ```

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Appends event lines to a file.
#[derive(Clone, Debug)]
pub struct Report {
    path: PathBuf,
}

impl Report {
    /// A report appending to `path` (created on the first event).
    pub fn new(path: &Path) -> Self {
        Report {
            path: path.to_path_buf(),
        }
    }

    /// Appends `{"event": event, "ts_ms": now, ..fields}`. A report that
    /// cannot be written is logged, never fatal to the VM.
    pub fn event(&self, event: &str, fields: serde_json::Value) {
        let ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut obj = serde_json::json!({"event": event, "ts_ms": ts_ms});
        if let (Some(o), serde_json::Value::Object(extra)) = (obj.as_object_mut(), fields) {
            o.extend(extra);
        }
        let mut line = obj.to_string();
        line.push('\n');
        let r = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = r {
            tracing::warn!("cannot write report {}: {e}", self.path.display());
        }
    }
}
