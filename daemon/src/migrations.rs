//! The table of migrations (outgoing and incoming), and outgoing migrations:
//! one thread each, around [`ferry_engine::source::migrate_out`].
//!
//! ```text
//!  POST /migrations ─▶ validate ─▶ take VM (state migrating) ─▶ thread:
//!      migrate_out ── Ok ───────────────▶ VM migrated-away (record kept)
//!                  ── CommitUnknown ────▶ VM paused, status unknown (logged loudly)
//!                  ── other Err ────────▶ VM running here again
//!                  ── panic ────────────▶ VM paused, status unknown (state not known)
//! ```

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_engine::linkvm::LinkVm;
use ferry_engine::source::{migrate_out, SourceConfig};
use ferry_engine::{Cancel, Metrics, MigrationError, Snapshot, Status};

use crate::api::{ApiError, MigrateRequest};
use crate::daemon::Daemon;
use crate::journal::Found;
use crate::util::{lock, panic_message, spawn_logged};
use crate::vms::{resync, Done, Lent, TakeError};

/// Finished migrations kept for `GET /migrations` (the oldest final ones go first).
pub const MIGRATIONS_KEPT: usize = 256;
/// Stream count range: one stream works; 64 saturates any NIC we know of
/// long before the per-stream threads cost more than they bring.
pub const STREAMS_MAX: u32 = 64;
/// Downtime budget cap: a minute of pause is no longer a live migration.
pub const DOWNTIME_MS_MAX: u64 = 60_000;
/// XOR-delta cache cap (the engine also caps it at the guest's size).
pub const XOR_CACHE_MIB_MAX: u64 = 1 << 20;
/// Rounds cap: convergence that needs more than 1000 rounds will not come.
pub const ROUNDS_MAX: u32 = 1000;
/// Time cap for one migration: a day.
pub const TIME_MAX_S: u64 = 86_400;
/// How long a migration request waits for a VMM that is answering a stats
/// query (at most `vms::STATS_TIMEOUT`, plus slack).
const TAKE_WAIT: Duration = Duration::from_secs(3);
/// Deadline for each VMM request during a migration (pause, dirty-log sync of
/// a large guest). A VMM silent this long is treated as dead.
pub const VMM_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// One migration, either way.
pub struct Migration {
    /// Its id.
    pub id: String,
    /// Its live numbers and final status.
    pub metrics: Arc<Metrics>,
    /// Cancels it (outgoing only: the engine's target side has no cancel).
    pub cancel: Option<Cancel>,
}

/// All migrations this ferryd ran or runs, oldest first.
#[derive(Default)]
pub struct MigrationTable {
    inner: Mutex<VecDeque<Arc<Migration>>>,
}

impl MigrationTable {
    /// Adds a migration (replacing an ended one of the same id: a resumed
    /// migration), dropping the oldest final ones over the cap.
    pub fn insert(&self, m: Migration) -> Arc<Migration> {
        let m = Arc::new(m);
        let mut t = lock(&self.inner);
        t.retain(|old| old.id != m.id);
        while t.len() >= MIGRATIONS_KEPT {
            let Some(i) = t.iter().position(|m| m.metrics.status().is_final()) else {
                break;
            };
            t.remove(i);
        }
        t.push_back(Arc::clone(&m));
        m
    }

    /// The migration `id`.
    pub fn get(&self, id: &str) -> Option<Arc<Migration>> {
        lock(&self.inner).iter().find(|m| m.id == id).cloned()
    }

    /// Snapshots of all, oldest first.
    pub fn list(&self) -> Vec<Snapshot> {
        let all: Vec<Arc<Migration>> = lock(&self.inner).iter().cloned().collect();
        all.iter().map(|m| m.metrics.snapshot()).collect()
    }

    /// Asks migration `id` to stop.
    pub fn cancel(&self, id: &str) -> Result<(), ApiError> {
        let m = self
            .get(id)
            .ok_or_else(|| ApiError::not_found(format!("no migration with id {id:?}")))?;
        let status = m.metrics.status();
        if status.is_final() {
            return Err(ApiError::conflict(format!(
                "migration {id} already ended ({})",
                status_name(status)
            )));
        }
        if status == Status::Unknown {
            return Err(ApiError::conflict(format!(
                "migration {id} sent COMMIT and its outcome is unknown; it cannot be cancelled"
            )));
        }
        let cancel = m
            .cancel
            .as_ref()
            .ok_or_else(|| ApiError::conflict(format!("migration {id} cannot be cancelled")))?;
        cancel.cancel();
        tracing::info!("migration {id}: cancel requested");
        Ok(())
    }

    /// Cancels every outgoing migration that can still stop (shutdown).
    pub fn cancel_all(&self) {
        let all: Vec<Arc<Migration>> = lock(&self.inner).iter().cloned().collect();
        for m in all {
            if let Some(c) = m.cancel.as_ref().filter(|_| !m.metrics.status().is_final()) {
                c.cancel();
            }
        }
    }
}

/// The kebab-case name of a status, as in the JSON.
pub fn status_name(s: Status) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// Checks a request's values and builds the engine's settings.
pub fn source_config(req: &MigrateRequest) -> Result<SourceConfig, ApiError> {
    let bad = |m: String| ApiError::bad_request(m);
    let mut cfg = SourceConfig::default();
    crate::util::check_vm_name(&req.vm).map_err(|e| bad(format!("\"vm\": {e}")))?;
    crate::config::split_host_port(&req.to).map_err(|e| bad(format!("\"to\": {e}")))?;
    if req.to.ends_with(":0") {
        return Err(bad(format!("\"to\": {:?} has port 0", req.to)));
    }
    if let Some(n) = req.streams {
        cfg.streams = NonZeroU32::new(n)
            .filter(|n| n.get() <= STREAMS_MAX)
            .ok_or_else(|| bad(format!("\"streams\" must be 1 to {STREAMS_MAX}, got {n}")))?;
    }
    if let Some(ms) = req.downtime_ms {
        if !(1..=DOWNTIME_MS_MAX).contains(&ms) {
            return Err(bad(format!(
                "\"downtime_ms\" must be 1 to {DOWNTIME_MS_MAX}, got {ms}"
            )));
        }
        cfg.downtime_ms = ms;
    }
    if let Some(b) = req.bandwidth_mib_s {
        if b == 0 {
            return Err(bad(
                "\"bandwidth_mib_s\" must be above 0 (omit it for no cap)".into(),
            ));
        }
        cfg.bandwidth_mib_s = Some(b);
    }
    if let Some(r) = req.rounds_max {
        if !(1..=ROUNDS_MAX).contains(&r) {
            return Err(bad(format!(
                "\"rounds_max\" must be 1 to {ROUNDS_MAX}, got {r}"
            )));
        }
        cfg.rounds_max = r;
    }
    if let Some(t) = req.time_max_s {
        if !(1..=TIME_MAX_S).contains(&t) {
            return Err(bad(format!(
                "\"time_max_s\" must be 1 to {TIME_MAX_S}, got {t}"
            )));
        }
        cfg.time_max = Duration::from_secs(t);
    }
    if let Some(p) = &req.policy {
        cfg.policy = p.parse().map_err(|e| bad(format!("\"policy\": {e}")))?;
    }
    if let Some(m) = &req.mode {
        cfg.mode = m.parse().map_err(|e| bad(format!("\"mode\": {e}")))?;
    }
    if let Some(g) = req.postcopy_grace_s {
        if !(1..=3600).contains(&g) {
            return Err(bad(format!(
                "\"postcopy_grace_s\" must be 1 to 3600, got {g}"
            )));
        }
        cfg.postcopy_grace = Duration::from_secs(g);
    }
    if let Some(ms) = req.checkpoint_ms {
        if ms != 0 && !(10..=60_000).contains(&ms) {
            return Err(bad(format!(
                "\"checkpoint_ms\" must be 0 (none) or 10 to 60000, got {ms}"
            )));
        }
        cfg.checkpoint_interval = Duration::from_millis(ms);
    }
    let lease_ms = cfg.postcopy_grace.as_millis() as u64 / 2;
    let ckpt_ms = cfg.checkpoint_interval.as_millis() as u64;
    if cfg.mode.may_postcopy() && ckpt_ms > 0 && lease_ms < 2 * ckpt_ms {
        return Err(bad(format!(
            "a post-copy grace of {} s is too short for checkpoints every {ckpt_ms} ms: \
             the target's lease (half the grace) must cover two",
            cfg.postcopy_grace.as_secs()
        )));
    }
    if let Some(ms) = req.downtime_max_ms {
        if !(1..=DOWNTIME_MS_MAX).contains(&ms) {
            return Err(bad(format!(
                "\"downtime_max_ms\" must be 1 to {DOWNTIME_MS_MAX}, got {ms}"
            )));
        }
        if ms < cfg.downtime_ms {
            return Err(bad(format!(
                "\"downtime_max_ms\" ({ms}) is below \"downtime_ms\" ({})",
                cfg.downtime_ms
            )));
        }
        cfg.downtime_max_ms = ms;
    }
    if let Some(mib) = req.xor_cache_mib {
        if mib > XOR_CACHE_MIB_MAX {
            return Err(bad(format!(
                "\"xor_cache_mib\" must be 0 to {XOR_CACHE_MIB_MAX}, got {mib}"
            )));
        }
        cfg.xor_cache_bytes = Some(mib << 20);
    }
    Ok(cfg)
}

/// Starts an outgoing migration; returns its id once its thread runs.
pub fn start_outgoing(d: &Arc<Daemon>, req: MigrateRequest) -> Result<String, ApiError> {
    let mut cfg = source_config(&req)?;
    cfg.journal = Some(d.journal.clone());
    cfg.placement = match &req.placement {
        None => d.cfg.placement.clone(),
        Some(p) => ferry_engine::numa::PlacementPolicy::parse_for_host(p)
            .map_err(|e| ApiError::bad_request(format!("\"placement\": {e}")))?,
    };
    let kind = match &req.transport {
        None => d.cfg.transport,
        Some(t) => t
            .parse::<crate::transports::TransportKind>()
            .map_err(|e| ApiError::bad_request(format!("\"transport\": {e}")))?,
    };
    let transport = crate::transports::get(kind, &d.cfg.rdma)
        .map_err(|e| ApiError::bad_request(format!("\"transport\": {e}")))?;
    if d.is_shutting_down() {
        return Err(ApiError {
            status: 503,
            message: "ferryd is shutting down".into(),
        });
    }
    // The session id doubles as the migration id, so both hosts show the same one.
    let session: [u8; 16] = ferry_engine::key::random_bytes();
    cfg.session = Some(session);
    let id: String = session.iter().map(|b| format!("{b:02x}")).collect();
    let lent = d
        .vms
        .take_for_migration(&req.vm, &id, TAKE_WAIT)
        .map_err(|e| match e {
            TakeError::NotFound(_) => ApiError::not_found(e.to_string()),
            TakeError::Conflict(_) => ApiError::conflict(e.to_string()),
        })?;
    let metrics = Arc::new(Metrics::new(&id, &req.vm, "source", &req.to));
    metrics.update(|s| {
        s.transport = transport.name().into();
        s.streams = cfg.streams.get();
        s.mem_bytes = lent.spec.mem_bytes();
        s.epoch = lent.epoch;
    });
    let cancel = Cancel::new();
    d.migrations.insert(Migration {
        id: id.clone(),
        metrics: Arc::clone(&metrics),
        cancel: Some(cancel.clone()),
    });
    tracing::info!(
        "migration {id}: {} to {} ({} streams, downtime {} ms)",
        req.vm,
        req.to,
        cfg.streams,
        cfg.downtime_ms
    );
    let job = Outgoing {
        d: Arc::clone(d),
        vm: req.vm,
        to: req.to,
        transport,
        disk_fs_aware: req.disk_fs_aware,
        cfg,
        metrics,
        cancel,
    };
    // The lent VM is handed back by the thread; if it cannot start, here.
    let slot = Arc::new(Mutex::new(Some(lent)));
    let slot2 = Arc::clone(&slot);
    let guard = d.threads.enter();
    let d2 = Arc::clone(d);
    let vm = job.vm.clone();
    let started = spawn_logged(format!("out-{id}"), move || {
        let _guard = guard;
        if let Some(lent) = lock(&slot2).take() {
            job.run(lent);
        }
    });
    if !started {
        if let Some(lent) = lock(&slot).take() {
            d2.vms.migration_done(
                &vm,
                &lent.id,
                Done::Back {
                    link: lent.link,
                    paused: false,
                    epoch: None,
                },
            );
        }
        return Err(ApiError::internal("cannot start the migration thread"));
    }
    Ok(id)
}

struct Outgoing {
    d: Arc<Daemon>,
    vm: String,
    to: String,
    transport: Arc<dyn ferry_transport::Transport>,
    disk_fs_aware: bool,
    cfg: SourceConfig,
    metrics: Arc<Metrics>,
    cancel: Cancel,
}

impl Outgoing {
    fn run(self, lent: Lent) {
        let Lent {
            id: vm_id,
            spec,
            mem,
            disk,
            epoch,
            mut link,
            desync,
        } = lent;
        let mut cfg = self.cfg.clone();
        cfg.disk = disk.map(|file| ferry_engine::source::DiskSource {
            file,
            fs_aware: self.disk_fs_aware,
        });
        let result = if desync && resync(&mut link).is_err() {
            Ok(Err(MigrationError::Invalid(
                "the VMM did not answer an earlier request; try again".into(),
            )))
        } else {
            let _ = link.link().set_timeout(Some(VMM_CALL_TIMEOUT));
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                migrate_out(
                    self.transport.as_ref(),
                    &self.to,
                    &self.d.key,
                    &spec,
                    epoch,
                    Arc::clone(&mem),
                    &mut link,
                    &cfg,
                    Arc::clone(&self.metrics),
                    &self.cancel,
                )
            }))
        };
        let ended = Ended {
            d: &self.d,
            vm: &self.vm,
            vm_id: &vm_id,
            to: &self.to,
            metrics: &self.metrics,
        };
        ended.finish(result, link);
    }
}

/// An outgoing migration (or the recovery of one) whose thread ends.
struct Ended<'a> {
    d: &'a Arc<Daemon>,
    vm: &'a str,
    vm_id: &'a str,
    to: &'a str,
    metrics: &'a Metrics,
}

type EngineResult = std::thread::Result<Result<ferry_engine::source::Outcome, MigrationError>>;

impl Ended<'_> {
    /// Puts the VM back in the table as the result says, and forgets the
    /// hand-off record unless the outcome is unknown.
    fn finish(&self, result: EngineResult, link: LinkVm) {
        let id = self.metrics.snapshot().id;
        let (vm, to) = (self.vm, self.to);
        let mut unknown = false;
        let done = match result {
            Ok(Ok(outcome)) => {
                tracing::info!(
                    "migration {id}: {vm} now runs on {to} (epoch {})",
                    outcome.epoch
                );
                if !self.metrics.status().is_final() {
                    self.metrics.finish(Status::Completed, None);
                }
                Done::Away {
                    epoch: outcome.epoch,
                }
            }
            Ok(Err(e @ (MigrationError::CommitUnknown(_) | MigrationError::PostcopyBroken(_)))) => {
                tracing::error!(
                    "migration {id}: {e}. VM {vm} stays PAUSED here; find out from {to} whether it runs there"
                );
                self.mark_unknown(e.to_string());
                unknown = true;
                Done::Back {
                    link,
                    paused: true,
                    epoch: None,
                }
            }
            Ok(Err(e)) => {
                tracing::warn!("migration {id}: {e}; VM {vm} keeps running here");
                if !self.metrics.status().is_final() {
                    let status = match e {
                        MigrationError::Cancelled => Status::Cancelled,
                        _ => Status::Failed,
                    };
                    self.metrics.finish(status, Some(e.to_string()));
                }
                // Taken back after a lost post-copy: ownership moved back
                // with a new epoch.
                let epoch = matches!(e, MigrationError::TakenBack(_))
                    .then(|| self.metrics.snapshot().epoch);
                Done::Back {
                    link: resumable(link),
                    paused: false,
                    epoch,
                }
            }
            Err(panic) => {
                let msg = panic_message(&panic);
                tracing::error!(
                    "migration {id} panicked ({msg}); VM {vm} is left PAUSED here as its state is unknown"
                );
                self.mark_unknown(format!("ferryd's migration thread panicked: {msg}"));
                unknown = true;
                Done::Back {
                    link,
                    paused: true,
                    epoch: None,
                }
            }
        };
        self.d.vms.migration_done(vm, self.vm_id, done);
        // After the VM is back: a crash in between leaves a stale record,
        // which a restarted ferryd drops when the VM registers running.
        if !unknown {
            self.d.journal.remove(&id);
        }
    }

    fn mark_unknown(&self, error: String) {
        self.metrics.update(|s| {
            s.status = Status::Unknown;
            s.error.get_or_insert(error);
        });
    }
}

/// A VMM registered again with this ferryd (its predecessor died or
/// stopped), its VM paused or not, with the hand-off record a predecessor
/// left for it, if any:
///
/// ```text
///  paused + record     finish the migration (recover_out), on a thread
///  paused, no record   the VM never left: resume it (no COMMIT went out)
///  running + record    the record is stale (the VM was resumed here after
///                      it was written): forget it
///  running, no record  nothing to do
/// ```
pub fn reattached(d: &Arc<Daemon>, name: &str, paused: bool, found: Option<Found>) {
    match (found, paused) {
        (Some(f), true) => start_recovery(d, name, f),
        (Some(f), false) => {
            tracing::warn!(
                "VM {name} runs here: the hand-off record of migration {} is stale; removed",
                f.hand_off.session
            );
            d.journal.remove(&f.hand_off.session);
            stop_logging(d, name);
        }
        (None, true) => resume_orphan(d, name),
        (None, false) => stop_logging(d, name),
    }
}

/// A running VM registered again may still log dirty pages for a
/// migration that died with the old ferryd: stop that.
fn stop_logging(d: &Arc<Daemon>, name: &str) {
    with_vmm(d, name, false, |link| {
        if let Err(e) = ferry_engine::SourceVm::stop_dirty_log(link) {
            tracing::warn!("VM {name}: cannot stop its dirty log: {e}");
        }
        false
    });
}

/// A paused VM with no hand-off record: whatever paused it never sent
/// COMMIT, so the VM is this host's. Runs it again (and stops the dirty log
/// the dead migration left on).
fn resume_orphan(d: &Arc<Daemon>, name: &str) {
    with_vmm(d, name, true, |link| {
        match ferry_engine::SourceVm::resume(link) {
            Ok(()) => {
                if let Err(e) = ferry_engine::SourceVm::stop_dirty_log(link) {
                    tracing::warn!("VM {name}: cannot stop its dirty log: {e}");
                }
                tracing::warn!(
                    "VM {name} came back paused with no hand-off recorded (its migration never \
                 reached COMMIT): resumed here"
                );
                false
            }
            Err(e) => {
                tracing::error!("VM {name} came back paused and cannot be resumed: {e}");
                true
            }
        }
    });
}

/// Takes VM `name`'s link (also when paused, with `paused_ok`), runs `f`
/// on it, and puts the VM back, paused if `f` says so.
fn with_vmm(d: &Arc<Daemon>, name: &str, paused_ok: bool, f: impl FnOnce(&mut LinkVm) -> bool) {
    let lent = match d.vms.take(name, "reattach", TAKE_WAIT, paused_ok) {
        Ok(l) => l,
        Err(e) => return tracing::error!("VM {name}: {e}"),
    };
    let mut link = lent.link;
    let paused = f(&mut link);
    d.vms.migration_done(
        name,
        &lent.id,
        Done::Back {
            link,
            paused,
            epoch: None,
        },
    );
}

/// `POST /migrations/{id}/resume`: finishes migration `id`, whose outcome
/// was left unknown, from its hand-off record (its VM paused here).
pub fn resume_recorded(d: &Arc<Daemon>, id: &str) -> Result<(), ApiError> {
    if d.is_shutting_down() {
        return Err(ApiError {
            status: 503,
            message: "ferryd is shutting down".into(),
        });
    }
    if let Some(m) = d.migrations.get(id) {
        let status = m.metrics.status();
        if !status.is_final() && status != Status::Unknown {
            return Err(ApiError::conflict(format!(
                "migration {id} is running ({}); nothing to resume",
                status_name(status)
            )));
        }
    }
    let f = d.journal.find(id).ok_or_else(|| {
        ApiError::not_found(format!(
            "no hand-off is recorded for migration {id}: it never reached COMMIT here, \
             or it has ended"
        ))
    })?;
    let name = f.hand_off.vm.clone();
    match d.vms.get(&name) {
        Some(v) if v.state == crate::vms::VmState::Paused => {}
        Some(v) => {
            return Err(ApiError::conflict(format!(
                "VM {name} is {}, not paused: migration {id} has nothing to resume",
                serde_json::to_value(v.state)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            )))
        }
        None => {
            return Err(ApiError::conflict(format!(
                "VM {name} of migration {id} is not registered here (its VMM registers \
                 again when it is alive)"
            )))
        }
    }
    lock(&d.handoffs).remove(&name);
    start_recovery(d, &name, f);
    Ok(())
}

/// Finishes migration `f` of the re-attached paused VM `name` on a thread
/// (it shows in the migration table under its own id).
fn start_recovery(d: &Arc<Daemon>, name: &str, f: Found) {
    let h = f.hand_off.clone();
    let id = h.session.clone();
    let metrics = Arc::new(Metrics::new(&id, name, "source", &h.to));
    let transport = h
        .transport
        .parse::<crate::transports::TransportKind>()
        .map_err(|e| e.to_string())
        .and_then(|k| crate::transports::get(k, &d.cfg.rdma).map_err(|e| e.to_string()));
    let cancel = Cancel::new();
    d.migrations.insert(Migration {
        id: id.clone(),
        metrics: Arc::clone(&metrics),
        cancel: Some(cancel.clone()),
    });
    let transport = match transport {
        Ok(t) => t,
        Err(e) => {
            let e = format!(
                "cannot finish the migration: transport {:?}: {e}; VM {name} stays paused",
                h.transport
            );
            tracing::error!("migration {id}: {e}");
            metrics.update(|s| {
                s.status = Status::Unknown;
                s.error = Some(e);
            });
            return;
        }
    };
    tracing::warn!(
        "migration {id}: VM {name} came back paused; finishing its {} hand-off to {} (epoch {})",
        if h.postcopy { "post-copy" } else { "pre-copy" },
        h.to,
        h.epoch
    );
    let d2 = Arc::clone(d);
    let name2 = name.to_string();
    let guard = d.threads.enter();
    let started = spawn_logged(format!("recover-{id}"), move || {
        let _guard = guard;
        let d = d2;
        let lent = match d.vms.take(&name2, &id, TAKE_WAIT, true) {
            Ok(l) => l,
            Err(e) => {
                metrics.update(|s| {
                    s.status = Status::Unknown;
                    s.error = Some(format!("cannot take VM {name2}: {e}"));
                });
                return;
            }
        };
        let cfg = SourceConfig {
            journal: Some(d.journal.clone()),
            placement: d.cfg.placement.clone(),
            ..SourceConfig::default()
        };
        let Lent {
            id: vm_id,
            mem,
            mut link,
            ..
        } = lent;
        let _ = link.link().set_timeout(Some(VMM_CALL_TIMEOUT));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ferry_engine::source::recover_out(
                transport.as_ref(),
                &d.key,
                &f.hand_off,
                f.checkpoint.as_ref(),
                mem,
                &mut link,
                &cfg,
                Arc::clone(&metrics),
                &cancel,
            )
        }));
        let ended = Ended {
            d: &d,
            vm: &name2,
            vm_id: &vm_id,
            to: &f.hand_off.to,
            metrics: &metrics,
        };
        ended.finish(result, link);
    });
    if !started {
        tracing::error!("cannot start the recovery thread; VM {name} stays paused");
    }
}

/// After a failed migration the link goes back for idle use: no deadline.
fn resumable(mut link: LinkVm) -> LinkVm {
    let _ = link.link().set_timeout(None);
    link
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_engine::policy::PolicyKind;

    fn req() -> MigrateRequest {
        MigrateRequest {
            vm: "vm0".into(),
            to: "10.0.0.2:7070".into(),
            ..Default::default()
        }
    }

    #[test]
    fn validates_ranges() {
        let c = source_config(&req()).unwrap();
        assert_eq!(c.streams.get(), 4);
        assert_eq!(c.downtime_ms, 300);
        let cases = [
            MigrateRequest {
                streams: Some(0),
                ..req()
            },
            MigrateRequest {
                streams: Some(65),
                ..req()
            },
            MigrateRequest {
                downtime_ms: Some(0),
                ..req()
            },
            MigrateRequest {
                downtime_ms: Some(60_001),
                ..req()
            },
            MigrateRequest {
                bandwidth_mib_s: Some(0),
                ..req()
            },
            MigrateRequest {
                rounds_max: Some(0),
                ..req()
            },
            MigrateRequest {
                time_max_s: Some(0),
                ..req()
            },
            MigrateRequest {
                to: "nohost".into(),
                ..req()
            },
            MigrateRequest {
                to: "host:0".into(),
                ..req()
            },
            MigrateRequest {
                vm: String::new(),
                ..req()
            },
            MigrateRequest {
                policy: Some("fastest".into()),
                ..req()
            },
            MigrateRequest {
                downtime_max_ms: Some(100),
                ..req()
            },
            MigrateRequest {
                downtime_max_ms: Some(60_001),
                ..req()
            },
            MigrateRequest {
                xor_cache_mib: Some(XOR_CACHE_MIB_MAX + 1),
                ..req()
            },
        ];
        for r in cases {
            assert_eq!(source_config(&r).unwrap_err().status, 400, "{r:?}");
        }
        let ok = MigrateRequest {
            streams: Some(64),
            bandwidth_mib_s: Some(1),
            ..req()
        };
        assert_eq!(source_config(&ok).unwrap().bandwidth_mib_s, Some(1));
        let c = source_config(&req()).unwrap();
        assert_eq!(c.policy, PolicyKind::Adaptive);
        assert_eq!(c.downtime_max_ms, 2000);
        assert_eq!(c.xor_cache_bytes, None);
        let c = source_config(&MigrateRequest {
            policy: Some("hot-defer".into()),
            downtime_max_ms: Some(300),
            xor_cache_mib: Some(0),
            ..req()
        })
        .unwrap();
        assert_eq!(c.policy, PolicyKind::HotDefer);
        assert_eq!(c.downtime_max_ms, 300);
        assert_eq!(c.xor_cache_bytes, Some(0));
    }
}
