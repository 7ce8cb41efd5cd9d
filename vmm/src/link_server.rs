//! The VMM side of ferryd's link protocol (`ferry_engine::link`).
//!
//! A source VMM registers its running VM with the memfd (and, with a disk,
//! the image's descriptor as the second fd and `VmSpec::disk`); a target VMM
//! (`--restore --token T`) registers with its token and receives the spec and
//! the memfd (and the new image's descriptor, which it reads only from
//! Restore on), then waits for `Restore` and `Run`. Both then serve the same
//! requests, so a restored VM can be migrated again:
//!
//! ```text
//! request          reply                    notes
//! StartDirtyLog    Ok                       slot gets KVM_MEM_LOG_DIRTY_PAGES;
//!                                           the disk log starts empty
//! SyncDirtyLog     DirtyLog + bitmap        u64 LE words, bit per 4 KiB page (the
//!                                           guest's writes and the VMM's own)
//! PeekDirtyLog     DirtyLog + bitmap        the same, not cleared (manual protect)
//! SyncDiskLog      DirtyLog + bitmap        u64 LE words, bit per 4 KiB disk block,
//!                                           cleared; Error without a disk or log
//! StopDirtyLog     Ok                       memory and disk
//! Pause            Paused{progress} + blob  parks at the guest's next exit
//! Resume           Ok                       hashes paused memory and disk (--report)
//!                                           first; ends any throttle (full speed)
//! Restore + blob   Restored{verify}         target, before Run; verify checks the
//!                                           memory and the disk window, and hashes
//! RestorePostcopy  PostcopyReady + uffd      target, post-copy: restore, register RAM
//!   + blob                                  with a userfaultfd (minor + missing),
//!                                           unmap it; the uffd is kept open here too
//! PostcopyDone     Verified{verify}         every page arrived: close the uffd, check
//!                                           memory (guest paused for the check)
//! Run              Ok                       target: the VM runs from here on
//! Rollback + blob  Ok                       source, paused, post-copy take-back: the
//!                                           vCPU state becomes the checkpoint's
//!                                           (ferryd wrote its pages); Resume runs it
//! GetStats         Stats{progress,running,phase,throttle_pct}
//! Throttle{p}      Ok (Error if p > 99)     vCPU runs (100-p)% of wall time; 0 = full
//! Quit             Ok, then exit 0          hashes paused memory (--report) first
//! anything else    Error{message}
//! ```
//!
//! A post-copy target whose guest runs under a lease (StartDirtyLog after
//! RestorePostcopy: ferryd checkpoints it) pauses for checkpoints without
//! hashing memory, and when its link reaches EOF it exits at once: nobody
//! renews the lease any more, and the source takes the VM back from the
//! last checkpoint.
//!
//! Otherwise, when the link reaches EOF or breaks (ferryd died, also while
//! a request was being served and its reply cannot be sent) the VMM does not guess: a running
//! guest keeps running, and a paused guest stays paused, because ferryd may
//! already have handed it to another host and resuming could run it twice.
//! The VMM registers the VM again ([`LinkServer::reattach`], `Reattach`
//! role, saying whether it is paused) with the ferryd that comes back on the
//! same socket, which knows from its state directory whether a hand-off was
//! recorded and finishes it; until then (or if none comes back) the
//! operator decides (kill the VMM to discard it). A running guest that
//! was throttled runs at full speed again: nobody is left to lift it. A
//! target that has not run yet exits with an error: the source still owns
//! the VM.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ferry_engine::link::{
    Link, LinkError, LinkMsg, Received, RegionSpec, Role, VerifyReport, VmSpec,
};
use serde_json::json;

use crate::config::{ConfigError, VmmConfig};
use crate::disk::Disk;
use crate::machine::{Lifecycle, Machine, MachineError};
use crate::mem::{GuestRam, MemError};
use crate::oracle;
use crate::report::Report;

/// Errors of the link side.
#[derive(Debug, thiserror::Error)]
pub enum LinkServerError {
    /// The link failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The VM failed.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// ferryd sent something we cannot use.
    #[error("ferryd protocol error: {0}")]
    Protocol(String),
}

/// How serving ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// ferryd sent Quit (the reason is logged and reported).
    Quit(String),
    /// The link closed; the VM was left as it was (see the module docs).
    LinkClosed(Lifecycle),
}

/// A registered VM serving ferryd.
#[derive(Debug)]
pub struct LinkServer {
    link: Link,
    machine: Machine,
    vm_id: String,
    /// The VM's name (registering again uses it).
    name: String,
    report: Option<Report>,
    pending_hash: Option<(u64, u64)>,
    /// Post-copy: the userfaultfd over guest memory, kept open until
    /// `PostcopyDone` (ferryd dying must leave faulting vCPUs waiting).
    userfault: Option<userfaultfd::Uffd>,
    /// Restored for post-copy (until the dirty log stops).
    postcopy: bool,
    /// Post-copy under a lease: ferryd checkpoints this guest.
    leased: bool,
}

/// How often a VMM whose ferryd went away tries to register again.
pub const REATTACH_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Registers `machine`'s VM as `name` with `role` (source or re-attach):
/// spec, memfd and disk descriptor.
fn register_vm(
    path: &Path,
    machine: &Machine,
    name: &str,
    role: Role,
) -> Result<(Link, String), LinkServerError> {
    let mut link = Link::connect(path)?;
    let cfg = machine.config();
    let spec = VmSpec {
        name: name.to_string(),
        regions: vec![RegionSpec {
            gpa: 0,
            size: cfg.mem_bytes,
            memfd_offset: 0,
        }],
        vcpus: cfg.vcpus,
        vmm_config: cfg.to_json(),
        disk: cfg.disk.as_ref().map(|d| d.spec()),
    };
    let msg = LinkMsg::Register {
        role,
        spec: Some(spec),
    };
    let mut fds = vec![machine.ram().memfd_raw()];
    fds.extend(machine.disk().map(|d| d.raw_fd()));
    link.send(&msg, &[], &fds)?;
    let (vm_id, _, _) = expect_registered(link.recv()?)?;
    Ok((link, vm_id))
}

fn expect_registered(r: Received) -> Result<(String, Option<VmSpec>, Received), LinkServerError> {
    match &r.msg {
        LinkMsg::Registered { vm_id, spec } => Ok((vm_id.clone(), spec.clone(), r)),
        LinkMsg::Error { message } => Err(LinkError::Remote(message.clone()).into()),
        other => Err(LinkError::Unexpected {
            expected: "registered",
            got: other.kind().into(),
        }
        .into()),
    }
}

impl LinkServer {
    /// Registers a running source VM with ferryd at `path`.
    pub fn register_source(
        path: &Path,
        machine: Machine,
        name: &str,
        report: Option<Report>,
    ) -> Result<Self, LinkServerError> {
        let (link, vm_id) = register_vm(path, &machine, name, Role::Source)?;
        tracing::info!("registered with ferryd as {vm_id}");
        if let Some(r) = &report {
            r.event("registered", json!({"vm_id": vm_id, "role": "source"}));
        }
        Ok(LinkServer {
            link,
            machine,
            vm_id,
            name: name.to_string(),
            report,
            pending_hash: None,
            userfault: None,
            postcopy: false,
            leased: false,
        })
    }

    /// After the link closed with the VM running or paused: registers the
    /// VM again with the ferryd at `path` (a restarted one), trying every
    /// [`REATTACH_EVERY`] for up to `wait`. A ferryd that refuses ends the
    /// tries at once.
    pub fn reattach(
        &mut self,
        path: &Path,
        wait: std::time::Duration,
    ) -> Result<(), LinkServerError> {
        let deadline = Instant::now() + wait;
        let paused = self.machine.lifecycle() == Lifecycle::Paused;
        // A post-copy target that still waits for pages says so: its
        // migration did not end.
        let postcopy = self.userfault.is_some();
        loop {
            let role = Role::Reattach { paused, postcopy };
            match register_vm(path, &self.machine, &self.name, role) {
                Ok((link, vm_id)) => {
                    tracing::info!(paused, postcopy, "registered again with ferryd as {vm_id}");
                    self.event(
                        "reattached",
                        json!({"vm_id": vm_id, "paused": paused, "postcopy": postcopy}),
                    );
                    self.link = link;
                    self.vm_id = vm_id;
                    return Ok(());
                }
                Err(LinkServerError::Link(LinkError::Remote(m))) => {
                    return Err(LinkError::Remote(m).into())
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    tracing::debug!("ferryd not back yet: {e}");
                    std::thread::sleep(REATTACH_EVERY);
                }
            }
        }
    }

    /// Registers as the target of an incoming migration: receives the spec
    /// and the memfd, and creates the VM over it without touching memory.
    pub fn register_target(
        path: &Path,
        token: &str,
        report: Option<Report>,
    ) -> Result<Self, LinkServerError> {
        let mut link = Link::connect(path)?;
        let msg = LinkMsg::Register {
            role: Role::Target {
                token: token.to_string(),
            },
            spec: None,
        };
        link.send(&msg, &[], &[])?;
        let (vm_id, spec, mut r) = expect_registered(link.recv()?)?;
        let spec =
            spec.ok_or_else(|| LinkServerError::Protocol("Registered without a VM spec".into()))?;
        let config = VmmConfig::from_json(&spec.vmm_config).map_err(MachineError::from)?;
        let want = [RegionSpec {
            gpa: 0,
            size: config.mem_bytes,
            memfd_offset: 0,
        }];
        let config_disk = config.disk.as_ref().map(|d| d.spec());
        if spec.regions != want || spec.vcpus != config.vcpus || spec.disk != config_disk {
            return Err(MachineError::from(ConfigError::Invalid(format!(
                "spec regions {:?} / {} vCPUs / disk {:?} do not match vmm_config \
                 ({} bytes, {} vCPUs, disk {:?})",
                spec.regions, spec.vcpus, spec.disk, config.mem_bytes, config.vcpus, config_disk
            )))
            .into());
        }
        let want_fds = 1 + usize::from(spec.disk.is_some());
        if r.fds.len() != want_fds {
            return Err(LinkServerError::Protocol(format!(
                "Registered carried {} descriptors, expected {}",
                r.fds.len(),
                match want_fds {
                    1 => "the memfd",
                    _ => "the memfd and the disk image",
                }
            )));
        }
        let fd = r.fds.remove(0);
        let ram = GuestRam::from_memfd(fd, config.mem_bytes).map_err(MachineError::from)?;
        // The image is ferryd's to fill until Restore: kept, not touched.
        let disk = match (&spec.disk, r.fds.pop()) {
            (Some(d), Some(fd)) => Some(Disk::from_fd(fd, d.bytes).map_err(MachineError::from)?),
            _ => None,
        };
        let machine = Machine::attach(config, Arc::new(ram), disk)?;
        tracing::info!(
            "registered with ferryd as target of {vm_id} ({})",
            spec.name
        );
        if let Some(r) = &report {
            r.event("registered", json!({"vm_id": vm_id, "role": "target"}));
        }
        Ok(LinkServer {
            link,
            machine,
            vm_id,
            name: spec.name.clone(),
            report,
            pending_hash: None,
            userfault: None,
            postcopy: false,
            leased: false,
        })
    }

    /// The VM.
    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    /// ferryd's id of the VM.
    pub fn vm_id(&self) -> &str {
        &self.vm_id
    }

    /// Serves requests until Quit or EOF.
    pub fn serve(&mut self) -> Result<Outcome, LinkServerError> {
        loop {
            let req = match self.link.recv() {
                Ok(r) => r,
                Err(LinkError::Closed) => return Ok(self.link_closed()),
                Err(e) => {
                    tracing::warn!("link failed: {e}");
                    return Ok(self.link_closed());
                }
            };
            if let LinkMsg::Quit { reason } = &req.msg {
                let reason = reason.clone();
                self.quit(&reason);
                // Quit either way: ferryd asked for it.
                if let Err(e) = self.link.send(&LinkMsg::Ok, &[], &[]) {
                    tracing::warn!("link failed sending the quit reply: {e}");
                }
                return Ok(Outcome::Quit(reason));
            }
            if matches!(req.msg, LinkMsg::RestorePostcopy) {
                // The one reply that carries a descriptor.
                match self.restore_postcopy(&req.bin) {
                    Ok((host_addr, fd)) => {
                        let msg = LinkMsg::PostcopyReady {
                            host_addrs: vec![host_addr],
                        };
                        if let Err(e) = self.link.send(&msg, &[], &[fd]) {
                            return Ok(self.reply_lost("restore_postcopy", &e));
                        }
                    }
                    Err(e) => {
                        tracing::warn!("restore_postcopy failed: {e}");
                        let msg = LinkMsg::Error {
                            message: e.to_string(),
                        };
                        if let Err(e) = self.link.send(&msg, &[], &[]) {
                            return Ok(self.reply_lost("restore_postcopy", &e));
                        }
                    }
                }
                continue;
            }
            let kind = req.msg.kind();
            let (reply, bin) = match self.handle(req) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("{kind} failed: {e}");
                    (
                        LinkMsg::Error {
                            message: e.to_string(),
                        },
                        Vec::new(),
                    )
                }
            };
            if let Err(e) = self.link.send(&reply, &bin, &[]) {
                return Ok(self.reply_lost(kind, &e));
            }
        }
    }

    /// A reply could not be sent: ferryd died (or closed the link) while
    /// the request was served. That is a closed link like any other, not a
    /// reason for the VMM, and its guest, to go: the request's effect (a
    /// pause, a cleared dirty log) shows in the state the guest registers
    /// again with.
    fn reply_lost(&mut self, kind: &str, e: &LinkError) -> Outcome {
        tracing::warn!("link failed sending the {kind} reply: {e}");
        self.link_closed()
    }

    fn handle(&mut self, req: Received) -> Result<(LinkMsg, Vec<u8>), LinkServerError> {
        let m = &mut self.machine;
        Ok(match req.msg {
            LinkMsg::StartDirtyLog => {
                m.start_dirty_log()?;
                if self.postcopy && !self.leased {
                    tracing::info!("post-copy: checkpoints on; this VMM exits if ferryd goes");
                    self.leased = true;
                }
                (LinkMsg::Ok, vec![])
            }
            LinkMsg::PeekDirtyLog => {
                let words = m.peek_dirty_log()?;
                (
                    LinkMsg::DirtyLog,
                    words.iter().flat_map(|w| w.to_le_bytes()).collect(),
                )
            }
            LinkMsg::SyncDirtyLog => {
                let words = m.sync_dirty_log()?;
                (
                    LinkMsg::DirtyLog,
                    words.iter().flat_map(|w| w.to_le_bytes()).collect(),
                )
            }
            LinkMsg::SyncDiskLog => {
                let words = m.sync_disk_log()?;
                (
                    LinkMsg::DirtyLog,
                    words.iter().flat_map(|w| w.to_le_bytes()).collect(),
                )
            }
            LinkMsg::StopDirtyLog => {
                m.stop_dirty_log()?;
                self.leased = false;
                self.postcopy = false;
                (LinkMsg::Ok, vec![])
            }
            LinkMsg::Pause => {
                let fresh = m.lifecycle() != Lifecycle::Paused;
                let p = m.pause()?;
                if self.leased {
                    // A checkpoint: brief, frequent, and memory may still be
                    // arriving; no hash.
                    tracing::debug!("checkpoint pause at progress {}", p.progress);
                } else {
                    tracing::info!("paused at progress {} in {:?}", p.progress, p.latency);
                    if fresh {
                        self.start_hash(p.progress, p.latency.as_micros() as u64);
                    }
                }
                (
                    LinkMsg::Paused {
                        progress: p.progress,
                    },
                    p.blob,
                )
            }
            LinkMsg::Resume => {
                self.wait_hash();
                let m = &mut self.machine;
                m.resume()?;
                let progress = m.counters()?.progress;
                if !self.leased {
                    tracing::info!("resumed at progress {progress}");
                    self.event("resumed", json!({"progress": progress}));
                }
                (LinkMsg::Ok, vec![])
            }
            LinkMsg::Restore => {
                m.restore(&req.bin)?;
                let verify = self.verify()?;
                tracing::info!("restored; verify: {verify:?}");
                self.event(
                    "restored",
                    serde_json::to_value(&verify).unwrap_or_default(),
                );
                (LinkMsg::Restored { verify }, vec![])
            }
            LinkMsg::Rollback => {
                m.rollback(&req.bin)?;
                // Memory changed under the paused state: its hash is moot.
                self.pending_hash = None;
                let progress = self.machine.counters()?.progress;
                // The guest's own check of the memory it will run on.
                let verify = self.verify()?;
                tracing::warn!(
                    "rolled back to a post-copy checkpoint at progress {progress}; verify: {verify:?}"
                );
                self.event(
                    "rolled_back",
                    json!({"progress": progress, "verify": verify}),
                );
                (LinkMsg::Ok, vec![])
            }
            LinkMsg::PostcopyDone => {
                // Every page is here and mapped: closing our descriptor (after
                // ferryd's) unregisters the range.
                if self.userfault.take().is_none() {
                    return Err(LinkServerError::Protocol(
                        "PostcopyDone without a post-copy restore".into(),
                    ));
                }
                let verify = self.verify_running()?;
                tracing::info!("post-copy done; verify: {verify:?}");
                self.event(
                    "postcopy_done",
                    serde_json::to_value(&verify).unwrap_or_default(),
                );
                (LinkMsg::Verified { verify }, vec![])
            }
            LinkMsg::Run => {
                m.run()?;
                let progress = m.counters()?.progress;
                tracing::info!("running from progress {progress}");
                self.event("running", json!({"progress": progress}));
                (LinkMsg::Ok, vec![])
            }
            LinkMsg::GetStats => (LinkMsg::Stats(m.stats()?), vec![]),
            LinkMsg::Throttle { percent } => {
                m.set_throttle(percent)?;
                let progress = m.counters()?.progress;
                tracing::info!("throttled to {percent}% at progress {progress}");
                self.event(
                    "throttled",
                    json!({"percent": percent, "progress": progress}),
                );
                (LinkMsg::Ok, vec![])
            }
            other => {
                return Err(LinkServerError::Protocol(format!(
                    "unexpected request {}",
                    other.kind()
                )))
            }
        })
    }

    fn event(&self, name: &str, fields: serde_json::Value) {
        if let Some(r) = &self.report {
            r.event(name, fields);
        }
    }

    /// Notes that the memory of this pause must be hashed before the guest
    /// runs again or the VMM exits. The hash is taken then, not now: during
    /// the switchover it would compete with the migration for the CPUs and
    /// inflate the downtime it is meant to check. Memory stays frozen until
    /// Resume or Quit, which hash first.
    fn start_hash(&mut self, progress: u64, pause_us: u64) {
        if self.report.is_some() {
            self.pending_hash = Some((progress, pause_us));
        }
    }

    /// Takes the hash noted by [`Self::start_hash`], if any, and reports it.
    fn wait_hash(&mut self) {
        let (Some((progress, pause_us)), Some(report)) =
            (self.pending_hash.take(), self.report.clone())
        else {
            return;
        };
        let t0 = Instant::now();
        let mem_hash = oracle::mem_hash(&self.machine.ram().all());
        let mut fields = json!({
            "mem_hash": mem_hash,
            "disk_hash": "",
            "progress": progress,
            "pause_us": pause_us,
        });
        match self.machine.disk_hash() {
            None => {}
            Some(Ok(h)) => fields["disk_hash"] = h.into(),
            Some(Err(e)) => {
                tracing::warn!("cannot hash the paused disk: {e}");
                fields["disk_hash_error"] = e.to_string().into();
            }
        }
        if let Ok(c) = self.machine.counters() {
            fields["blocks_written"] = c.blocks_written.into();
        }
        fields["hash_ms"] = (t0.elapsed().as_millis() as u64).into();
        report.event("paused", fields);
    }

    /// Post-copy restore: the state is loaded, guest memory registered with
    /// a userfaultfd and unmapped. Returns the mapping's address and the
    /// descriptor to pass (this side keeps its own copy open).
    fn restore_postcopy(
        &mut self,
        blob: &[u8],
    ) -> Result<(u64, std::os::fd::RawFd), LinkServerError> {
        use std::os::fd::AsRawFd;
        if self.userfault.is_some() {
            return Err(LinkServerError::Protocol(
                "a second post-copy restore".into(),
            ));
        }
        // Restore first: it reads no guest memory, and nothing may touch
        // memory between the unmapping and the first fault ferryd serves.
        self.machine.restore(blob)?;
        let uffd = self
            .machine
            .ram()
            .register_userfault()
            .map_err(MachineError::from)?;
        let fd = uffd.as_raw_fd();
        tracing::info!("restored for post-copy; guest memory behind a userfaultfd");
        self.event("restored", json!({"postcopy": true}));
        self.userfault = Some(uffd);
        self.postcopy = true;
        Ok((self.machine.ram().host_addr(), fd))
    }

    /// The check of [`Self::verify`] on a running guest: paused for the
    /// check (its time is reported as `verify_ms`), then run again.
    fn verify_running(&mut self) -> Result<VerifyReport, LinkServerError> {
        if !self.machine.config().verify {
            return Ok(VerifyReport::default());
        }
        let running = self.machine.lifecycle() == Lifecycle::Running;
        let t0 = Instant::now();
        if running {
            self.machine.pause()?;
        }
        let mut v = self.verify();
        if running {
            self.machine.resume()?;
        }
        if let Ok(v) = v.as_mut() {
            v.verify_ms = t0.elapsed().as_millis() as u64;
        }
        v
    }

    /// The target's independent check of the memory and the disk it
    /// received. An image it cannot hash fails the restore.
    fn verify(&self) -> Result<VerifyReport, LinkServerError> {
        if !self.machine.config().verify {
            return Ok(VerifyReport::default());
        }
        let t0 = Instant::now();
        let mem_hash = self.machine.mem_hash();
        let check = self.machine.check();
        for f in &check.first_faults {
            tracing::warn!("verify: {f}");
        }
        let disk_hash = self.machine.disk_hash().transpose()?.unwrap_or_default();
        let disk = self.machine.check_disk().unwrap_or_default();
        for f in &disk.first_faults {
            tracing::warn!("verify: {f}");
        }
        Ok(VerifyReport {
            checked: true,
            mem_hash,
            pages_checked: check.pages_checked,
            pages_bad: check.pages_bad,
            verify_ms: t0.elapsed().as_millis() as u64,
            disk_hash,
            blocks_checked: disk.blocks_checked,
            blocks_bad: disk.blocks_bad,
        })
    }

    fn quit(&mut self, reason: &str) {
        tracing::info!("quit: {reason}");
        if self.machine.lifecycle() == Lifecycle::Running {
            if let Err(e) = self.machine.pause() {
                tracing::warn!("pause before quit failed: {e}");
            }
        }
        self.wait_hash();
        let progress = self.machine.counters().map(|c| c.progress).unwrap_or(0);
        self.event("quit", json!({"reason": reason, "progress": progress}));
    }

    fn link_closed(&mut self) -> Outcome {
        let state = self.machine.lifecycle();
        if self.leased {
            // Nobody renews the lease: the source takes the VM back from the
            // last checkpoint, so this guest must not run on.
            tracing::error!(
                "ferryd link closed during post-copy under a lease; exiting so that the \
                 guest runs only on the source"
            );
            self.event("link_closed", json!({"state": "leased", "exit": true}));
            std::process::exit(3);
        }
        let throttle_pct = self.machine.throttle_pct();
        if throttle_pct > 0 {
            match self.machine.set_throttle(0) {
                Ok(()) => tracing::warn!("ferryd link closed; throttle of {throttle_pct}% lifted"),
                Err(e) => tracing::warn!("ferryd link closed; cannot lift the throttle: {e}"),
            }
        }
        match state {
            Lifecycle::Running => tracing::warn!("ferryd link closed; the guest keeps running"),
            Lifecycle::Paused => tracing::warn!(
                "ferryd link closed while paused; staying paused (the VM may run elsewhere now); \
                 kill this VMM to discard it"
            ),
            _ => tracing::warn!("ferryd link closed before the VM ran here"),
        }
        self.wait_hash();
        self.event("link_closed", json!({"state": format!("{state:?}")}));
        Outcome::LinkClosed(state)
    }
}

impl From<MemError> for LinkServerError {
    fn from(e: MemError) -> Self {
        LinkServerError::Machine(e.into())
    }
}
