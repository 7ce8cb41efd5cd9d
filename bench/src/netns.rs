//! Two network namespaces joined by a veth pair: a source host and a target
//! host on one machine, so a migration crosses a real (virtual) NIC instead of
//! loopback.
//!
//! ```text
//!   netns <tag>-src                      netns <tag>-tgt
//!   ┌──────────────────────┐            ┌──────────────────────┐
//!   │ ferryd (source)      │            │ ferryd (target)      │
//!   │ 198.18.0.1/30  fbsN ─┼── veth ────┼─ fbtN  198.18.0.2/30 │
//!   └──────────────────────┘            └──────────────────────┘
//! ```
//!
//! The addresses come from 198.18.0.0/15, the block RFC 2544 sets aside for
//! benchmarking: it is never routed, and the pair's traffic never leaves the
//! two namespaces anyway. Deleting a namespace deletes its veth end, so
//! teardown is two `ip netns del`, done by Drop even on errors.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Source end address.
pub const SRC_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Target end address.
pub const TGT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Prefix length: a /30 holds exactly the two ends.
const PREFIX_LEN: u8 = 30;
/// tbf bucket: at least one 64 KiB GSO segment plus headroom, or tbf drops
/// every large segment and TCP stalls.
const TBF_BURST: &str = "512kb";
/// tbf queue latency bound; beyond it packets drop and TCP backs off.
const TBF_LATENCY: &str = "50ms";

/// A pair of namespaces and the veth between them, deleted on drop.
#[derive(Debug)]
pub struct NetnsPair {
    /// The source namespace's name.
    pub src: String,
    /// The target namespace's name.
    pub tgt: String,
    src_if: String,
    tgt_if: String,
    created: Vec<String>,
}

/// Runs `ip` with `args`; fails with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} (is iproute2 installed?)"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl NetnsPair {
    /// Creates `<tag>-src` and `<tag>-tgt`, the veth pair, addresses, and
    /// brings everything up. Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN).
    pub fn create(tag: &str) -> Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            bail!("--netns needs root: it creates network namespaces and a veth pair");
        }
        // Interface names are capped at 15 bytes (IFNAMSIZ - 1); the pid fits.
        let pid = std::process::id();
        let mut pair = NetnsPair {
            src: format!("{tag}-src"),
            tgt: format!("{tag}-tgt"),
            src_if: format!("fbs{pid}"),
            tgt_if: format!("fbt{pid}"),
            created: Vec::new(),
        };
        for ns in [pair.src.clone(), pair.tgt.clone()] {
            ip(&["netns", "add", &ns])?;
            pair.created.push(ns);
        }
        let (src, tgt, src_if, tgt_if) = (&pair.src, &pair.tgt, &pair.src_if, &pair.tgt_if);
        // Created straight inside the namespaces, so nothing ever appears in
        // (or has to be cleaned from) the root namespace.
        ip(&[
            "link", "add", src_if, "netns", src, "type", "veth", "peer", "name", tgt_if, "netns",
            tgt,
        ])?;
        for (ns, dev, addr) in [(src, src_if, SRC_ADDR), (tgt, tgt_if, TGT_ADDR)] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/{PREFIX_LEN}"),
                "dev",
                dev,
            ])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    /// Shapes both directions of the veth to `mib_s` with tc tbf.
    pub fn limit_rate(&self, mib_s: u64) -> Result<()> {
        if mib_s == 0 {
            bail!("the link rate must be at least 1 MiB/s");
        }
        // tc reads "bps" as bytes per second (and "bit" as bits per second).
        let rate = format!("{}bps", mib_s.saturating_mul(1 << 20));
        for (ns, dev) in [(&self.src, &self.src_if), (&self.tgt, &self.tgt_if)] {
            let args = [
                "-n",
                ns,
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                &rate,
                "burst",
                TBF_BURST,
                "latency",
                TBF_LATENCY,
            ];
            run("tc", &args)?;
        }
        Ok(())
    }

    /// The argv prefix that runs a command inside `ns`.
    pub fn exec_prefix(ns: &str) -> Vec<String> {
        ["ip", "netns", "exec", ns]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in self.created.drain(..).rev() {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("ferry-bench: cleanup: {e:#}");
            }
        }
    }
}
