//! ferryd's life: start-up (key, state directory, sockets, threads), the
//! shared state every thread sees, and shutdown on SIGTERM/SIGINT.
//!
//! ```text
//!  run: block SIGINT/SIGTERM ─▶ start ─▶ sigwait ─▶ shutdown
//!  start: key ─▶ state dir ─▶ control + link sockets (0600) ─▶ TCP listener ─▶ threads
//!  shutdown: stop accepting ─▶ cancel outgoing migrations (they resume here
//!            before COMMIT) ─▶ wait for migration threads (bounded) ─▶ remove sockets
//! ```

use std::fs::DirBuilder;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_engine::key::KeyError;
use ferry_engine::target::Acceptor;
use ferry_engine::Key;
use ferry_transport::{Transport, TransportError};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::stat::{umask, Mode};

use crate::config::Config;
use crate::linkserver::Tokens;
use crate::migrations::MigrationTable;
use crate::util::WaitGroup;
use crate::vms::VmTable;

/// How long shutdown waits for running migrations to wind down (a cancelled
/// pre-copy resumes its VM within one VMM call; an incoming one cannot be
/// cancelled and ends by its own I/O timeout).
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(30);

/// Everything ferryd's threads share.
pub struct Daemon {
    /// Settings.
    pub cfg: Config,
    /// The pre-shared key.
    pub key: Key,
    /// The data transport.
    pub transport: Arc<dyn Transport>,
    /// The TCP listener's actual address.
    pub listen_addr: String,
    /// VMs.
    pub vms: Arc<VmTable>,
    /// Migrations.
    pub migrations: MigrationTable,
    /// Tokens of target VMMs ferryd spawned and waits for.
    pub tokens: Tokens,
    /// Authenticates incoming data connections.
    pub acceptor: Acceptor,
    /// Migration threads (shutdown waits for them).
    pub threads: Arc<WaitGroup>,
    /// Set once shutdown began.
    pub shutdown: AtomicBool,
    /// Pre-faulted memory for incoming migrations (`--reserve-mib`).
    pub reserve: Option<Arc<ferry_engine::memory::Reserve>>,
    /// Incoming post-copy migrations a reconnecting source may resume,
    /// and how incoming migrations ended.
    pub resumes: Arc<ferry_engine::target::Resumes>,
    /// Where `resumes` keeps that (and the VMMs of incoming migrations).
    pub conclusions: Arc<crate::concluded::FileConclusions>,
    /// Hand-offs of outgoing migrations, for a restarted ferryd.
    pub journal: Arc<crate::journal::FileJournal>,
    /// Hand-offs a previous ferryd recorded, by VM name, until the VM's
    /// VMM registers again and the migration is finished.
    pub handoffs: std::sync::Mutex<std::collections::HashMap<String, crate::journal::Found>>,
}

impl Daemon {
    /// True once shutdown began.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }
}

/// Why ferryd could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The key file is missing or invalid.
    #[error("{0}")]
    Key(#[from] KeyError),
    /// The state directory could not be created.
    #[error("cannot create state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A unix socket could not be set up.
    #[error("cannot set up socket {path}: {reason}")]
    Socket {
        /// The socket path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The TCP listener could not be bound.
    #[error("{0}")]
    Listen(#[from] TransportError),
    /// Signal handling could not be set up.
    #[error("cannot set up signal handling: {0}")]
    Signals(nix::Error),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(String),
}

/// A started ferryd.
pub struct Running {
    /// The shared state.
    pub daemon: Arc<Daemon>,
    server: Arc<tiny_http::Server>,
    threads: Vec<JoinHandle<()>>,
}

/// Runs ferryd until SIGTERM or SIGINT.
pub fn run(cfg: Config, transport: Arc<dyn Transport>) -> Result<(), DaemonError> {
    // Blocked before any thread exists, so every thread inherits the mask and
    // only `sigwait` below sees the signals. (Child VMMs start with an empty
    // mask: std's spawn resets it.)
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().map_err(DaemonError::Signals)?;
    let running = start(cfg, transport)?;
    let sig = signals.wait().map_err(DaemonError::Signals)?;
    tracing::info!("{sig}: shutting down");
    running.shutdown();
    Ok(())
}

/// Starts ferryd's sockets and threads.
pub fn start(cfg: Config, transport: Arc<dyn Transport>) -> Result<Running, DaemonError> {
    let key = load_key(&cfg.key_file)?;
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.state_dir)
        .map_err(|source| DaemonError::StateDir {
            path: cfg.state_dir.display().to_string(),
            source,
        })?;
    let journal = crate::journal::FileJournal::open(&cfg.state_dir).map_err(|source| {
        DaemonError::StateDir {
            path: cfg
                .state_dir
                .join(crate::journal::DIR)
                .display()
                .to_string(),
            source,
        }
    })?;
    let handoffs = journal.load();
    let mut created = Unlink(Vec::new());
    let control = bind_private(&cfg.control_socket)?;
    created.0.push(cfg.control_socket.clone());
    let link = bind_private(&cfg.link_socket)?;
    created.0.push(cfg.link_socket.clone());
    let listener = transport.listen(&cfg.listen)?;
    let listen_addr = listener.local_addr();
    let server =
        tiny_http::Server::from_listener(control, None).map_err(|e| DaemonError::Socket {
            path: cfg.control_socket.display().to_string(),
            reason: e.to_string(),
        })?;
    let conclusions = Arc::new(crate::concluded::FileConclusions::open(&cfg.state_dir));
    let d = Arc::new(Daemon {
        acceptor: Acceptor::new(key.clone()),
        key,
        transport,
        listen_addr,
        vms: Arc::new(VmTable::new()),
        migrations: MigrationTable::default(),
        tokens: Tokens::default(),
        threads: Arc::new(WaitGroup::default()),
        shutdown: AtomicBool::new(false),
        reserve: (cfg.reserve_mib > 0)
            .then(|| ferry_engine::memory::Reserve::new(cfg.reserve_mib << 20)),
        resumes: ferry_engine::target::Resumes::with_store(Box::new(conclusions.clone())),
        conclusions,
        journal: Arc::new(journal),
        handoffs: std::sync::Mutex::new(handoffs),
        cfg,
    });
    let server = Arc::new(server);
    let mut threads = crate::http::serve(&d, &server);
    if threads.is_empty() {
        return Err(DaemonError::Thread("no API worker could start".into()));
    }
    threads
        .push(crate::linkserver::spawn(&d, link).map_err(|e| DaemonError::Thread(e.to_string()))?);
    threads.push(
        crate::incoming::spawn(&d, listener).map_err(|e| DaemonError::Thread(e.to_string()))?,
    );
    crate::indoubt::start(&d);
    created.0.clear(); // running: shutdown removes them
    tracing::info!(
        "ferryd {} ready: control {}, link {}, data {} ({}), target VMM {}",
        env!("CARGO_PKG_VERSION"),
        d.cfg.control_socket.display(),
        d.cfg.link_socket.display(),
        d.listen_addr,
        d.transport.name(),
        d.cfg.vmm_command.display(),
    );
    Ok(Running {
        daemon: d,
        server,
        threads,
    })
}

impl Running {
    /// Stops accepting, cancels migrations, waits for them, removes sockets.
    pub fn shutdown(self) {
        let d = &self.daemon;
        d.shutdown.store(true, Ordering::SeqCst);
        // The API workers and accept loops notice within one poll (500 ms);
        // once joined, no request can start a new migration.
        for t in self.threads {
            let _ = t.join();
        }
        d.migrations.cancel_all();
        let left = d.threads.wait_idle(SHUTDOWN_WAIT);
        if left > 0 {
            tracing::warn!(
                "{left} migration(s) still running after {SHUTDOWN_WAIT:?}; exiting anyway"
            );
        }
        d.vms.close();
        drop(self.server); // tiny_http removes the control socket file
        for path in [&d.cfg.control_socket, &d.cfg.link_socket] {
            if is_socket(path) {
                let _ = std::fs::remove_file(path);
            }
        }
        tracing::info!("ferryd stopped");
    }
}

fn load_key(path: &Path) -> Result<Key, DaemonError> {
    let key = Key::from_file(path)?;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "key file {} is readable by group or others (mode {mode:03o}); run chmod 600 on it",
                path.display()
            );
        }
    }
    Ok(key)
}

/// Removes the socket files it holds when dropped: a failed start leaves none.
struct Unlink(Vec<std::path::PathBuf>);

impl Drop for Unlink {
    fn drop(&mut self) {
        for p in &self.0 {
            if is_socket(p) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Binds a unix socket only its owner can connect to, replacing a stale
/// socket file (but never another live ferryd's, nor a non-socket file).
fn bind_private(path: &Path) -> Result<UnixListener, DaemonError> {
    let err = |reason: String| DaemonError::Socket {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(err("another ferryd is serving it".into()));
            }
            std::fs::remove_file(path)
                .map_err(|e| err(format!("cannot remove the stale socket: {e}")))?;
        }
        Ok(_) => {
            return Err(err(
                "the path exists and is not a socket; not touching it".into()
            ))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(err(e.to_string())),
    }
    // The socket file takes its mode from the umask at bind(); set it so the
    // file is 0600 from its first moment. umask is per process: start() runs
    // before ferryd starts threads that create files.
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    umask(old);
    let listener = bound.map_err(|e| err(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err(format!("cannot set mode 0600: {e}")))?;
    Ok(listener)
}

/// Sets up logging to stderr: `level` (a flag or the config file) wins, else
/// RUST_LOG, else "info".
pub fn init_logging(level: Option<&str>) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("invalid --log-level {l:?}: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init()
        .map_err(|e| e.to_string())
}
