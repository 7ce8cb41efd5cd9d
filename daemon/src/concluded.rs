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
//!      {"id":"<migration>","stage":"committing","epoch":3,   before the guest runs
//!       "vmm":{"vm":"<name>","pid":1234,"start":5678}}
//! ```
//!
//! A migration whose last line is a stage was cut off by the death of the
//! daemon that wrote it (see `ConclusionStore`). `vmm` names the process
//! that was to run the guest (its pid and its start time in clock ticks
//! since boot, as `/proc/<pid>/stat` gives it, so a recycled pid is not
//! mistaken for it): a restarted ferryd settles the migration by it
//! (`crate::indoubt`).
//!
//! A line is appended with one write before the source can learn the
//! outcome. When the file holds twice the lines a reader needs, it is
//! rewritten with the newest half (temporary name, then rename). A line
//! that does not parse (a write torn by a crash) is skipped with a warning.
//! No fsync: like the hand-off records, it must outlive the process, not the
//! host.

use std::collections::HashMap;
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
    stage: Option<StageName>,
    /// With `committing`: the epoch COMMIT gave (0 in files written before
    /// it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    epoch: Option<u64>,
    /// With `committing`: the VMM that was to run the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vmm: Option<Vmm>,
}

#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum StageName {
    Prepared,
    Committing,
}

impl Line {
    fn record(self) -> Option<(String, Record, Option<Vmm>)> {
        match (self.outcome, self.stage) {
            (Some(c), None) => Some((self.id, Record::Ended(c), None)),
            (None, Some(StageName::Prepared)) => {
                Some((self.id, Record::Stage(Stage::Prepared), None))
            }
            (None, Some(StageName::Committing)) => Some((
                self.id,
                Record::Stage(Stage::Committing {
                    epoch: self.epoch.unwrap_or(0),
                }),
                self.vmm,
            )),
            _ => None,
        }
    }
}

/// The process that runs (or was to run) an incoming migration's guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vmm {
    /// The VM's name.
    pub vm: String,
    /// Its process id.
    pub pid: i32,
    /// When it started, in clock ticks since boot (field 22 of
    /// `/proc/<pid>/stat`): a pid reused by another process has another.
    pub start: u64,
}

impl Vmm {
    /// Process `pid`, if it is alive (a zombie is not).
    pub fn of(vm: &str, pid: i32) -> Option<Vmm> {
        let (state, start) = proc_stat(pid)?;
        (!matches!(state, 'Z' | 'X')).then(|| Vmm {
            vm: vm.to_string(),
            pid,
            start,
        })
    }

    /// Whether this very process still lives (and is not a zombie).
    pub fn alive(&self) -> bool {
        Vmm::of(&self.vm, self.pid).is_some_and(|now| now.start == self.start)
    }
}

/// State and start time of process `pid`, from `/proc/<pid>/stat`.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces or ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Fields 4 to 21 come between the state (3) and the start time (22).
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// The conclusions file of a state directory.
#[derive(Debug)]
pub struct FileConclusions {
    path: PathBuf,
    /// Lines in the file.
    lines: Mutex<usize>,
    /// The VMMs of running incoming migrations, written with their
    /// `committing` record ([`Self::note_vmm`]).
    running: Mutex<HashMap<String, Vmm>>,
    /// The VMMs of the last `committing` record of each migration, as
    /// loaded.
    loaded: Mutex<HashMap<String, Vmm>>,
}

impl FileConclusions {
    /// The file under `state_dir` (which must exist); read by
    /// [`ConclusionStore::load`].
    pub fn open(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(FILE),
            lines: Mutex::new(0),
            running: Mutex::default(),
            loaded: Mutex::default(),
        }
    }

    /// Migration `id`'s guest is to run in `vmm`: said with its
    /// `committing` record.
    pub fn note_vmm(&self, id: &str, vmm: Vmm) {
        lock(&self.running).insert(id.to_string(), vmm);
    }

    /// Migration `id` ended here (its VMM need not be named any more).
    pub fn forget_vmm(&self, id: &str) {
        lock(&self.running).remove(id);
    }

    /// The VMM the loaded `committing` record of migration `id` names.
    pub fn vmm_of(&self, id: &str) -> Option<Vmm> {
        lock(&self.loaded).get(id).cloned()
    }

    /// The records (with the VMM a `committing` one names), and whether
    /// the file needs a rewrite (a torn line).
    fn read(&self) -> (Vec<(String, Record, Option<Vmm>)>, bool) {
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

    fn rewrite(&self, keep: &[(String, Record, Option<Vmm>)]) -> std::io::Result<()> {
        let tmp = self.path.with_extension("jsonl.tmp");
        let mut body = String::new();
        for (id, record, vmm) in keep {
            body.push_str(&line(id, *record, vmm.clone())?);
        }
        std::fs::write(&tmp, body)?;
        std::fs::rename(&tmp, &self.path)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn line(id: &str, record: Record, vmm: Option<Vmm>) -> std::io::Result<String> {
    let (outcome, stage, epoch) = match record {
        Record::Ended(c) => (Some(c), None, None),
        Record::Stage(Stage::Prepared) => (None, Some(StageName::Prepared), None),
        Record::Stage(Stage::Committing { epoch }) => {
            (None, Some(StageName::Committing), Some(epoch))
        }
    };
    let vmm = vmm.filter(|_| epoch.is_some());
    let mut l = serde_json::to_string(&Line {
        id: id.to_string(),
        outcome,
        stage,
        epoch,
        vmm,
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
        *lock(&self.lines) = all.len();
        let mut loaded = lock(&self.loaded);
        loaded.clear();
        for (id, record, vmm) in &all {
            match (record, vmm) {
                (Record::Stage(Stage::Committing { .. }), Some(v)) => {
                    loaded.insert(id.clone(), v.clone());
                }
                _ => {
                    loaded.remove(id);
                }
            }
        }
        all.into_iter().map(|(id, r, _)| (id, r)).collect()
    }

    fn record(&self, id: &str, record: Record, kept: usize) -> std::io::Result<()> {
        let vmm = match record {
            Record::Stage(Stage::Committing { .. }) => lock(&self.running).get(id).cloned(),
            _ => None,
        };
        let mut lines = lock(&self.lines);
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
        f.write_all(line(id, record, vmm)?.as_bytes())?;
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
            .record("ee", Record::Stage(Stage::Committing { epoch: 4 }), 10)
            .unwrap();
        // A committing record names the VMM noted for it.
        let me = Vmm::of("vm-ff", std::process::id() as i32).expect("this process");
        assert!(me.alive());
        again.note_vmm("ff", me.clone());
        again
            .record("ff", Record::Stage(Stage::Committing { epoch: 7 }), 10)
            .unwrap();
        let mut after = before;
        after.push(("dd".to_string(), Record::Ended(Conclusion::Fenced)));
        after.push((
            "ee".to_string(),
            Record::Stage(Stage::Committing { epoch: 4 }),
        ));
        after.push((
            "ff".to_string(),
            Record::Stage(Stage::Committing { epoch: 7 }),
        ));
        let last = FileConclusions::open(&d);
        assert_eq!(last.load(), after);
        assert_eq!(last.vmm_of("ee"), None);
        assert_eq!(last.vmm_of("ff"), Some(me));
        // A line of an older ferryd, without the epoch: epoch 0.
        let mut raw = std::fs::OpenOptions::new()
            .append(true)
            .open(d.join(FILE))
            .unwrap();
        raw.write_all(b"{\"id\":\"gg\",\"stage\":\"committing\"}\n")
            .unwrap();
        drop(raw);
        assert_eq!(
            FileConclusions::open(&d).load().last(),
            Some(&(
                "gg".to_string(),
                Record::Stage(Stage::Committing { epoch: 0 })
            ))
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_vmm_is_known_by_its_pid_and_start_time() {
        let me = Vmm::of("vm", std::process::id() as i32).expect("this process");
        assert!(me.alive());
        // The same pid with another start time: a recycled pid.
        let other = Vmm {
            start: me.start + 1,
            ..me.clone()
        };
        assert!(!other.alive());
        // A process that exited and was reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        // (Linux hands out pids in order: this one is not reused so soon.)
        assert!(Vmm::of("vm", pid).is_none());
        // A zombie (exited, not reaped) is dead too.
        let mut zombie = std::process::Command::new("true").spawn().unwrap();
        let zpid = zombie.id() as i32;
        let t0 = std::time::Instant::now();
        while proc_stat(zpid).is_some_and(|(state, _)| state != 'Z') {
            assert!(t0.elapsed() < std::time::Duration::from_secs(10));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(Vmm::of("vm", zpid).is_none());
        zombie.wait().unwrap();
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
