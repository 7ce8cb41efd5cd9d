//! How incoming migrations ended, under the state directory, so that a
//! restarted target ferryd still answers a source that asks (see
//! `ferry_engine::target::ConclusionStore`).
//!
//! ```text
//!  <state-dir>/concluded.jsonl   one JSON object per line, oldest first:
//!      {"id":"<migration>","outcome":{"kind":"completed","epoch":3}}
//!      {"id":"<migration>","outcome":{"kind":"aborted"}}
//!      {"id":"<migration>","outcome":{"kind":"fenced"}}
//!      {"id":"<migration>","stage":"prepared"}     before PREPARED goes out
//!      {"id":"<migration>","stage":"committing"}   before the guest runs
//! ```
//!
//! A migration whose last line is a stage was cut off by the death of the
//! daemon that wrote it (see `ConclusionStore`).
//!
//! A line is appended with one write before the source can learn the
//! outcome. When the file holds twice the lines a reader needs, it is
//! rewritten with the newest half (temporary name, then rename). A line
//! that does not parse (a write torn by a crash) is skipped with a warning.
//! No fsync: like the hand-off records, it must outlive the process, not the
//! host.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ferry_engine::target::{ConclusionStore, Record, Stage};
use ferry_engine::wire::Conclusion;
use serde::{Deserialize, Serialize};

/// The file's name under the state directory.
pub const FILE: &str = "concluded.jsonl";

#[derive(Serialize, Deserialize)]
struct Line {
    id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outcome: Option<Conclusion>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stage: Option<Stage>,
}

impl Line {
    fn record(self) -> Option<(String, Record)> {
        match (self.outcome, self.stage) {
            (Some(c), None) => Some((self.id, Record::Ended(c))),
            (None, Some(s)) => Some((self.id, Record::Stage(s))),
            _ => None,
        }
    }
}

/// The conclusions file of a state directory.
#[derive(Debug)]
pub struct FileConclusions {
    path: PathBuf,
    /// Lines in the file.
    lines: Mutex<usize>,
}

impl FileConclusions {
    /// The file under `state_dir` (which must exist); read by
    /// [`ConclusionStore::load`].
    pub fn open(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(FILE),
            lines: Mutex::new(0),
        }
    }

    /// The records, and whether the file needs a rewrite (a torn line).
    fn read(&self) -> (Vec<(String, Record)>, bool) {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Vec::new(), false),
            Err(e) => {
                tracing::warn!("{}: {e}; no past migrations known", self.path.display());
                return (Vec::new(), false);
            }
        };
        let mut torn = !text.is_empty() && !text.ends_with(b"\n");
        let mut out = Vec::new();
        for (n, line) in text.split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            match serde_json::from_slice::<Line>(line).map(Line::record) {
                Ok(Some(r)) => out.push(r),
                Ok(None) => {
                    torn = true;
                    tracing::warn!(
                        "{} line {}: skipped: not one outcome or one stage",
                        self.path.display(),
                        n + 1
                    );
                }
                Err(e) => {
                    torn = true;
                    tracing::warn!("{} line {}: skipped: {e}", self.path.display(), n + 1);
                }
            }
        }
        (out, torn)
    }

    fn rewrite(&self, keep: &[(String, Record)]) -> std::io::Result<()> {
        let tmp = self.path.with_extension("jsonl.tmp");
        let mut body = String::new();
        for (id, record) in keep {
            body.push_str(&line(id, *record)?);
        }
        std::fs::write(&tmp, body)?;
        std::fs::rename(&tmp, &self.path)
    }
}

fn line(id: &str, record: Record) -> std::io::Result<String> {
    let (outcome, stage) = match record {
        Record::Ended(c) => (Some(c), None),
        Record::Stage(s) => (None, Some(s)),
    };
    let mut l = serde_json::to_string(&Line {
        id: id.to_string(),
        outcome,
        stage,
    })
    .map_err(std::io::Error::other)?;
    l.push('\n');
    Ok(l)
}

impl ConclusionStore for FileConclusions {
    fn load(&self) -> Vec<(String, Record)> {
        let (all, torn) = self.read();
        if torn {
            // Appending after a torn line would glue the next record to it.
            if let Err(e) = self.rewrite(&all) {
                tracing::warn!("{}: could not rewrite: {e}", self.path.display());
            }
        }
        *self.lines.lock().unwrap_or_else(|p| p.into_inner()) = all.len();
        all
    }

    fn record(&self, id: &str, record: Record, kept: usize) -> std::io::Result<()> {
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        if *lines >= 2 * kept.max(1) {
            let (all, _) = self.read();
            let keep = &all[all.len().saturating_sub(kept.saturating_sub(1))..];
            self.rewrite(keep)?;
            *lines = keep.len();
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        // One write: a crash leaves the line whole or torn, never interleaved.
        f.write_all(line(id, record)?.as_bytes())?;
        *lines += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-concluded-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn records_survive_a_reopen_and_torn_lines_are_skipped() {
        let d = dir("reopen");
        let f = FileConclusions::open(&d);
        assert!(f.load().is_empty());
        f.record("aa", Record::Ended(Conclusion::Completed { epoch: 3 }), 10)
            .unwrap();
        f.record("bb", Record::Stage(Stage::Prepared), 10).unwrap();
        f.record("bb", Record::Ended(Conclusion::Aborted), 10)
            .unwrap();
        // A crash in the middle of a write.
        let mut raw = std::fs::OpenOptions::new()
            .append(true)
            .open(d.join(FILE))
            .unwrap();
        raw.write_all(b"{\"id\":\"cc\",\"outc").unwrap();
        drop(raw);
        let again = FileConclusions::open(&d);
        let before = vec![
            (
                "aa".to_string(),
                Record::Ended(Conclusion::Completed { epoch: 3 }),
            ),
            ("bb".to_string(), Record::Stage(Stage::Prepared)),
            ("bb".to_string(), Record::Ended(Conclusion::Aborted)),
        ];
        assert_eq!(again.load(), before);
        // The torn line is gone, so the next record stands on its own line.
        again
            .record("dd", Record::Ended(Conclusion::Fenced), 10)
            .unwrap();
        again
            .record("ee", Record::Stage(Stage::Committing), 10)
            .unwrap();
        let mut after = before;
        after.push(("dd".to_string(), Record::Ended(Conclusion::Fenced)));
        after.push(("ee".to_string(), Record::Stage(Stage::Committing)));
        assert_eq!(FileConclusions::open(&d).load(), after);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_file_is_cut_to_the_newest_when_it_doubles() {
        let d = dir("cut");
        let f = FileConclusions::open(&d);
        f.load();
        for i in 0..25u64 {
            f.record(
                &format!("{i:02x}"),
                Record::Ended(Conclusion::Completed { epoch: i }),
                5,
            )
            .unwrap();
        }
        let all = FileConclusions::open(&d).load();
        assert!(all.len() <= 10, "{}", all.len());
        assert!(all.len() >= 5);
        assert_eq!(
            all.last().unwrap(),
            &(
                "18".to_string(),
                Record::Ended(Conclusion::Completed { epoch: 24 })
            )
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
