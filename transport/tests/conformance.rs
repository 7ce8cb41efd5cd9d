//! Every transport against the one conformance suite.

use std::num::NonZeroU32;
use std::time::Duration;

use ferry_transport::conformance;
use ferry_transport::inproc::InProcTransport;
use ferry_transport::tcp::TcpTransport;
use ferry_transport::uring::UringTransport;
use ferry_transport::{Conn, Listener, Result, Transport};

#[test]
fn tcp_loopback() {
    conformance::run_all(&TcpTransport::new(), "127.0.0.1:0");
}

fn uring() -> UringTransport {
    UringTransport::new().expect("io_uring transport (the error says why not)")
}

#[test]
fn uring_loopback() {
    conformance::run_all(&uring(), "127.0.0.1:0");
}

/// Zero-copy from one page up, so every guest run of the suite takes the
/// SENDMSG_ZC path (runs without kernel support are sent by copy).
#[test]
fn uring_zero_copy_loopback() {
    let t = uring().with_zero_copy_min_bytes(NonZeroU32::new(4096));
    conformance::run_all(&t, "127.0.0.1:0");
}

/// Connects with one transport and accepts with another: both speak plain
/// TCP on the wire, so every case must pass with either end on either.
struct Mixed {
    name: &'static str,
    connect: Box<dyn Transport>,
    listen: Box<dyn Transport>,
}

impl Transport for Mixed {
    fn name(&self) -> &'static str {
        self.name
    }

    fn connect(&self, addr: &str, timeout: Duration) -> Result<Box<dyn Conn>> {
        self.connect.connect(addr, timeout)
    }

    fn listen(&self, addr: &str) -> Result<Box<dyn Listener>> {
        self.listen.listen(addr)
    }
}

#[test]
fn uring_client_tcp_server() {
    let t = Mixed {
        name: "uring->tcp",
        connect: Box::new(uring()),
        listen: Box::new(TcpTransport::new()),
    };
    conformance::run_all(&t, "127.0.0.1:0");
}

#[test]
fn tcp_client_uring_server() {
    let t = Mixed {
        name: "tcp->uring",
        connect: Box::new(TcpTransport::new()),
        listen: Box::new(uring()),
    };
    conformance::run_all(&t, "127.0.0.1:0");
}

#[test]
fn inproc() {
    conformance::run_all(&InProcTransport::new(), "conformance");
}

/// A pipe smaller than a page and not a power of two, so frames wrap the ring
/// at every offset.
#[test]
fn inproc_tiny_pipes() {
    conformance::run_all(&InProcTransport::with_pipe_bytes(4095), "tiny");
}

/// RDMA verbs, where `FERRY_RDMA_ADDR` names an address on an RDMA device
/// (`cargo xtask rdma` runs this inside a soft-RoCE VM); skipped elsewhere.
#[cfg(feature = "rdma")]
#[test]
fn rdma() {
    use ferry_transport::rdma::{RdmaConfig, RdmaTransport};
    let addr = match std::env::var("FERRY_RDMA_ADDR") {
        Ok(a) if !a.is_empty() => a,
        _ => {
            eprintln!("skipped: FERRY_RDMA_ADDR is not set (no RDMA device here)");
            return;
        }
    };
    let t = RdmaTransport::new(RdmaConfig::default()).expect("an RDMA device at FERRY_RDMA_ADDR");
    conformance::run_all(&t, &format!("{addr}:0"));
}
