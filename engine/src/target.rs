//! The target side of a migration: sessions, receive pipeline, commit.
use std::time::Duration;

use ferry_transport::Conn;

use crate::link::VmSpec;
use crate::{GuestMem, Key, Metrics, MigrationError, TargetVm};

/// Authenticates incoming connections and groups them into sessions.
pub struct Acceptor {
    key: Key,
}

/// All connections of one incoming migration, authenticated.
pub struct IncomingSession {
    id: String,
    vm: String,
    peer: String,
}

impl IncomingSession {
    /// Session id chosen by the source.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// Name of the VM being migrated in.
    pub fn vm_name(&self) -> &str {
        &self.vm
    }
    /// The source's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }
}

impl Acceptor {
    /// An acceptor for peers holding `key`.
    pub fn new(key: Key) -> Self {
        Acceptor { key }
    }

    /// Authenticates `conn` (blocking, bounded by its receive timeout) and
    /// files it under its session. Returns the session once its last
    /// connection arrived. Errors leave other sessions untouched.
    pub fn admit(&self, conn: Box<dyn Conn>) -> Result<Option<IncomingSession>, MigrationError> {
        let _ = (&self.key, conn);
        Err(MigrationError::Invalid("not built yet".into()))
    }

    /// Forgets a finished session so its id can never be claimed again by a
    /// stray connection (ids stay reserved).
    pub fn finished(&self, id: &str) {
        let _ = id;
    }
}

/// Settings of the receiving side.
#[derive(Clone, Debug)]
pub struct TargetConfig {
    /// A source silent for this long is dead: abort.
    pub io_timeout: Duration,
    /// Fault in all guest memory before receiving.
    pub prefault: bool,
}

impl Default for TargetConfig {
    fn default() -> Self {
        TargetConfig { io_timeout: Duration::from_secs(10), prefault: true }
    }
}

/// A migration received and committed: the VM runs here now.
pub struct TargetOutcome<V> {
    /// The epoch it runs with.
    pub epoch: u64,
    /// Its spec.
    pub spec: VmSpec,
    /// Its memory.
    pub mem: GuestMem,
    /// The VMM running it.
    pub vm: V,
}

/// Receives one migration. `create_vm` is called once the spec is known and
/// memory exists; it starts the target VMM (not yet running the guest).
pub fn migrate_in<V: TargetVm>(
    session: IncomingSession,
    cfg: &TargetConfig,
    metrics: &Metrics,
    create_vm: impl FnOnce(&VmSpec, &GuestMem) -> Result<V, MigrationError>,
) -> Result<TargetOutcome<V>, MigrationError> {
    let _ = (session, cfg, metrics, create_vm);
    Err(MigrationError::Invalid("not built yet".into()))
}
