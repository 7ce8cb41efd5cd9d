//! The link socket: VMMs connect here and register (see
//! [`ferry_engine::link`] for the protocol).
//!
//! ```text
//!  VMM                                   ferryd
//!  Register{Source, spec} + memfd  ──▶   map memfd, add VM (name unique)
//!                                  ◀──   Registered{vm_id} | Error{message}
//!  Register{Target{token}}         ──▶   hand the socket to the incoming migration
//!                                        waiting on `token` (it replies
//!                                        Registered{vm_id, spec} + memfd) | Error
//! ```
//!
//! Each connection registers in its own thread under a deadline, so a silent
//! client holds one thread for at most [`REGISTER_TIMEOUT`] and blocks nobody.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_engine::link::{Link, LinkMsg, Role, VmSpec};
use ferry_engine::linkvm::LinkVm;
use ferry_engine::GuestMem;

use crate::daemon::Daemon;
use crate::util::{lock, spawn_logged};

/// Deadline for a VMM's first message and for our reply.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// Registrations in progress at once; more connections are closed at once
/// (a local process opening sockets in a loop cannot exhaust threads).
pub const REGISTERING_MAX: usize = 64;
/// vCPU cap of a registered VM: KVM's own limit on x86 is in this range.
pub const VCPUS_MAX: u32 = 1024;
/// How often the accept loop checks for shutdown.
const ACCEPT_POLL_MS: u16 = 500;

/// Target VMMs ferryd spawned and awaits: token -> where to hand the socket.
#[derive(Default)]
pub struct Tokens {
    inner: Mutex<HashMap<String, SyncSender<UnixStream>>>,
}

impl Tokens {
    /// Starts waiting for a VMM with `token`.
    pub fn expect(&self, token: &str) -> Receiver<UnixStream> {
        let (tx, rx) = sync_channel(1);
        lock(&self.inner).insert(token.into(), tx);
        rx
    }

    /// Claims `token` (once): the sender to hand the socket to.
    fn claim(&self, token: &str) -> Option<SyncSender<UnixStream>> {
        lock(&self.inner).remove(token)
    }

    /// Stops waiting for `token`.
    pub fn forget(&self, token: &str) {
        lock(&self.inner).remove(token);
    }
}

/// Starts the accept loop on the link socket.
pub fn spawn(d: &Arc<Daemon>, listener: UnixListener) -> std::io::Result<JoinHandle<()>> {
    let d = Arc::clone(d);
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("link-accept".into())
        .spawn(move || accept_loop(&d, &listener))
}

fn accept_loop(d: &Arc<Daemon>, listener: &UnixListener) {
    use nix::poll::{poll, PollFd, PollFlags};
    let registering = Arc::new(AtomicUsize::new(0));
    while !d.is_shutting_down() {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        if let Err(e) = poll(&mut fds, ACCEPT_POLL_MS) {
            if e != nix::errno::Errno::EINTR {
                tracing::error!("link socket: poll failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        let sock = match listener.accept() {
            Ok((sock, _)) => sock,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!("link socket: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if registering.fetch_add(1, Ordering::SeqCst) >= REGISTERING_MAX {
            registering.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("link socket: {REGISTERING_MAX} registrations already pending; closing a new connection");
            continue;
        }
        let (d2, count) = (Arc::clone(d), Arc::clone(&registering));
        spawn_logged("link-register".into(), move || {
            register(&d2, sock);
            count.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

fn register(d: &Arc<Daemon>, sock: UnixStream) {
    let setup = sock
        .set_nonblocking(false)
        .and_then(|()| sock.set_read_timeout(Some(REGISTER_TIMEOUT)))
        .and_then(|()| sock.set_write_timeout(Some(REGISTER_TIMEOUT)))
        .and_then(|()| sock.try_clone());
    let mut link = match setup {
        Ok(s) => Link::new(s),
        Err(e) => {
            tracing::warn!("link socket: cannot set up a connection: {e}");
            return;
        }
    };
    let first = match link.recv() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("link socket: a VMM connection did not register: {e}");
            return;
        }
    };
    match first.msg {
        LinkMsg::Register {
            role: Role::Source,
            spec: Some(spec),
        } => {
            register_source(d, link, sock, spec, first.fds, None);
        }
        LinkMsg::Register {
            role: Role::Reattach { paused, postcopy },
            spec: Some(spec),
        } => {
            register_source(d, link, sock, spec, first.fds, Some((paused, postcopy)));
        }
        LinkMsg::Register {
            role: Role::Source | Role::Reattach { .. },
            spec: None,
        } => {
            refuse(
                &mut link,
                "a source VMM must send its VM spec with register".into(),
            );
        }
        LinkMsg::Register {
            role: Role::Target { token },
            ..
        } => match d.tokens.claim(&token) {
            Some(tx) => {
                if tx.send(sock).is_err() {
                    refuse(
                        &mut link,
                        "the migration that spawned this VMM is gone".into(),
                    );
                }
            }
            None => refuse(
                &mut link,
                "unknown target token; only VMMs ferryd spawned register as targets".into(),
            ),
        },
        other => refuse(
            &mut link,
            format!("expected register, got {}", other.kind()),
        ),
    }
}

fn refuse(link: &mut Link, message: String) {
    tracing::warn!("link socket: registration refused: {message}");
    let _ = link.send(&LinkMsg::Error { message }, &[], &[]);
    link.shutdown();
}

fn register_source(
    d: &Arc<Daemon>,
    mut link: Link,
    sock: UnixStream,
    spec: VmSpec,
    fds: Vec<OwnedFd>,
    reattach: Option<(bool, bool)>,
) {
    let name = spec.name.clone();
    let checked = check_spec(&spec).and_then(|()| {
        let mut fds = fds.into_iter();
        let (memfd, disk_fd, extra) = (fds.next(), fds.next(), fds.next());
        let (Some(memfd), None) = (memfd, extra) else {
            return Err(
                "a source VMM must pass its guest memfd, and its disk image's descriptor when the spec has a disk"
                    .to_string(),
            );
        };
        let disk = match (&spec.disk, disk_fd) {
            (None, None) => None,
            (Some(d), Some(fd)) => {
                d.validate()?;
                let file = std::fs::File::from(fd);
                let meta = file
                    .metadata()
                    .map_err(|e| format!("cannot stat the disk image: {e}"))?;
                if !meta.is_file() {
                    return Err("the disk descriptor is not a regular file".into());
                }
                if meta.len() != d.bytes {
                    return Err(format!(
                        "the disk image has {} bytes, the spec says {}",
                        meta.len(),
                        d.bytes
                    ));
                }
                Some(file)
            }
            (Some(_), None) => {
                return Err("the spec has a disk but no disk descriptor came with it".into())
            }
            (None, Some(_)) => return Err("a second descriptor came without a disk in the spec".into()),
        };
        let mem = GuestMem::from_memfd(memfd, &spec.regions).map_err(|e| e.to_string())?;
        Ok((mem, disk))
    });
    let (mem, disk) = match checked {
        Ok(v) => v,
        Err(m) => return refuse(&mut link, format!("VM {name:?}: {m}")),
    };
    let (mem_bytes, vcpus) = (spec.mem_bytes(), spec.vcpus);
    // A VM registering again may be the guest of an incoming migration the
    // old ferryd died in while starting it.
    let claim = match reattach {
        Some((paused, postcopy)) => {
            crate::indoubt::claim(d, &name, peer_pid(&sock), paused, postcopy)
        }
        None => crate::indoubt::Claim::None,
    };
    // Or have a hand-off its old ferryd recorded.
    let found = reattach
        .filter(|_| claim == crate::indoubt::Claim::None)
        .and_then(|_| lock(&d.handoffs).remove(&name));
    // Its epoch before the hand-off, when one was recorded (else unknown: 0).
    let epoch = match &claim {
        crate::indoubt::Claim::Completed { epoch, .. } => *epoch,
        _ => found
            .as_ref()
            .map_or(0, |f| f.hand_off.epoch.saturating_sub(1)),
    };
    let paused = reattach.is_some_and(|(paused, _)| paused);
    let state = if paused {
        crate::vms::VmState::Paused
    } else {
        crate::vms::VmState::Running
    };
    let id = match d.vms.register_as(spec, mem, disk, state, epoch) {
        Ok(id) => id,
        Err(m) => {
            if let Some(f) = found {
                lock(&d.handoffs).insert(name.clone(), f);
            }
            return refuse(&mut link, m);
        }
    };
    let reply = LinkMsg::Registered {
        vm_id: id.clone(),
        spec: None,
    };
    if let Err(e) = link.send(&reply, &[], &[]) {
        tracing::warn!("VM {name}: cannot confirm its registration: {e}");
        d.vms.remove(&name, &id);
        return;
    }
    let _ = sock.set_read_timeout(None);
    tracing::info!(
        "VM {name} registered (id {id}, {} MiB, {vcpus} vCPUs)",
        mem_bytes >> 20
    );
    d.vms.attach(&name, &id, LinkVm::new(link));
    d.vms.watch(name.clone(), id, sock);
    if reattach.is_some() {
        tracing::info!(
            "VM {name} registered again ({})",
            if paused { "paused" } else { "running" }
        );
        match claim {
            crate::indoubt::Claim::None => crate::migrations::reattached(d, &name, paused, found),
            crate::indoubt::Claim::Completed { id, epoch } => {
                crate::indoubt::settle_completed(d, &id, &name, epoch);
                // As for any VM registering again running.
                crate::migrations::reattached(d, &name, false, None);
            }
            crate::indoubt::Claim::Hold { .. } => {}
        }
    }
}

/// The process at the other end of a unix socket.
fn peer_pid(sock: &UnixStream) -> Option<i32> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    getsockopt(sock, PeerCredentials).ok().map(|c| c.pid())
}

/// Checks what the memory mapping does not: name and vCPUs.
pub fn check_spec(spec: &VmSpec) -> Result<(), String> {
    crate::util::check_vm_name(&spec.name)?;
    if spec.vcpus == 0 || spec.vcpus > VCPUS_MAX {
        return Err(format!(
            "vcpus must be 1 to {VCPUS_MAX}, got {}",
            spec.vcpus
        ));
    }
    Ok(())
}
