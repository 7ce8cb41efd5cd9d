//! `ferry-bench`: whole-migration benchmarks. See the crate docs of
//! `ferry_bench` for what a run does.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use ferry_bench::compare::{self, CompareArgs};
use ferry_bench::faults::{self, FaultsArgs};
use ferry_bench::migrate::{self, MigrateArgs};
use ferry_bench::policies::{self, PoliciesArgs};
use ferry_bench::ratio::{self, RatioArgs};
use ferry_bench::{blast, procs, ui::Ui};

/// ferry-bench: migrate a real VM between two ferryds on this machine and
/// measure it against the raw link.
#[derive(Debug, Parser)]
#[command(name = "ferry-bench", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Migrate one VM and print the result (a table, or JSON with --json).
    ///
    /// Finds ferryd and ferry-vmm next to this executable, starts a target and
    /// a source ferryd with a fresh key, starts a source VM running the
    /// workload, waits until it is warm, measures the raw TCP link with the
    /// same byte count and stream count, migrates, and verifies: memory hash at
    /// the pause equals the target's, page stamps all good, the guest's
    /// counter moves on the target, and the source VM has stopped. A
    /// migration that fails or is cancelled is checked too: the VM must
    /// still run on the source (listed as running, its counter moving) and
    /// not on the target. Exits non-zero unless the migration completed and
    /// all checks passed.
    Migrate(MigrateArgs),
    /// Compare convergence policies: migrate each (workload, policy) pair
    /// --repeat times under a bandwidth cap, then print a table and write
    /// policies.json and policies.svg into --out.
    ///
    /// Every run starts fresh ferryds and a fresh VM, warms it up, and
    /// migrates it without a link blast. A run that does not complete (the
    /// policy gave up) counts as a failure of the policy, not of the run, if
    /// the VM stayed on the source. Rows show the share of completed runs,
    /// medians over completed runs, and ratios of bytes and time against
    /// `baseline` on the same workload.
    ///
    /// Time: a pass over a guest of N MiB at a cap of B MiB/s takes N/B s,
    /// so the experiment takes roughly workloads x policies x repeat x
    /// (5 s start + warm-up + N/B s x rounds), a run at most about
    /// 5 s + N/256 s + --warmup-s + --time-max-s. ferry-bench prints its
    /// estimate before the first run. Exits non-zero if any run broke or
    /// did not verify.
    Policies(PoliciesArgs),
    /// Compare transports and stream counts: migrate each (transport,
    /// streams) pair --repeat times, then print a table and write
    /// compare.json, compare.svg and compare.png into --out.
    ///
    /// Every run is a `ferry-bench migrate` with fresh ferryds and VM,
    /// warm-up and link blast. Repeat k runs the pairs in order on even k and
    /// backwards on odd k (transports at equal streams back to back), so
    /// drift on a shared machine favours no transport. Rows show runs,
    /// verified runs, and median (min-max) over completed, verified runs of
    /// effective MiB/s, downtime, CPU s per GiB of guest memory moved of the
    /// source and of the target ferryd (user + system time during the
    /// migration only: not the VMMs, the blast, the warm-up or the target's
    /// memory-reserve refill), and link ratio; then each transport's medians
    /// over tcp's at equal streams. A transport ferry-bench or this machine
    /// cannot run is a row `unavailable: <reason>`.
    ///
    /// Exits non-zero if any run broke, did not complete or did not verify.
    Compare(CompareArgs),
    /// Fault-injection campaign: --cases migrations between fresh ferryd
    /// pairs, each with one fault (kill -9 of either ferryd or either VMM,
    /// or the link cut for 1 s or 12 s) at a random moment of a phase
    /// (pre-copy, switchover, post-copy); prints a table per fault and
    /// phase: cases, survived, recovery time.
    ///
    /// A case survives when the VM ends running on exactly one side, the
    /// memory checks of the side that received memory pass (the target's,
    /// or the source's after taking the VM back from a checkpoint), a VM
    /// taken back resumes no earlier than the switch, and both migrations
    /// end within 90 s. Needs root and nftables (the target listens on
    /// 127.0.0.2). A case takes 5-25 s. Exits non-zero if a case broke an
    /// invariant (the VM on both sides, a hang, bad memory), or with
    /// --strict if any case did not survive.
    Faults(FaultsArgs),
    /// Post-copy's total time against one push of all memory: --pairs
    /// pairs of a pre-copy and a post-copy migration of fresh VMs with the
    /// same guest, in turns, then a table and postcopy-ratio.json in --out.
    ///
    /// The push-once time is the pre-copy's first (bulk) round, the same
    /// pipeline sending every page once with the same guest running; a
    /// pair's ratio is its post-copy's total time over that. Pre-copy runs
    /// first in odd pairs and second in even ones, so drift on a shared
    /// machine favours neither mode. No link blasts. Exits non-zero if any
    /// run broke, did not complete or did not verify.
    PostcopyRatio(RatioArgs),
    /// Receive a link blast (used by `migrate`).
    #[command(hide = true)]
    BlastRecv {
        /// Address to listen on (port 0: any free port).
        #[arg(long)]
        listen: SocketAddr,
        /// Connections to accept.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=blast::STREAMS_MAX as i64))]
        streams: u32,
        /// Memory mode: receive into buffers of this many bytes in all,
        /// prepared before listening.
        #[arg(long)]
        bytes: Option<u64>,
    },
    /// Send a link blast and print its result as JSON (used by `migrate`).
    #[command(hide = true)]
    BlastSend {
        /// The receiver.
        #[arg(long)]
        to: SocketAddr,
        /// Total bytes over all streams.
        #[arg(long)]
        bytes: u64,
        /// Streams.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=blast::STREAMS_MAX as i64))]
        streams: u32,
        /// Where the bytes come from.
        #[arg(long, value_enum, default_value = "memory")]
        mode: blast::Mode,
    },
}

/// Exit code when Ctrl-C (SIGINT) ended the run, as shells report it.
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Migrate(args) => migrate_main(&args),
        Cmd::Policies(args) => policies_main(&args),
        Cmd::Compare(args) => compare_main(&args),
        Cmd::PostcopyRatio(args) => experiment_main(
            args.json,
            |ui| ratio::run(&args, ui),
            |e| (e.to_string(), e.all_verified()),
            "some runs broke, did not complete or did not verify; see postcopy-ratio.json",
        ),
        Cmd::Faults(args) => {
            let strict = args.strict;
            experiment_main(
                args.json,
                |ui| faults::run(&args, ui),
                |c| (c.table(), c.ok(strict)),
                "the campaign failed (see the table)",
            )
        }
        Cmd::BlastRecv {
            listen,
            streams,
            bytes,
        } => report(blast::recv_main(listen, streams, bytes)),
        Cmd::BlastSend {
            to,
            bytes,
            streams,
            mode,
        } => report(blast::send_main(to, bytes, streams, mode)),
    }
}

fn report(r: Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn policies_main(args: &PoliciesArgs) -> ExitCode {
    experiment_main(
        args.json,
        |ui| policies::run(args, ui),
        |e| (e.table().to_string(), e.all_verified()),
        "some runs broke or did not verify; see policies.json",
    )
}

fn compare_main(args: &CompareArgs) -> ExitCode {
    experiment_main(
        args.json,
        |ui| compare::run(args, ui),
        |e| (e.table().to_string(), e.all_verified()),
        "some runs broke, did not complete or did not verify; see compare.json",
    )
}

/// Runs an experiment (`policies`, `compare`) and prints it: its JSON with
/// `json`, else its table. `summary` gives the table and whether every run
/// verified; `unverified` is said when not. Exits 130 when interrupted.
fn experiment_main<E: serde::Serialize>(
    json: bool,
    run: impl FnOnce(&mut Ui) -> Result<E>,
    summary: impl Fn(&E) -> (String, bool),
    unverified: &str,
) -> ExitCode {
    let mut ui = Ui::from_env();
    let result = procs::catch_interrupts().and_then(|()| run(&mut ui));
    ui.end_live();
    match result {
        Ok(exp) => {
            let (table, verified) = summary(&exp);
            if json {
                match serde_json::to_string_pretty(&exp) {
                    Ok(j) => println!("{j}"),
                    Err(e) => eprintln!("ferry-bench: cannot print the result: {e}"),
                }
            } else {
                println!("{table}");
            }
            if procs::interrupted() {
                ExitCode::from(EXIT_INTERRUPTED)
            } else if verified {
                ExitCode::SUCCESS
            } else {
                eprintln!("ferry-bench: {unverified}");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("ferry-bench: {e:#}");
            if procs::interrupted() {
                ExitCode::from(EXIT_INTERRUPTED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn migrate_main(args: &MigrateArgs) -> ExitCode {
    let mut ui = Ui::from_env();
    let result = procs::catch_interrupts().and_then(|()| migrate::run(args, &mut ui));
    ui.end_live();
    match result {
        Ok(r) => {
            if args.json {
                match serde_json::to_string_pretty(&r) {
                    Ok(j) => println!("{j}"),
                    Err(e) => eprintln!("ferry-bench: cannot print the result: {e}"),
                }
            } else {
                println!("{r}");
            }
            if r.verified && r.completed {
                ExitCode::SUCCESS
            } else if r.verified {
                eprintln!(
                    "ferry-bench: the migration did not complete ({}); the VM stayed on the source",
                    r.status
                );
                ExitCode::FAILURE
            } else if procs::interrupted() {
                ExitCode::from(EXIT_INTERRUPTED)
            } else {
                eprintln!(
                    "ferry-bench: {}",
                    if r.completed {
                        "the migration completed but did not verify".to_string()
                    } else {
                        format!(
                            "the migration did not complete ({}) and the VM did not verify on the source",
                            r.status
                        )
                    }
                );
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            let msg = format!("{e:#}");
            if args.json {
                let j = serde_json::json!({ "status": "error", "error": msg, "verified": false });
                println!("{j}");
            }
            eprintln!("ferry-bench: {msg}");
            if procs::interrupted() {
                ExitCode::from(EXIT_INTERRUPTED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
