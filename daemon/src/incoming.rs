//! Incoming migrations: the TCP data listener, admission of each connection,
//! and one thread per session around [`ferry_engine::target::migrate_in`],
//! which spawns the target VMM once the VM's spec is known.
//!
//! ```text
//!  accept (500 ms polls) ─▶ thread per connection: admit (5 s deadline)
//!      Err ─────────▶ WARN with peer + reason; nothing else changes
//!      Ok(None) ────▶ the connection joined a session still forming
//!      Ok(Some(s)) ─▶ reserve the VM name (state incoming) ─▶ migrate_in:
//!                       create_vm: spawn `<vmm> <args> --restore --link L --token T`,
//!                                  wait for Register{Target{T}}, reply spec + memfd
//!                     Ok  ─▶ VM running here (epoch from the source)
//!                     Err ─▶ name released; the child VMM is told to quit and reaped
//! ```

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_engine::link::{Link, LinkMsg, VerifyReport, VmSpec};
use ferry_engine::linkvm::LinkVm;
use ferry_engine::target::{migrate_in, IncomingSession, TargetConfig};
use ferry_engine::vm::Fencer;
use ferry_engine::{
    GuestMem, Metrics, MigrationError, Status, TargetVm, Userfault, VmError, VmState,
};
use ferry_transport::{Conn, Listener};

use crate::concluded::Vmm;
use crate::daemon::Daemon;
use crate::migrations::{Migration, VMM_CALL_TIMEOUT};
use crate::util::{panic_message, random_hex, reap, spawn_logged, CHILD_GRACE};

/// Deadline for each receive while a connection authenticates.
pub const ADMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections authenticating at once. A session is 1 + up to 64
/// connections; two sessions at full width fit. More are closed at once, so a
/// flood of idle connections costs at most this many threads for 5 s.
pub const ADMITTING_MAX: usize = 160;
/// How long a spawned VMM has to register on the link socket.
pub const VMM_REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the accept loop checks for shutdown.
const ACCEPT_POLL: Duration = Duration::from_millis(500);

/// Starts the accept loop on the data listener.
pub fn spawn(d: &Arc<Daemon>, listener: Box<dyn Listener>) -> std::io::Result<JoinHandle<()>> {
    let d = Arc::clone(d);
    std::thread::Builder::new()
        .name("data-accept".into())
        .spawn(move || accept_loop(&d, listener))
}

fn accept_loop(d: &Arc<Daemon>, mut listener: Box<dyn Listener>) {
    let admitting = Arc::new(AtomicUsize::new(0));
    while !d.is_shutting_down() {
        let conn = match listener.accept(Some(ACCEPT_POLL)) {
            Ok(Some(conn)) => conn,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!("data listener: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if admitting.fetch_add(1, Ordering::SeqCst) >= ADMITTING_MAX {
            admitting.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(
                "data connection from {} refused: {ADMITTING_MAX} connections already authenticating",
                conn.peer()
            );
            continue;
        }
        let (d2, count) = (Arc::clone(d), Arc::clone(&admitting));
        spawn_logged("admit".into(), move || {
            let session = admit(&d2, conn);
            count.fetch_sub(1, Ordering::SeqCst);
            if let Some(session) = session {
                receive(&d2, session);
            }
        });
    }
}

fn admit(d: &Daemon, mut conn: Box<dyn Conn>) -> Option<IncomingSession> {
    let peer = conn.peer();
    if let Err(e) = conn.set_timeout(Some(ADMIT_TIMEOUT)) {
        tracing::warn!("data connection from {peer} refused: {e}");
        return None;
    }
    match d.acceptor.admit(conn) {
        Ok(Some(session)) => Some(session),
        Ok(None) => {
            tracing::debug!("data connection from {peer} joined a session");
            None
        }
        Err(e) => {
            tracing::warn!("data connection from {peer} refused: {e}");
            None
        }
    }
}

/// Receives one session: the migration thread of an incoming migration.
fn receive(d: &Arc<Daemon>, session: IncomingSession) {
    let _running = d.threads.enter();
    if d.is_shutting_down() {
        // Dropping the session closes its connections: the source resumes its VM.
        tracing::info!(
            "shutting down: refusing migration {} from {}",
            session.id(),
            session.peer()
        );
        return;
    }
    // A session that resumes a post-copy whose connection broke goes to
    // that migration; any other is a new migration.
    let Some(session) = d.resumes.route(session) else {
        return;
    };
    let id = session.id().to_string();
    let name = session.vm_name().to_string();
    let peer = session.peer().to_string();
    let metrics = Arc::new(Metrics::new(&id, &name, "target", &peer));
    metrics.update(|s| s.transport = d.transport.name().into());
    // Cancelling an incoming migration (API or shutdown) aborts it before
    // COMMIT: the source resumes the VM.
    let cancel = ferry_engine::Cancel::new();
    d.migrations.insert(Migration {
        id: id.clone(),
        metrics: Arc::clone(&metrics),
        cancel: Some(cancel.clone()),
    });
    tracing::info!("migration {id}: receiving VM {name} from {peer}");
    let reserved = d.vms.reserve_incoming(&name, &id);
    let mut spawned: Option<(Child, UnixStream)> = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        migrate_in(
            session,
            &TargetConfig {
                reserve: d.reserve.clone(),
                cancel,
                disk_dir: Some(d.cfg.disk_dir()),
                placement: d.cfg.placement.clone(),
                resumes: Some(d.resumes.clone()),
                ..TargetConfig::default()
            },
            Arc::clone(&metrics),
            |spec, mem, disk| {
                let vm_id = reserved.clone().map_err(MigrationError::Invalid)?;
                if spec.name != name {
                    return Err(MigrationError::Invalid(format!(
                        "the spec names VM {:?} but the session announced {name:?}",
                        spec.name
                    )));
                }
                crate::linkserver::check_spec(spec).map_err(MigrationError::Invalid)?;
                d.vms.set_incoming_spec(&name, &vm_id, spec);
                let (vm, child, sock) = spawn_vmm(d, &id, &vm_id, spec, mem, disk)?;
                // Named with the `committing` record, for a restarted
                // ferryd to settle the migration by (crate::indoubt).
                match Vmm::of(&spec.name, child.id() as i32) {
                    Some(vmm) => d.conclusions.note_vmm(&id, vmm),
                    None => tracing::warn!(
                        "migration {id}: cannot read the target VMM's start time; a restarted \
                         ferryd will not know it"
                    ),
                }
                spawned = Some((child, sock));
                Ok(CrashHook {
                    vm,
                    crash_after_run: crash_after_run(),
                })
            },
        )
    }));
    d.conclusions.forget_vmm(&id);
    let vm_id = reserved.ok();
    match (result, vm_id, spawned) {
        (Ok(Ok(outcome)), Some(vm_id), Some((child, sock))) => {
            if !metrics.status().is_final() {
                metrics.finish(Status::Completed, None);
            }
            tracing::info!(
                "migration {id}: VM {name} runs here now (epoch {})",
                outcome.epoch
            );
            if let Some(p) = &outcome.disk_path {
                tracing::info!("migration {id}: VM {name}'s disk is {}", p.display());
            }
            let mut vm = outcome.vm.vm;
            let _ = vm.link().set_timeout(None);
            // Keep the image open: the VM may move on from here with it.
            let disk = outcome.disk_path.as_ref().and_then(|p| {
                std::fs::File::open(p)
                    .map_err(|e| tracing::error!("cannot open {}: {e}", p.display()))
                    .ok()
            });
            d.vms.finish_incoming(
                &name,
                &vm_id,
                outcome.spec,
                outcome.mem,
                disk,
                outcome.epoch,
                vm,
                Some(child),
            );
            d.vms.watch(name, vm_id, sock);
        }
        (Ok(Ok(_)), _, _) => {
            // migrate_in succeeded without calling create_vm: an engine bug.
            tracing::error!("migration {id}: the engine committed VM {name} without creating it");
            metrics.finish(
                Status::Failed,
                Some("internal error: VM committed but never created".into()),
            );
        }
        (Ok(Err(e @ MigrationError::PostcopyBroken(_))), _, spawned) => {
            // The VM ran here from COMMIT on: never throw it away. Its VMM
            // keeps the guest (waiting for the pages it lacks) and the
            // source keeps it paused; recovery is the operator's for now.
            let pid = spawned.as_ref().map(|(c, _)| c.id());
            tracing::error!(
                "migration {id}: {e}. VM {name} is left with its VMM (pid {pid:?}), \
                 waiting for pages; stop that VMM by hand once {peer} is dealt with"
            );
        }
        (Ok(Err(e)), vm_id, spawned) => {
            tracing::warn!("migration {id}: receiving VM {name} from {peer} failed: {e}");
            if !metrics.status().is_final() {
                metrics.finish(Status::Failed, Some(e.to_string()));
            }
            release(d, &name, vm_id, spawned);
        }
        (Err(panic), vm_id, spawned) => {
            let msg = panic_message(&panic);
            tracing::error!("migration {id}: receiving VM {name} panicked: {msg}");
            metrics.finish(
                Status::Failed,
                Some(format!("ferryd's migration thread panicked: {msg}")),
            );
            release(d, &name, vm_id, spawned);
        }
    }
}

/// The test hook `FERRYD_TEST_CRASH_AFTER_RUN=1`: this ferryd kills itself
/// (SIGKILL) right after the target VMM started the guest, before it tells
/// the source (COMMITTED) or records how the migration ended: the window a
/// restarted ferryd settles from its records (crate::indoubt).
fn crash_after_run() -> bool {
    std::env::var_os("FERRYD_TEST_CRASH_AFTER_RUN").is_some_and(|v| v == "1")
}

/// The target VMM, with the test hook [`crash_after_run`].
struct CrashHook {
    vm: LinkVm,
    crash_after_run: bool,
}

impl TargetVm for CrashHook {
    fn restore(&mut self, state: &VmState) -> Result<VerifyReport, VmError> {
        self.vm.restore(state)
    }
    fn run(&mut self, epoch: u64) -> Result<(), VmError> {
        self.vm.run(epoch)?;
        if self.crash_after_run {
            tracing::error!("FERRYD_TEST_CRASH_AFTER_RUN: killing this ferryd");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
        Ok(())
    }
    fn check(&mut self) -> Result<(), VmError> {
        self.vm.check()
    }
    fn abort(&mut self, reason: &str) {
        self.vm.abort(reason)
    }
    fn restore_postcopy(&mut self, state: &VmState) -> Result<Userfault, VmError> {
        self.vm.restore_postcopy(state)
    }
    fn postcopy_done(&mut self) -> Result<VerifyReport, VmError> {
        self.vm.postcopy_done()
    }
    fn start_checkpoints(&mut self) -> Result<bool, VmError> {
        self.vm.start_checkpoints()
    }
    fn checkpoint_begin(&mut self, bitmap: &mut [u64]) -> Result<VmState, VmError> {
        self.vm.checkpoint_begin(bitmap)
    }
    fn checkpoint_end(&mut self) -> Result<(), VmError> {
        self.vm.checkpoint_end()
    }
    fn stop_checkpoints(&mut self) -> Result<(), VmError> {
        self.vm.stop_checkpoints()
    }
    fn fencer(&mut self) -> Option<Fencer> {
        self.vm.fencer()
    }
}

/// Throws away a failed incoming VM: its name, and its VMM (which the engine
/// told to quit; killed if it does not exit in time).
fn release(d: &Daemon, name: &str, vm_id: Option<String>, spawned: Option<(Child, UnixStream)>) {
    if let Some(vm_id) = vm_id {
        d.vms.remove(name, &vm_id);
    }
    if let Some((child, _sock)) = spawned {
        reap(child, format!("target VMM of {name}"), CHILD_GRACE);
    }
}

fn vmm_err(message: String) -> MigrationError {
    MigrationError::Vm(VmError::Request {
        op: "spawn_vmm",
        message,
    })
}

/// Starts the target VMM and waits for it to register; replies with the spec
/// and the memfd. Returns the VMM, its process, and a second handle on its
/// link (for the watcher).
fn spawn_vmm(
    d: &Daemon,
    migration: &str,
    vm_id: &str,
    spec: &VmSpec,
    mem: &GuestMem,
    disk: Option<&std::fs::File>,
) -> Result<(LinkVm, Child, UnixStream), MigrationError> {
    let token = random_hex(16);
    let log_path = d.cfg.state_dir.join(format!("{}-{token}.log", spec.name));
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .and_then(|f| Ok((f.try_clone()?, f)))
        .map_err(|e| {
            vmm_err(format!(
                "cannot create the VMM log {}: {e}",
                log_path.display()
            ))
        })?;
    let mut cmd = Command::new(&d.cfg.vmm_command);
    cmd.args(&d.cfg.vmm_args)
        .arg("--restore")
        .arg("--link")
        .arg(&d.cfg.link_socket)
        .arg("--token")
        .arg(&token)
        .stdin(Stdio::null())
        .stdout(log.0)
        .stderr(log.1);
    let rx = d.tokens.expect(&token);
    let mut child = cmd.spawn().map_err(|e| {
        d.tokens.forget(&token);
        vmm_err(format!(
            "cannot start the target VMM {}: {e}",
            d.cfg.vmm_command.display()
        ))
    })?;
    tracing::info!(
        "migration {migration}: target VMM for {} started (pid {}, log {})",
        spec.name,
        child.id(),
        log_path.display()
    );
    let waited = wait_register(&rx, &mut child, &log_path);
    d.tokens.forget(&token);
    let registered = waited.and_then(|sock| {
        let mut link = Link::new(
            sock.try_clone()
                .map_err(|e| format!("cannot clone the link: {e}"))?,
        );
        let reply = LinkMsg::Registered {
            vm_id: vm_id.into(),
            spec: Some(spec.clone()),
        };
        let mut fds = vec![mem.memfd_raw()];
        fds.extend(disk.map(std::os::fd::AsRawFd::as_raw_fd));
        link.send(&reply, &[], &fds)
            .and_then(|()| link.set_timeout(Some(VMM_CALL_TIMEOUT)))
            .map_err(|e| format!("cannot hand the VM to the target VMM: {e}"))?;
        Ok((LinkVm::new(link), sock))
    });
    match registered {
        Ok((vm, sock)) => Ok((vm, child, sock)),
        Err(message) => {
            reap(
                child,
                format!("target VMM of {}", spec.name),
                Duration::ZERO,
            );
            Err(vmm_err(message))
        }
    }
}

fn wait_register(
    rx: &std::sync::mpsc::Receiver<UnixStream>,
    child: &mut Child,
    log_path: &std::path::Path,
) -> Result<UnixStream, String> {
    let deadline = Instant::now() + VMM_REGISTER_TIMEOUT;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(sock) => return Ok(sock),
            Err(RecvTimeoutError::Disconnected) => {
                return Err("the token map dropped the VMM".into())
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the target VMM exited ({status}) before registering; see {}",
                log_path.display()
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the target VMM did not register within {VMM_REGISTER_TIMEOUT:?}; see {}",
                log_path.display()
            ));
        }
    }
}
