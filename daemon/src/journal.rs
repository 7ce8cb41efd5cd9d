//! Hand-off records under the state directory, so that a restarted ferryd
//! finishes what its predecessor had handed off (see
//! `ferry_engine::source::journal`).
//!
//! ```text
//!  <state-dir>/handoffs/<migration>.json   HandOff, written before COMMIT
//!  <state-dir>/handoffs/<migration>.ckpt   the last checkpoint applied (JSON)
//!  <state-dir>/handoffs/<migration>.pages  its pages, kept until the next
//!      ("FRYP", id u64 LE, count u64 LE, count page indices u64 LE,
//!      count x 4 KiB of data): written again into guest memory by a
//!      ferryd that finds the checkpoint recorded as being applied
//! ```
//!
//! Both are written to a temporary name and renamed, so a reader sees a
//! whole record or the previous one. No fsync: they must outlive ferryd's
//! process, not the host (whose death takes guest memory with it).
//! A migration's files go when it ends, unless its outcome is unknown (the
//! next ferryd asks the target again).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use ferry_engine::source::journal::{CheckpointRecord, HandOff, Journal};

/// The directory's name under the state directory.
pub const DIR: &str = "handoffs";

/// A hand-off found at start-up, with its last checkpoint.
#[derive(Clone, Debug)]
pub struct Found {
    /// The hand-off.
    pub hand_off: HandOff,
    /// The last checkpoint recorded (post-copy with take-back).
    pub checkpoint: Option<CheckpointRecord>,
}

/// The journal in `<state-dir>/handoffs`.
#[derive(Debug)]
pub struct FileJournal {
    dir: PathBuf,
}

impl FileJournal {
    /// The journal under `state_dir` (created when missing, mode 0700).
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = state_dir.join(DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        Ok(FileJournal { dir })
    }

    fn path(&self, session: &str, ext: &str) -> std::io::Result<PathBuf> {
        if session.is_empty() || !session.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("migration id {session:?} is not hex"),
            ));
        }
        Ok(self.dir.join(format!("{session}.{ext}")))
    }

    fn write(&self, path: &Path, value: &impl serde::Serialize) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        serde_json::to_writer(&mut f, value)?;
        f.write_all(b"\n")?;
        drop(f);
        std::fs::rename(&tmp, path)
    }

    /// Forgets migration `session` (it ended).
    pub fn remove(&self, session: &str) {
        for ext in ["json", "ckpt", "pages"] {
            if let Ok(p) = self.path(session, ext) {
                match std::fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!("cannot remove {}: {e}", p.display()),
                }
            }
        }
    }

    /// The hand-off of migration `session`, if one is recorded (and
    /// readable).
    pub fn find(&self, session: &str) -> Option<Found> {
        self.read(&self.path(session, "json").ok()?)
            .filter(|f| f.hand_off.session == session)
    }

    /// Every hand-off recorded, by VM name. A file that cannot be read is
    /// logged and left where it is for the operator (and the VM it names,
    /// if paused, stays paused).
    pub fn load(&self) -> HashMap<String, Found> {
        let mut found: HashMap<String, Found> = HashMap::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("cannot read {}: {e}", self.dir.display());
                return found;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let Some(Found {
                hand_off,
                checkpoint,
            }) = self.read(&path)
            else {
                continue;
            };
            tracing::info!(
                "hand-off of VM {} to {} recorded (migration {}, epoch {}, {})",
                hand_off.vm,
                hand_off.to,
                hand_off.session,
                hand_off.epoch,
                if hand_off.postcopy {
                    "post-copy"
                } else {
                    "pre-copy"
                }
            );
            let vm = hand_off.vm.clone();
            if let Some(old) = found.insert(
                vm.clone(),
                Found {
                    hand_off,
                    checkpoint,
                },
            ) {
                tracing::error!(
                    "two hand-off records for VM {vm}; migration {} is left to the operator",
                    old.hand_off.session
                );
            }
        }
        found
    }
}

impl FileJournal {
    /// The hand-off record at `path` with its checkpoint; `None`, logged,
    /// when either cannot be read (the files stay for the operator).
    fn read(&self, path: &Path) -> Option<Found> {
        let read = std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<HandOff>(&b).map_err(|e| e.to_string()));
        let hand_off = match read {
            Ok(h) => h,
            Err(e) => {
                tracing::error!("hand-off record {} is unusable: {e}", path.display());
                return None;
            }
        };
        let ckpt_path = path.with_extension("ckpt");
        let checkpoint = match std::fs::read(&ckpt_path) {
            Ok(b) => match serde_json::from_slice::<CheckpointRecord>(&b) {
                Ok(c) => Some(c),
                Err(e) => {
                    // Without it a take-back would go to the wrong state.
                    tracing::error!(
                        "checkpoint record {} is unusable ({e}); migration {} is left to the operator",
                        ckpt_path.display(),
                        hand_off.session
                    );
                    return None;
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::error!("cannot read {}: {e}", ckpt_path.display());
                return None;
            }
        };
        Some(Found {
            hand_off,
            checkpoint,
        })
    }
}

impl Journal for FileJournal {
    fn hand_off(&self, h: &HandOff) -> std::io::Result<()> {
        let path = self.path(&h.session, "json")?;
        self.write(&path, h)
    }

    fn checkpoint(&self, session: &str, c: &CheckpointRecord) -> std::io::Result<()> {
        let path = self.path(session, "ckpt")?;
        self.write(&path, c)
    }

    fn checkpoint_pages(
        &self,
        session: &str,
        id: u64,
        pages: &[u64],
        data: &[u8],
    ) -> std::io::Result<()> {
        let path = self.path(session, "pages")?;
        let tmp = path.with_extension("pages.tmp");
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        f.write_all(PAGES_MAGIC)?;
        f.write_all(&id.to_le_bytes())?;
        f.write_all(&(pages.len() as u64).to_le_bytes())?;
        for p in pages {
            f.write_all(&p.to_le_bytes())?;
        }
        f.write_all(data)?;
        f.into_inner().map_err(|e| e.into_error())?;
        std::fs::rename(&tmp, &path)
    }

    fn load_checkpoint_pages(
        &self,
        session: &str,
        id: u64,
    ) -> std::io::Result<Option<(Vec<u64>, Vec<u8>)>> {
        let path = self.path(session, "pages")?;
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let bad = |m: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {m}", path.display()),
            )
        };
        let word = |at: usize| -> Option<u64> {
            bytes
                .get(at..at + 8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        };
        if bytes.get(..4) != Some(PAGES_MAGIC) {
            return Err(bad("not a checkpoint pages file"));
        }
        let (Some(got), Some(count)) = (word(4), word(12)) else {
            return Err(bad("truncated header"));
        };
        if got != id {
            return Ok(None);
        }
        let count = usize::try_from(count).map_err(|_| bad("page count too large"))?;
        let want = count
            .checked_mul(8 + 4096)
            .and_then(|n| n.checked_add(20))
            .ok_or_else(|| bad("page count too large"))?;
        if bytes.len() != want {
            return Err(bad("its length does not match its page count"));
        }
        let pages = (0..count)
            .map(|i| word(20 + 8 * i).expect("length checked"))
            .collect();
        Ok(Some((pages, bytes[20 + 8 * count..].to_vec())))
    }
}

/// The first bytes of a checkpoint pages file.
const PAGES_MAGIC: &[u8; 4] = b"FRYP";

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system's temporary directory.
    struct Scratch(PathBuf);
    impl Scratch {
        fn new(tag: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("ferry-journal-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Scratch(p)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn hand_off(session: &str, vm: &str) -> HandOff {
        HandOff {
            session: session.into(),
            vm: vm.into(),
            to: "127.0.0.1:7070".into(),
            transport: "tcp".into(),
            streams: 2,
            epoch: 3,
            postcopy: true,
            take_back: true,
            grace_ms: 6000,
            released: false,
        }
    }

    #[test]
    fn records_round_trip_and_go_when_removed() {
        let dir = Scratch::new("round-trip");
        let j = FileJournal::open(dir.path()).unwrap();
        let h = hand_off("00112233445566778899aabbccddeeff", "vm0");
        j.hand_off(&h).unwrap();
        let c = CheckpointRecord {
            id: 7,
            applied: true,
            progress: 99,
            state: vec![1, 2, 3],
        };
        j.checkpoint(&h.session, &c).unwrap();
        let data: Vec<u8> = (0..2 * 4096).map(|i| i as u8).collect();
        j.checkpoint_pages(&h.session, 7, &[3, 9], &data).unwrap();
        assert_eq!(
            j.load_checkpoint_pages(&h.session, 7).unwrap(),
            Some((vec![3, 9], data))
        );
        assert_eq!(j.load_checkpoint_pages(&h.session, 8).unwrap(), None);
        let found = j.load();
        assert_eq!(found["vm0"].hand_off, h);
        assert_eq!(found["vm0"].checkpoint.as_ref(), Some(&c));
        j.remove(&h.session);
        assert!(j.load().is_empty());
        assert_eq!(j.load_checkpoint_pages(&h.session, 7).unwrap(), None);
        // A truncated pages file is an error, not a panic.
        j.checkpoint_pages(&h.session, 1, &[1], &[0; 4096]).unwrap();
        let p = j.path(&h.session, "pages").unwrap();
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() - 1]).unwrap();
        assert!(j.load_checkpoint_pages(&h.session, 1).is_err());
    }

    #[test]
    fn bad_records_are_skipped_and_kept() {
        let dir = Scratch::new("bad");
        let j = FileJournal::open(dir.path()).unwrap();
        let bad = dir.path().join(DIR).join("abcd.json");
        std::fs::write(&bad, b"{not json").unwrap();
        // A good hand-off whose checkpoint is unreadable is skipped too.
        let h = hand_off("00112233445566778899aabbccddeeff", "vm1");
        j.hand_off(&h).unwrap();
        std::fs::write(j.path(&h.session, "ckpt").unwrap(), b"[").unwrap();
        assert!(j.load().is_empty());
        assert!(bad.exists());
        assert!(j.hand_off(&hand_off("../x", "vm2")).is_err());
    }
}
