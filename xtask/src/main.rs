//! `cargo xtask demo`, `cargo xtask ci` and `cargo xtask rdma`: the
//! commands of the README.
//!
//! - demo: system packages, a release build, then one 1 GiB migration with
//!   live progress and the result table.
//! - ci: system packages, fmt, clippy, docs, tests, then end-to-end
//!   migrations under KVM with a release build, then the rdma stage. Every
//!   stage prints its time; the last line sums them up; any failure makes
//!   the exit code non-zero.
//! - rdma: the rdma transport's tests and one rdma migration inside a QEMU
//!   guest with soft-RoCE (`scripts/rxe-vm.sh`), as the last stage of ci.

mod ci;
mod deps;
mod junit;
mod rdma;
mod sh;

use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  demo   install missing system packages, build release binaries, and migrate a
         1 GiB VM running a mixed workload over 4 streams, with live progress
  ci     install missing system packages, then fmt, clippy, docs, tests,
         end-to-end migrations under KVM (skipped with a reason without /dev/kvm),
         and the rdma stage
  rdma   install missing system packages, build, and run the rdma transport's
         tests and one rdma migration inside a QEMU guest with soft-RoCE
         (scripts/rxe-vm.sh; software emulation, so no figure of it is a
         measurement)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["demo"] => demo(),
        ["ci"] => ci::run(),
        ["rdma"] => rdma::run(),
        ["help" | "-h" | "--help"] => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Why KVM cannot be used here, if it cannot.
pub fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("cannot open /dev/kvm: {e}")),
    }
}

fn demo() -> Result<()> {
    println!("==> system packages");
    println!("{}", deps::ensure()?);
    if let Some(why) = kvm_unavailable() {
        bail!("the demo runs a real VM and needs KVM: {why}");
    }
    println!("==> release build");
    sh::run(sh::cargo().args(["build", "--release", "--bins"]))?;
    let bench = ci::target_dir()?.join("release").join("ferry-bench");
    println!("==> migrating a 1 GiB VM (mixed workload) between two ferryds over 4 TCP streams");
    let mut c = Command::new(&bench);
    c.args([
        "migrate",
        "--mem-mib",
        "1024",
        "--workload",
        "mixed",
        "--streams",
        "4",
    ]);
    println!("$ {}", sh::show(&c));
    let st = c
        .status()
        .with_context(|| format!("cannot run {}", bench.display()))?;
    if !st.success() {
        bail!("the demo migration failed ({st})");
    }
    Ok(())
}
