//! Every transport against the one conformance suite.

use ferry_transport::conformance;
use ferry_transport::inproc::InProcTransport;
use ferry_transport::tcp::TcpTransport;

#[test]
fn tcp_loopback() {
    conformance::run_all(&TcpTransport::new(), "127.0.0.1:0");
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
