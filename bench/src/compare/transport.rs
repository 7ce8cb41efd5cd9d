//! The names `--transports` accepts, and whether each can run here.
//!
//! A name is accepted when ferry-bench can ask ferryd for it
//! ([`migrate::Transport`](crate::migrate::Transport)) or when it names a
//! transport ferry has or plans that this ferry-bench cannot ask for yet
//! ([`NOT_IN_BENCH`]); anything else (a typo) is refused before any run.
//! A transport that cannot run gets a row `unavailable: <reason>` and the
//! others run as usual.
//!
//! Adding a transport to the bench (as `Uring`, `Rdma`): add the variant to
//! `migrate::Transport`, remove its entry from [`NOT_IN_BENCH`] (a test
//! insists), and give it an arm in [`machine_reason`] that says why this
//! machine cannot run it, if it cannot.

use std::fmt;
use std::str::FromStr;

use clap::ValueEnum;
use ferry_daemon::transports::{self, RdmaOptions, TransportKind};

use crate::migrate::Transport;

/// Transports ferry-bench cannot ask ferryd for (yet), with the reason the
/// table shows. Empty since rdma joined; the next planned transport goes here.
pub const NOT_IN_BENCH: [(&str, &str); 0] = [];

/// A name from `--transports`: one the bench can run or one of
/// [`NOT_IN_BENCH`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportName(String);

impl TransportName {
    /// The name as typed.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The transport to ask for, or why it cannot run here.
    pub fn availability(&self) -> Result<Transport, String> {
        match Transport::from_str(&self.0, false) {
            Ok(t) => machine_reason(t).map_or(Ok(t), Err),
            Err(_) => Err(NOT_IN_BENCH
                .iter()
                .find(|(n, _)| *n == self.0)
                .map_or("unknown transport", |(_, why)| why)
                .to_string()),
        }
    }
}

/// The names the bench can run, for messages.
fn runnable_names() -> Vec<String> {
    Transport::value_variants()
        .iter()
        .filter_map(|t| t.to_possible_value().map(|v| v.get_name().to_string()))
        .collect()
}

impl FromStr for TransportName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if Transport::from_str(s, false).is_ok() || NOT_IN_BENCH.iter().any(|(n, _)| *n == s) {
            return Ok(TransportName(s.to_string()));
        }
        let mut known = runnable_names();
        known.extend(NOT_IN_BENCH.iter().map(|(n, _)| n.to_string()));
        Err(format!(
            "unknown transport {s:?}: expected one of {}",
            known.join(", ")
        ))
    }
}

impl fmt::Display for TransportName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why this machine cannot run `t`, if it cannot. ferryd has the last
/// word: a transport it refuses breaks its runs, which say why.
pub fn machine_reason(t: Transport) -> Option<String> {
    match t {
        Transport::Tcp => None,
        // What ferryd itself would try (the probe included).
        Transport::Uring => {
            io_uring_sysctl_reason().or_else(|| daemon_reason(TransportKind::Uring))
        }
        // ferryd with ferry-bench's settings: no --rdma-* flags, so the
        // device is found from the listen address. Says "no rdma support"
        // in a build without the `rdma` feature.
        Transport::Rdma => daemon_reason(TransportKind::Rdma),
    }
}

/// Why ferryd's own [`transports::get`] refuses `kind` in this process.
fn daemon_reason(kind: TransportKind) -> Option<String> {
    transports::get(kind, &RdmaOptions::default())
        .err()
        .map(|e| e.to_string())
}

/// For an io_uring transport: why the kernel's `kernel.io_uring_disabled`
/// sysctl (Linux 6.6+) rules io_uring out, if it does. A kernel without the
/// sysctl allows io_uring unless a seccomp filter stops it, which only
/// ferryd's own attempt shows.
pub fn io_uring_sysctl_reason() -> Option<String> {
    let v = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok()?;
    io_uring_disabled_reason(&v, nix::unistd::geteuid().is_root())
}

/// The reason for a value of `kernel.io_uring_disabled`: 0 allows io_uring,
/// 1 allows it for root and the `kernel.io_uring_group`, 2 disables it.
fn io_uring_disabled_reason(value: &str, root: bool) -> Option<String> {
    match value.trim() {
        "2" => Some("io_uring is disabled here (kernel.io_uring_disabled = 2)".into()),
        "1" if !root => Some(
            "io_uring is limited to root and kernel.io_uring_group here \
             (kernel.io_uring_disabled = 1)"
                .into(),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_bench_names_and_planned_ones_refuses_typos() {
        let tcp: TransportName = "tcp".parse().unwrap();
        assert_eq!(tcp.availability(), Ok(Transport::Tcp));
        let rdma: TransportName = "rdma".parse().unwrap();
        // Runnable where an RDMA device works; elsewhere it says why.
        match rdma.availability() {
            Ok(t) => assert_eq!(t, Transport::Rdma),
            Err(why) => assert!(why.contains("rdma"), "{why}"),
        }
        for bad in ["tpc", "", "TCP", "quic"] {
            let e = bad.parse::<TransportName>().unwrap_err();
            assert!(e.contains("expected one of tcp, uring, rdma"), "{e}");
        }
    }

    #[test]
    fn not_in_bench_lists_only_names_the_bench_cannot_run() {
        // When a transport joins migrate::Transport, its entry here must go.
        let runnable = runnable_names();
        for (n, _) in NOT_IN_BENCH {
            assert!(!runnable.iter().any(|r| r == n), "{n} is runnable now");
        }
    }

    #[test]
    fn io_uring_sysctl_values() {
        assert_eq!(io_uring_disabled_reason("0\n", false), None);
        assert_eq!(io_uring_disabled_reason("1\n", true), None);
        assert!(io_uring_disabled_reason("1\n", false)
            .unwrap()
            .contains("= 1"));
        assert!(io_uring_disabled_reason("2\n", true)
            .unwrap()
            .contains("= 2"));
        // This machine: whatever it says, it says it without failing.
        let _ = io_uring_sysctl_reason();
    }
}
