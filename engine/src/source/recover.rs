//! Finishing a migration that a previous daemon handed off and then died
//! ([`super::journal`] has what it recorded).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_transport::Transport;

use super::journal::{CheckpointRecord, HandOff};
use super::{hex, Migration, Outcome, PushEnd, Reconnect, Serve, SourceConfig};
use crate::bitmap::DirtyBitmap;
use crate::metrics::Status;
use crate::postcopy::checkpoint::SourceCheckpoints;
use crate::wire::{self, Conclusion, Mode};
use crate::{Cancel, GuestMem, Key, Metrics, MigrationError, SourceVm, VmState};

/// Finishes migration `rec` of the paused VM `vm`, whose daemon died after
/// recording the hand-off (and `checkpoint`, the last checkpoint it
/// recorded), as the daemon would have:
///
/// - post-copy: reconnect (RESUME) and serve the rest of the guest's
///   memory; take the VM back from `checkpoint` when the target is lost
///   (as [`super::migrate_out`] does);
/// - a pre-copy switch, or a target that has ended the migration: ask the
///   target how it ended (CONCLUDED), then hand the VM off (`Ok`), resume
///   it here ([`MigrationError::PeerAborted`]: COMMIT never took effect
///   there), or take it back.
///
/// A target that never answers leaves a pre-copy VM paused with
/// [`MigrationError::CommitUnknown`] after `cfg.inquiry_max` (or a cancel):
/// resuming it could run it twice.
/// `cfg` gives the timeouts; the record gives everything else.
#[allow(clippy::too_many_arguments)]
pub fn recover_out(
    transport: &dyn Transport,
    key: &Key,
    rec: &HandOff,
    checkpoint: Option<&CheckpointRecord>,
    mem: Arc<GuestMem>,
    vm: &mut dyn SourceVm,
    cfg: &SourceConfig,
    metrics: Arc<Metrics>,
    cancel: &Cancel,
) -> Result<Outcome, MigrationError> {
    let session = parse_session(&rec.session)?;
    if rec.streams == 0 || rec.streams > wire::STREAMS_MAX {
        return Err(MigrationError::Invalid(format!(
            "the record has {} streams",
            rec.streams
        )));
    }
    // The recovery's connections carry a priority stream whatever the
    // original mode was (RESUME sessions always do).
    let mut cfg = cfg.clone();
    cfg.mode = Mode::Postcopy;
    cfg.postcopy_grace = Duration::from_millis(rec.grace_ms.max(1));
    cfg.session = Some(session);
    let cfg = &cfg;
    metrics.update(|s| {
        s.status = if rec.postcopy {
            Status::Postcopy
        } else {
            Status::Committing
        };
        s.mode = if rec.postcopy { "postcopy" } else { "precopy" }.into();
        s.transport = transport.name().into();
        s.streams = u32::from(rec.streams);
        s.mem_bytes = mem.bytes();
        s.epoch = rec.epoch;
        if rec.postcopy {
            s.postcopy = Some(crate::postcopy::PostcopyStats::default());
        }
    });
    let checkpoints = Arc::new(SourceCheckpoints::restored(
        mem.clone(),
        metrics.clone(),
        cfg.journal.clone().map(|j| (j, rec.session.clone())),
        checkpoint,
    ));
    let mut m = Migration::new(
        cfg,
        &metrics,
        cancel,
        mem,
        rec.streams,
        session,
        Some(checkpoints),
    );
    m.rollback_ok = vm.can_rollback();
    m.released = rec.released;
    *m.hand_off.lock().unwrap_or_else(|p| p.into_inner()) = Some(rec.clone());
    m.paused = true;
    m.commit_sent = true;
    let r = Reconnect {
        transport,
        to: &rec.to,
        key,
        vm: &rec.vm,
        session,
    };
    let result = if rec.postcopy {
        // Which pages were stale at the switch died with the old daemon:
        // the target says which it lacks, and any page may be among them.
        let all = DirtyBitmap::full(m.mem.pages());
        let state = VmState {
            blob: Vec::new(),
            progress: checkpoint.map_or(0, |c| c.progress),
        };
        let serve = Serve {
            pending: &all,
            server: None,
            round: 0,
            epoch: rec.epoch,
            take_back: rec.take_back && m.rollback_ok,
            state: &state,
            broke: Some("this host's ferryd restarted".into()),
            switch_after: 0,
            running_at: Instant::now(),
            wire_bytes: Arc::new(AtomicU64::new(0)),
        };
        m.serve_postcopy(vm, &r, serve)
    } else {
        m.inquire(vm, &r, rec.epoch)
    };
    if let Err(e) = &result {
        if !m.paused {
            // The VM runs here again: the dirty log the old ferryd started
            // for the migration serves nothing now and slows the guest.
            if let Err(se) = vm.stop_dirty_log() {
                tracing::warn!("could not stop dirty logging: {se}");
            }
        }
        super::record_failure(&metrics, e);
    }
    result
}

fn parse_session(s: &str) -> Result<[u8; 16], MigrationError> {
    let bad =
        || MigrationError::Invalid(format!("the record's session {s:?} is not 32 hex digits"));
    if s.len() != 32 || !s.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    debug_assert_eq!(hex(&out), s.to_ascii_lowercase());
    Ok(out)
}

impl Migration<'_> {
    /// A pre-copy switch whose COMMIT may or may not have reached the
    /// target: ask it, and act on the answer.
    pub(super) fn inquire(
        &mut self,
        vm: &mut dyn SourceVm,
        r: &Reconnect<'_>,
        epoch: u64,
    ) -> Result<Outcome, MigrationError> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(100);
        let mut attempt = 0u32;
        let last = loop {
            if self.cancel.is_cancelled() {
                break "cancelled".to_string();
            }
            attempt += 1;
            let empty = DirtyBitmap::new(self.mem.pages());
            let wire_bytes = Arc::new(AtomicU64::new(0));
            let e = match self.try_resume(r, &empty, &wire_bytes) {
                Err(PushEnd::Concluded(c)) => {
                    let mut ignored = 0;
                    self.stop_connection(&mut ignored);
                    return self.conclude_precopy(vm, c, epoch);
                }
                Ok((_, server)) => {
                    server.stop();
                    "the target resumed a pre-copy migration as a post-copy".to_string()
                }
                Err(e) => e.message(),
            };
            let mut ignored = 0;
            self.stop_connection(&mut ignored);
            if start.elapsed() >= self.cfg.inquiry_max {
                break e;
            }
            tracing::info!(
                attempt,
                "asking the target how the switch ended: {e}; again in {delay:?}"
            );
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(5));
        };
        Err(MigrationError::CommitUnknown(format!(
            "the target did not say whether COMMIT took effect ({attempt} attempts, last: {last}); \
             the VM stays paused here"
        )))
    }

    fn conclude_precopy(
        &mut self,
        vm: &mut dyn SourceVm,
        c: Conclusion,
        epoch: u64,
    ) -> Result<Outcome, MigrationError> {
        match c {
            Conclusion::Completed { epoch: e } => {
                tracing::info!(epoch = e, "the target runs the VM: handing it off");
                self.metrics.finish(Status::Completed, None);
                if let Err(err) = vm.hand_off(e) {
                    tracing::error!(
                        "the VM runs on the target but the local VMM did not stop: {err}"
                    );
                }
                Ok(Outcome { epoch: e })
            }
            Conclusion::Aborted => {
                vm.resume().map_err(|e| {
                    MigrationError::CommitUnknown(format!(
                        "the target never ran the VM, but it could not be resumed here: {e}"
                    ))
                })?;
                self.paused = false;
                self.metrics.update(|s| s.epoch = epoch.saturating_sub(1));
                Err(MigrationError::PeerAborted(
                    "COMMIT never took effect on the target; the VM runs here again".into(),
                ))
            }
            Conclusion::Fenced => {
                // Only a restarted target says so of a pre-copy: its ferryd
                // died while starting the guest and the guest's VMM is gone
                // since. The guest may have run there for a while; it runs
                // nowhere now, so it runs here again from the switch (what
                // it did there is lost, as in a take-back).
                vm.resume().map_err(|e| {
                    MigrationError::CommitUnknown(format!(
                        "the target's guest is stopped for good, but the VM could not be \
                         resumed here: {e}"
                    ))
                })?;
                self.paused = false;
                self.metrics.update(|s| s.epoch = epoch + 1);
                Err(MigrationError::TakenBack(
                    "the target's VMM died before it could say whether the guest ran there; \
                     the VM runs here again from the switch"
                        .into(),
                ))
            }
        }
    }
}
