//! Which transport moves a migration's bytes: `tcp` (sockets, blocking
//! syscalls), `uring` (the same TCP on the wire, driven by io_uring) or
//! `rdma` (RDMA verbs, with a TCP side channel on the same address). The
//! choice is each host's own for tcp and uring: a uring source talks to a
//! tcp target and back. rdma needs rdma on both hosts.
//!
//! ```text
//!  get(kind, rdma options)
//!    tcp   ─▶ made once per process
//!    uring ─▶ probed once per process; the verdict (transport or error) is kept
//!    rdma  ─▶ built without the `rdma` feature: NotBuilt
//!             else the transport of the last options that worked, or a new
//!             attempt (a failure is not kept: a device that comes up later,
//!             say after `modprobe rdma_rxe`, is used without a restart)
//! ```

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use ferry_transport::tcp::TcpTransport;
use ferry_transport::uring::UringTransport;
use ferry_transport::{Transport, TransportError};

/// A transport by name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// Plain TCP sockets.
    #[default]
    Tcp,
    /// TCP driven by io_uring.
    Uring,
    /// RDMA verbs (reliable-connected queue pairs); a TCP side channel on
    /// the same address sets each queue pair up. Exists in every build so
    /// that a build without the `rdma` feature can say so.
    Rdma,
}

impl TransportKind {
    /// Every kind, for help texts.
    pub const ALL: [TransportKind; 3] = [
        TransportKind::Tcp,
        TransportKind::Uring,
        TransportKind::Rdma,
    ];

    /// The name users type.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Uring => "uring",
            TransportKind::Rdma => "rdma",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TransportKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown transport {s:?}: expected tcp, uring or rdma"))
    }
}

/// The rdma transport's settings (ferryd's `--rdma-*` flags). Every field
/// `None` is found from the IP address a connection uses. Present in every
/// build, so flags and config files parse alike with or without rdma.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RdmaOptions {
    /// RDMA device (`rxe0`, `mlx5_0`).
    pub device: Option<String>,
    /// Port of that device, from 1.
    pub port: Option<u8>,
    /// GID table index.
    pub gid_index: Option<u8>,
}

/// Cap on an RDMA device name: the kernel's `IB_DEVICE_NAME_MAX` (64, with
/// the terminating NUL).
pub const RDMA_DEVICE_NAME_BYTES_MAX: usize = 63;

impl RdmaOptions {
    /// Checks what the kernel would refuse anyway, so a typo fails at
    /// start-up with the flag's name instead of at the first migration.
    pub fn check(&self) -> Result<(), String> {
        if let Some(d) = &self.device {
            let ok = !d.is_empty()
                && d.len() <= RDMA_DEVICE_NAME_BYTES_MAX
                && d.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !ok {
                return Err(format!(
                    "--rdma-device {d:?} is not a device name (letters, digits, '_', '-', '.'; \
                     at most {RDMA_DEVICE_NAME_BYTES_MAX} bytes; see /sys/class/infiniband)"
                ));
            }
        }
        if self.port == Some(0) {
            return Err("--rdma-port 0: RDMA ports count from 1".into());
        }
        Ok(())
    }

    #[cfg(feature = "rdma")]
    fn to_config(&self) -> ferry_transport::rdma::RdmaConfig {
        ferry_transport::rdma::RdmaConfig {
            device: self.device.clone(),
            port: self.port,
            gid_index: self.gid_index,
        }
    }
}

/// Why a transport cannot be used here.
#[derive(Debug, thiserror::Error)]
pub enum UnavailableError {
    /// This build left the transport out.
    #[error(
        "this build of ferry has no {kind} support (it was built without the `{kind}` cargo feature)"
    )]
    NotBuilt {
        /// The transport asked for.
        kind: TransportKind,
    },
    /// The transport refused to start on this host.
    #[error("the {kind} transport cannot start on this host: {source}")]
    Start {
        /// The transport asked for.
        kind: TransportKind,
        /// Why (shared: uring's verdict is kept for the process).
        #[source]
        source: Arc<TransportError>,
    },
}

/// The transport of `kind`; `rdma` is its settings (used by rdma only). An
/// error says in one line why this host or this build cannot use it.
pub fn get(
    kind: TransportKind,
    rdma: &RdmaOptions,
) -> Result<Arc<dyn Transport>, UnavailableError> {
    static TCP: OnceLock<Arc<dyn Transport>> = OnceLock::new();
    static URING: OnceLock<Result<Arc<dyn Transport>, Arc<TransportError>>> = OnceLock::new();
    match kind {
        TransportKind::Tcp => Ok(TCP
            .get_or_init(|| Arc::new(TcpTransport::default()))
            .clone()),
        TransportKind::Uring => URING
            .get_or_init(|| {
                UringTransport::new()
                    .map(|t| Arc::new(t) as Arc<dyn Transport>)
                    .map_err(Arc::new)
            })
            .clone()
            .map_err(|source| UnavailableError::Start { kind, source }),
        TransportKind::Rdma => rdma::get(rdma),
    }
}

#[cfg(feature = "rdma")]
mod rdma {
    use std::sync::{Arc, Mutex, PoisonError};

    use ferry_transport::rdma::RdmaTransport;
    use ferry_transport::Transport;

    use super::{RdmaOptions, TransportKind, UnavailableError};

    /// The last transport made, with its options: a process runs with one
    /// set (ferryd's flags), so one slot suffices; other options replace it.
    type Slot = Option<(RdmaOptions, Arc<dyn Transport>)>;
    static LAST: Mutex<Slot> = Mutex::new(None);

    pub(super) fn get(opts: &RdmaOptions) -> Result<Arc<dyn Transport>, UnavailableError> {
        // Held while a new transport starts, so two first migrations do not
        // open the device twice; nothing else waits on it.
        let mut last = LAST.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((o, t)) = last.as_ref() {
            if o == opts {
                return Ok(Arc::clone(t));
            }
        }
        let t: Arc<dyn Transport> =
            Arc::new(RdmaTransport::new(opts.to_config()).map_err(|e| {
                UnavailableError::Start {
                    kind: TransportKind::Rdma,
                    source: Arc::new(e),
                }
            })?);
        *last = Some((opts.clone(), Arc::clone(&t)));
        Ok(t)
    }
}

#[cfg(not(feature = "rdma"))]
mod rdma {
    use std::sync::Arc;

    use ferry_transport::Transport;

    use super::{RdmaOptions, TransportKind, UnavailableError};

    pub(super) fn get(_: &RdmaOptions) -> Result<Arc<dyn Transport>, UnavailableError> {
        Err(UnavailableError::NotBuilt {
            kind: TransportKind::Rdma,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for k in TransportKind::ALL {
            assert_eq!(k.name().parse::<TransportKind>(), Ok(k));
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{k}\""));
        }
        for bad in ["udp", "", "RDMA", "tcp "] {
            let e = bad.parse::<TransportKind>().unwrap_err();
            assert!(e.contains("expected tcp, uring or rdma"), "{e}");
        }
        let none = RdmaOptions::default();
        assert_eq!(get(TransportKind::Tcp, &none).unwrap().name(), "tcp");
    }

    /// rdma works where a device is, and elsewhere says why in one line;
    /// either way tcp keeps working.
    #[test]
    fn rdma_works_or_says_why_in_one_line() {
        let none = RdmaOptions::default();
        match get(TransportKind::Rdma, &none) {
            Ok(t) => {
                assert_eq!(t.name(), "rdma");
                // The same options: the same transport.
                let again = get(TransportKind::Rdma, &none).unwrap();
                assert!(Arc::ptr_eq(&t, &again));
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(!msg.contains('\n'), "{msg}");
                if cfg!(feature = "rdma") {
                    assert!(
                        msg.starts_with("the rdma transport cannot start on this host: "),
                        "{msg}"
                    );
                } else {
                    assert!(msg.contains("no rdma support"), "{msg}");
                    assert!(matches!(e, UnavailableError::NotBuilt { .. }));
                }
            }
        }
        assert_eq!(get(TransportKind::Tcp, &none).unwrap().name(), "tcp");
    }

    #[test]
    fn rdma_options_are_checked() {
        let ok = RdmaOptions {
            device: Some("mlx5_0".into()),
            port: Some(1),
            gid_index: Some(3),
        };
        assert_eq!(ok.check(), Ok(()));
        assert_eq!(RdmaOptions::default().check(), Ok(()));
        for bad in [
            RdmaOptions {
                port: Some(0),
                ..RdmaOptions::default()
            },
            RdmaOptions {
                device: Some(String::new()),
                ..RdmaOptions::default()
            },
            RdmaOptions {
                device: Some("../rxe0".into()),
                ..RdmaOptions::default()
            },
            RdmaOptions {
                device: Some("x".repeat(RDMA_DEVICE_NAME_BYTES_MAX + 1)),
                ..RdmaOptions::default()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}
