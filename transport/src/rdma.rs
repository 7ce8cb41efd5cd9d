//! RDMA verbs transport (reliable-connected queue pairs). Work in progress:
//! the public API is final, the data path lands next.

use std::time::Duration;

use crate::{Conn, Listener, Result, Transport, TransportError};

/// Where a connection's RDMA traffic goes. Every field defaults to
/// auto-detection from the IP address the connection uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RdmaConfig {
    /// RDMA device name (`rxe0`, `mlx5_0`); `None` finds the device that
    /// holds the connection's local IP address.
    pub device: Option<String>,
    /// Port of that device (from 1); `None` finds it with the address.
    pub port: Option<u8>,
    /// GID table index; `None` finds the RoCE v2 GID of the address.
    pub gid_index: Option<u8>,
}

/// RDMA transport: a TCP side channel per connection sets the queue pair up
/// and watches the peer's liveness; bytes move over RDMA.
#[derive(Debug)]
pub struct RdmaTransport {
    config: RdmaConfig,
}

impl RdmaTransport {
    /// Checks that this host has an RDMA device to use; an error says why not.
    pub fn new(config: RdmaConfig) -> Result<Self> {
        let _ = &config;
        Err(TransportError::Io {
            op: "starting the rdma transport",
            source: std::io::Error::other("the rdma transport is not built yet"),
        })
    }

    /// The configuration in effect.
    pub fn config(&self) -> &RdmaConfig {
        &self.config
    }
}

impl Transport for RdmaTransport {
    fn name(&self) -> &'static str {
        "rdma"
    }

    fn connect(&self, addr: &str, _timeout: Duration) -> Result<Box<dyn Conn>> {
        Err(TransportError::Connect {
            addr: addr.to_string(),
            source: std::io::Error::other("the rdma transport is not built yet"),
        })
    }

    fn listen(&self, addr: &str) -> Result<Box<dyn Listener>> {
        Err(TransportError::Listen {
            addr: addr.to_string(),
            source: std::io::Error::other("the rdma transport is not built yet"),
        })
    }
}
