//! Which transport moves a migration's bytes: `tcp` (sockets, blocking
//! syscalls) or `uring` (the same TCP on the wire, driven by io_uring). The
//! choice is each host's own: a uring source talks to a tcp target and back.

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
}

impl TransportKind {
    /// Every kind, for help texts.
    pub const ALL: [TransportKind; 2] = [TransportKind::Tcp, TransportKind::Uring];

    /// The name users type.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Uring => "uring",
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
            .ok_or_else(|| {
                let rdma = if s == "rdma" {
                    " (rdma is not built yet)"
                } else {
                    ""
                };
                format!("unknown transport {s:?}{rdma}: expected tcp or uring")
            })
    }
}

/// The transport of `kind`, made once per process (the io_uring probe runs
/// once). An error says why this host cannot use it.
pub fn get(kind: TransportKind) -> Result<Arc<dyn Transport>, TransportError> {
    static TCP: OnceLock<Arc<dyn Transport>> = OnceLock::new();
    static URING: OnceLock<Result<Arc<dyn Transport>, String>> = OnceLock::new();
    match kind {
        TransportKind::Tcp => Ok(TCP
            .get_or_init(|| Arc::new(TcpTransport::default()))
            .clone()),
        TransportKind::Uring => URING
            .get_or_init(|| {
                UringTransport::new()
                    .map(|t| Arc::new(t) as Arc<dyn Transport>)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(|msg| TransportError::Io {
                op: "starting the uring transport",
                source: std::io::Error::other(msg),
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for k in TransportKind::ALL {
            assert_eq!(k.name().parse::<TransportKind>(), Ok(k));
        }
        let e = "rdma".parse::<TransportKind>().unwrap_err();
        assert!(e.contains("not built yet"), "{e}");
        assert!("udp".parse::<TransportKind>().is_err());
        assert_eq!(get(TransportKind::Tcp).unwrap().name(), "tcp");
    }
}
