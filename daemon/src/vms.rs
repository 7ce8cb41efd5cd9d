//! The VMs this host knows: live ones (registered by a VMM, or received by an
//! incoming migration) and records of the ones that migrated away.
//!
//! ```text
//!  VMM registers ──────────────────────▶ running ◀── failed / cancelled ──┐
//!  session arrives ─▶ incoming ─commit─▶    │                              │
//!                                           ▼ POST /migrations             │
//!                                       migrating ─────────────────────────┘
//!                                 committed │    │ COMMIT sent, outcome unknown
//!                                           ▼    ▼
//!                  migrated-away (a record only)  paused (kept so it cannot run twice)
//!
//!  A VMM that closes its link while no migration holds it: removed.
//! ```
//!
//! A VM's [`LinkVm`] lives in its entry while nobody talks to it. Whoever
//! talks to the VMM (a stats query, a migration) takes the link out, drops
//! the table lock, does its I/O, and puts the link back, so the lock is never
//! held across I/O. A missing link means "busy": a migration request waits
//! for it (bounded), a stats query skips the live numbers.

use std::collections::{HashMap, VecDeque};
use std::os::unix::net::UnixStream;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ferry_engine::link::{LinkError, VmSpec};
use ferry_engine::linkvm::LinkVm;
use ferry_engine::{GuestMem, VmError};
use serde::{Deserialize, Serialize};

use crate::util::{check_vm_name, lock, random_hex, reap, spawn_logged, CHILD_GRACE};

/// Cap on live VMs per host: far above what one host runs, low enough that a
/// runaway client cannot grow the table (and its watcher threads) without bound.
pub const VMS_MAX: usize = 256;
/// Records of migrated-away VMs kept for `GET /vms` (oldest dropped first).
pub const DEPARTED_MAX: usize = 256;
/// Deadline for a VMM to answer a stats query. A VMM's request loop answers
/// in microseconds; 2 s only trips when it hangs.
pub const STATS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a query waits for a running VM's link that is out for a moment.
const LINK_WAIT: Duration = Duration::from_secs(1);
/// How often a watcher checks its VMM's link for a hang-up.
const WATCH_INTERVAL_MS: u16 = 500;

/// Where a VM is, as the API shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Runs here.
    Running,
    /// Paused here: a migration's COMMIT outcome is unknown.
    Paused,
    /// Being migrated away.
    Migrating,
    /// Runs on another host now (a record only).
    MigratedAway,
    /// Being received from another host.
    Incoming,
}

/// One VM as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    /// ferryd's id for the VM (changes when it moves host).
    pub id: String,
    /// The VM's name, unique among live VMs of this host.
    pub name: String,
    /// Guest RAM (0 while an incoming VM's spec is not known yet).
    pub mem_bytes: u64,
    /// vCPUs (0 while unknown).
    pub vcpus: u32,
    /// Where it is.
    pub state: VmState,
    /// Hand-off epoch: 0 for a VM started here, +1 per migration.
    pub epoch: u64,
    /// The guest's progress counter, live from the VMM (null when busy or gone).
    pub progress: Option<u64>,
    /// The guest's workload phase, live from the VMM (null when busy or gone).
    pub phase: Option<String>,
    /// The migration moving it, if any.
    pub migration: Option<String>,
}

struct Entry {
    id: String,
    name: String,
    spec: Option<VmSpec>,
    mem: Option<Arc<GuestMem>>,
    /// The disk image, for a VM with a disk.
    disk: Option<Arc<std::fs::File>>,
    epoch: u64,
    state: VmState,
    /// `None` while someone talks to the VMM (or before the link exists).
    link: Option<LinkVm>,
    /// A stats query timed out: its reply may still arrive and must be read
    /// before the next request.
    desync: bool,
    migration: Option<String>,
    /// The VMM process, when ferryd spawned it (target side).
    child: Option<Child>,
}

impl Entry {
    fn info(&self) -> VmInfo {
        VmInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            mem_bytes: self.spec.as_ref().map_or(0, |s| s.mem_bytes()),
            vcpus: self.spec.as_ref().map_or(0, |s| s.vcpus),
            state: self.state,
            epoch: self.epoch,
            progress: None,
            phase: None,
            migration: self.migration.clone(),
        }
    }
}

#[derive(Default)]
struct Inner {
    live: HashMap<String, Entry>,
    departed: VecDeque<VmInfo>,
}

/// Why a VM could not be taken for a migration.
#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    /// No live VM of that name.
    #[error("no VM named {0:?} on this host")]
    NotFound(String),
    /// The VM is in the wrong state, or its VMM stayed busy.
    #[error("{0}")]
    Conflict(String),
}

/// A VM taken out of the table for a migration.
pub struct Lent {
    /// ferryd's id of the VM.
    pub id: String,
    /// Its spec.
    pub spec: VmSpec,
    /// Its memory.
    pub mem: Arc<GuestMem>,
    /// Its disk image, when it has one.
    pub disk: Option<Arc<std::fs::File>>,
    /// Its epoch.
    pub epoch: u64,
    /// The VMM.
    pub link: LinkVm,
    /// A late stats reply may be pending on the link (see [`resync`]).
    pub desync: bool,
}

/// How an outgoing migration ended, for [`VmTable::migration_done`].
pub enum Done {
    /// Committed: the VM runs on the target with `epoch`.
    Away {
        /// The new epoch.
        epoch: u64,
    },
    /// Not committed: the VM is here again, running or (commit unknown) paused.
    Back {
        /// The VMM's link.
        link: LinkVm,
        /// True when the VM must stay paused.
        paused: bool,
        /// A new epoch: the VM was taken back from a lost post-copy.
        epoch: Option<u64>,
    },
}

/// The VM table.
#[derive(Default)]
pub struct VmTable {
    inner: Mutex<Inner>,
    /// Signalled whenever a link is put back.
    link_back: Condvar,
    closing: AtomicBool,
}

impl VmTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a running VM whose VMM just registered. The entry has no link
    /// until [`VmTable::attach`] (so nothing talks to the VMM before it got
    /// its `Registered` reply). Returns the VM's id.
    pub fn register(
        &self,
        spec: VmSpec,
        mem: GuestMem,
        disk: Option<std::fs::File>,
    ) -> Result<String, String> {
        self.register_as(spec, mem, disk, VmState::Running, 0)
    }

    /// [`Self::register`] for a VMM that registers again (its ferryd
    /// restarted): its VM may be paused, and a hand-off record may know its
    /// epoch.
    pub fn register_as(
        &self,
        spec: VmSpec,
        mem: GuestMem,
        disk: Option<std::fs::File>,
        state: VmState,
        epoch: u64,
    ) -> Result<String, String> {
        check_vm_name(&spec.name)?;
        let mut t = lock(&self.inner);
        check_free(&t, &spec.name)?;
        let id = random_hex(8);
        let name = spec.name.clone();
        let entry = Entry {
            id: id.clone(),
            name: name.clone(),
            spec: Some(spec),
            mem: Some(Arc::new(mem)),
            disk: disk.map(Arc::new),
            epoch,
            state,
            link: None,
            desync: false,
            migration: None,
            child: None,
        };
        t.live.insert(name, entry);
        Ok(id)
    }

    /// Gives a registered VM its link (it becomes usable).
    pub fn attach(&self, name: &str, id: &str, link: LinkVm) {
        let mut t = lock(&self.inner);
        if let Some(e) = t.live.get_mut(name).filter(|e| e.id == id) {
            e.link = Some(link);
            self.link_back.notify_all();
        }
    }

    /// Removes a live entry (if it still is the one with `id`), reaping its
    /// child VMM if ferryd spawned one.
    pub fn remove(&self, name: &str, id: &str) -> bool {
        let removed = {
            let mut t = lock(&self.inner);
            if t.live.get(name).is_some_and(|e| e.id == id) {
                t.live.remove(name)
            } else {
                None
            }
        };
        match removed {
            Some(mut e) => {
                if let Some(child) = e.child.take() {
                    reap(child, format!("VMM of {name}"), CHILD_GRACE);
                }
                true
            }
            None => false,
        }
    }

    /// Reserves `name` for an incoming migration; returns the VM's new id.
    pub fn reserve_incoming(&self, name: &str, migration: &str) -> Result<String, String> {
        check_vm_name(name)?;
        let mut t = lock(&self.inner);
        check_free(&t, name)?;
        let id = random_hex(8);
        let entry = Entry {
            id: id.clone(),
            name: name.into(),
            spec: None,
            mem: None,
            disk: None,
            epoch: 0,
            state: VmState::Incoming,
            link: None,
            desync: false,
            migration: Some(migration.into()),
            child: None,
        };
        t.live.insert(name.into(), entry);
        Ok(id)
    }

    /// Records the spec of an incoming VM once it is known.
    pub fn set_incoming_spec(&self, name: &str, id: &str, spec: &VmSpec) {
        if let Some(e) = lock(&self.inner).live.get_mut(name).filter(|e| e.id == id) {
            e.spec = Some(spec.clone());
        }
    }

    /// An incoming VM was committed: it runs here now.
    #[allow(clippy::too_many_arguments)]
    pub fn finish_incoming(
        &self,
        name: &str,
        id: &str,
        spec: VmSpec,
        mem: Arc<GuestMem>,
        disk: Option<std::fs::File>,
        epoch: u64,
        link: LinkVm,
        child: Option<Child>,
    ) {
        let mut t = lock(&self.inner);
        t.departed.retain(|d| d.name != name);
        let entry = Entry {
            id: id.into(),
            name: name.into(),
            spec: Some(spec),
            mem: Some(mem),
            disk: disk.map(Arc::new),
            epoch,
            state: VmState::Running,
            link: Some(link),
            desync: false,
            migration: None,
            child,
        };
        t.live.insert(name.into(), entry);
        self.link_back.notify_all();
    }

    /// Takes a running VM for a migration: marks it migrating and hands out
    /// its link, waiting up to `wait` for a busy link to come back.
    pub fn take_for_migration(
        &self,
        name: &str,
        migration: &str,
        wait: Duration,
    ) -> Result<Lent, TakeError> {
        self.take(name, migration, wait, false)
    }

    /// Takes a VM for a migration like [`Self::take_for_migration`], also
    /// when it is paused (`paused_ok`): a restarted ferryd finishing what
    /// its predecessor handed off.
    pub fn take(
        &self,
        name: &str,
        migration: &str,
        wait: Duration,
        paused_ok: bool,
    ) -> Result<Lent, TakeError> {
        let deadline = Instant::now() + wait;
        let mut t = lock(&self.inner);
        loop {
            let e = t
                .live
                .get_mut(name)
                .ok_or_else(|| TakeError::NotFound(name.into()))?;
            if e.state == VmState::Migrating {
                return Err(TakeError::Conflict(format!(
                    "VM {name:?} is already migrating (migration {})",
                    e.migration.as_deref().unwrap_or("?")
                )));
            }
            if e.state != VmState::Running && !(paused_ok && e.state == VmState::Paused) {
                let state = serde_json::to_value(e.state).unwrap_or_default();
                return Err(TakeError::Conflict(format!(
                    "VM {name:?} is not running (state {})",
                    state.as_str().unwrap_or("?")
                )));
            }
            if let (Some(link), Some(spec), Some(mem)) = (e.link.take(), &e.spec, &e.mem) {
                e.state = VmState::Migrating;
                e.migration = Some(migration.into());
                return Ok(Lent {
                    id: e.id.clone(),
                    spec: spec.clone(),
                    mem: Arc::clone(mem),
                    disk: e.disk.clone(),
                    epoch: e.epoch,
                    link,
                    desync: std::mem::take(&mut e.desync),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TakeError::Conflict(format!(
                    "the VMM of {name:?} stayed busy; try again"
                )));
            }
            t = self
                .link_back
                .wait_timeout(t, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Ends a migration of the VM `name` (id `id`) taken by [`Self::take_for_migration`].
    pub fn migration_done(&self, name: &str, id: &str, done: Done) {
        let mut t = lock(&self.inner);
        let Some(e) = t.live.get_mut(name).filter(|e| e.id == id) else {
            tracing::error!("VM {name} vanished from the table during its migration");
            return;
        };
        match done {
            Done::Back {
                link,
                paused,
                epoch,
            } => {
                e.link = Some(link);
                if let Some(epoch) = epoch {
                    e.epoch = epoch;
                }
                e.state = if paused {
                    VmState::Paused
                } else {
                    VmState::Running
                };
                e.migration = None;
                self.link_back.notify_all();
            }
            Done::Away { epoch } => {
                let Some(mut e) = t.live.remove(name) else {
                    return;
                };
                let mut record = e.info();
                record.state = VmState::MigratedAway;
                record.epoch = epoch;
                t.departed.retain(|d| d.name != name);
                if t.departed.len() >= DEPARTED_MAX {
                    t.departed.pop_front();
                }
                t.departed.push_back(record);
                drop(t);
                if let Some(child) = e.child.take() {
                    reap(child, format!("VMM of {name}"), CHILD_GRACE);
                }
            }
        }
    }

    /// All VMs, by name, with live numbers from idle VMMs.
    pub fn list(&self) -> Vec<VmInfo> {
        let names: Vec<String> = {
            let t = lock(&self.inner);
            let mut n: Vec<String> = t.live.keys().cloned().collect();
            n.extend(
                t.departed
                    .iter()
                    .filter(|d| !t.live.contains_key(&d.name))
                    .map(|d| d.name.clone()),
            );
            n
        };
        let mut out: Vec<VmInfo> = names.iter().filter_map(|n| self.get(n)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// One VM: the live one of that name, else its migrated-away record.
    pub fn get(&self, name: &str) -> Option<VmInfo> {
        // A running VM's link may be out for a moment (being attached right
        // after registration, or answering another query): wait for it
        // briefly rather than report no numbers.
        let deadline = Instant::now() + LINK_WAIT;
        let (mut info, lent) = {
            let mut t = lock(&self.inner);
            loop {
                match t.live.get_mut(name) {
                    Some(e) => {
                        let info = e.info();
                        let idle = matches!(e.state, VmState::Running | VmState::Paused);
                        let lent = if idle {
                            e.link.take().map(|l| (l, e.desync))
                        } else {
                            None
                        };
                        let left = deadline.saturating_duration_since(Instant::now());
                        if lent.is_some() || !idle || left.is_zero() {
                            break (info, lent);
                        }
                    }
                    None => return t.departed.iter().rev().find(|d| d.name == name).cloned(),
                }
                let left = deadline.saturating_duration_since(Instant::now());
                t = self
                    .link_back
                    .wait_timeout(t, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        };
        if let Some((mut link, mut desync)) = lent {
            if let Some(stats) = query_stats(&mut link, &mut desync) {
                info.progress = Some(stats.progress);
                info.phase = Some(stats.phase);
            }
            let mut t = lock(&self.inner);
            if let Some(e) = t.live.get_mut(name).filter(|e| e.id == info.id) {
                e.link = Some(link);
                e.desync = desync;
                self.link_back.notify_all();
            }
        }
        Some(info)
    }

    /// Stops all watchers (shutdown).
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    /// Watches the VMM link `sock` (a second handle on the VM's link) and
    /// removes the VM when the VMM hangs up while no migration uses it.
    pub fn watch(self: &Arc<Self>, name: String, id: String, sock: UnixStream) {
        let table = Arc::clone(self);
        spawn_logged(format!("watch-{name}"), move || {
            table.watch_loop(&name, &id, &sock)
        });
    }

    fn watch_loop(&self, name: &str, id: &str, sock: &UnixStream) {
        use nix::poll::{poll, PollFd, PollFlags};
        use std::os::fd::AsFd;
        while !self.closing.load(Ordering::SeqCst) {
            let mut fds = [PollFd::new(
                sock.as_fd(),
                PollFlags::from_bits_retain(libc::POLLRDHUP),
            )];
            let hup = match poll(&mut fds, WATCH_INTERVAL_MS) {
                Ok(0) => false,
                Ok(_) => true, // POLLRDHUP, POLLHUP or POLLERR: the VMM is gone
                Err(nix::errno::Errno::EINTR) => false,
                Err(e) => {
                    tracing::error!("cannot watch the link of VM {name}: {e}");
                    return;
                }
            };
            let t = lock(&self.inner);
            let Some(e) = t.live.get(name).filter(|e| e.id == id) else {
                return; // migrated away or already removed
            };
            // A migration (or a stats query) that holds the link sees the
            // hang-up itself and puts the link back; decide after that.
            if hup && e.link.is_some() && e.state != VmState::Migrating {
                let was = e.state;
                drop(t);
                if self.remove(name, id) {
                    tracing::warn!(
                        "VM {name}: its VMM closed the link (state was {was:?}); removed"
                    );
                }
                return;
            }
            drop(t);
            if hup {
                std::thread::sleep(Duration::from_millis(u64::from(WATCH_INTERVAL_MS)));
            }
        }
    }
}

fn check_free(t: &Inner, name: &str) -> Result<(), String> {
    if t.live.contains_key(name) {
        return Err(format!("a VM named {name:?} already exists on this host"));
    }
    if t.live.len() >= VMS_MAX {
        return Err(format!(
            "this host already has {VMS_MAX} VMs, the most ferryd manages"
        ));
    }
    Ok(())
}

fn query_stats(link: &mut LinkVm, desync: &mut bool) -> Option<ferry_engine::link::VmStats> {
    if *desync {
        resync(link).ok()?;
        *desync = false;
    }
    link.link().set_timeout(Some(STATS_TIMEOUT)).ok()?;
    match link.stats() {
        Ok(s) => Some(s),
        Err(VmError::Request { .. }) => None,
        Err(e) => {
            // The reply may still come: read it before the next request.
            tracing::debug!("stats query failed: {e}");
            *desync = true;
            None
        }
    }
}

/// Reads the late reply of an earlier, timed-out request so the next request
/// gets its own reply.
pub fn resync(link: &mut LinkVm) -> Result<(), LinkError> {
    link.link().set_timeout(Some(STATS_TIMEOUT))?;
    link.link().recv().map(|_| ())
}
