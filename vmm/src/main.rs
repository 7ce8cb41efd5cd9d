//! `ferry-vmm`: run a stamped guest workload under KVM, standalone or
//! attached to ferryd over the link protocol.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

use ferry_vmm::config::{
    DiskConfig, GuestWorkload, VmmConfig, BATCH_PAGES_DEFAULT, BATCH_PAGES_MAX,
};
use ferry_vmm::disk::Disk;
use ferry_vmm::guest::phase_name;
use ferry_vmm::layout::Layout;
use ferry_vmm::link_server::{LinkServer, Outcome};
use ferry_vmm::machine::{Lifecycle, Machine};
use ferry_vmm::report::Report;

/// A minimal KVM VMM running ferry's stamped guest workloads: the reference
/// integration of ferry's link protocol and the test oracle of migrations.
#[derive(Debug, Parser)]
#[command(name = "ferry-vmm", version)]
struct Args {
    /// Guest RAM in MiB (a multiple of 2, 4..=8192).
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    /// <memory>[+disk:<MiB/s>] or disk:<MiB/s>, where <memory> is idle |
    /// fill | mixed | dirty:<MiB/s>[:hot=<pct>][:fill]. dirty: after the
    /// mixed pass (the fill pass with :fill, whose pages are all
    /// incompressible), rewrite <MiB/s> / 4 KiB random pages per second (each
    /// rewrite changes a page's header and one 256-byte slot); <pct>% of
    /// them go to a hot set of 10% of the pages, spread evenly over memory.
    /// disk: write <MiB/s> / 4 KiB stamped blocks per second to random
    /// blocks of the --disk image's write window (needs --disk).
    #[arg(long, default_value = "idle")]
    workload: GuestWorkload,
    /// Dirty workload: pages written per guest exit (pacing granularity).
    #[arg(long, default_value_t = BATCH_PAGES_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..=BATCH_PAGES_MAX))]
    batch_pages: u64,
    /// The VM's disk: an existing raw image file (sparse is fine) whose size
    /// is a non-zero multiple of 4 KiB. It migrates with the VM.
    #[arg(long, value_name = "PATH")]
    disk: Option<PathBuf>,
    /// The guest's stamped disk writes go only to blocks at or after this
    /// many MiB into the image, so its front (a file system) stays intact.
    #[arg(long, value_name = "MIB", default_value_t = 0, requires = "disk")]
    disk_write_from_mib: u64,
    /// VM name given to ferryd.
    #[arg(long, default_value = "vm0")]
    name: String,
    /// ferryd's link socket: register the VM and serve ferryd's requests.
    #[arg(long, value_name = "PATH")]
    link: Option<PathBuf>,
    /// Target mode: receive a migrating VM from ferryd (needs --link, --token).
    #[arg(long, requires_all = ["link", "token"])]
    restore: bool,
    /// The token ferryd gave this target VMM.
    #[arg(long, requires = "restore")]
    token: Option<String>,
    /// Append JSON event lines (registered, paused + memory hash, ...) here.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Tell the target VMM not to hash and check memory at restore.
    #[arg(long)]
    no_verify: bool,
    /// When ferryd goes away (it died, or restarts), keep trying this many
    /// seconds to register the VM again with the ferryd that comes back on
    /// the same link socket, which finishes a migration its predecessor
    /// had handed off. 0: never; the VM stays as it was.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    reattach_s: u64,
    /// Standalone: run this many seconds, then pause, check memory with the
    /// oracle, and exit (non-zero if a page is bad). 0: run until killed.
    #[arg(long, default_value_t = 0)]
    seconds: u64,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("ferry-vmm: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// The error chain on one line, skipping causes their parent already quotes.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

fn run(args: Args) -> Result<()> {
    let report = args.report.as_deref().map(Report::new);
    if args.restore {
        let (Some(link), Some(token)) = (&args.link, &args.token) else {
            bail!("--restore needs --link and --token");
        };
        let server = LinkServer::register_target(link, token, report).with_context(|| {
            format!(
                "cannot register as a target with ferryd at {}",
                link.display()
            )
        })?;
        return serve(server, link, args.reattach_s);
    }
    let mem_bytes = args
        .mem_mib
        .checked_mul(1 << 20)
        .context("--mem-mib is too large")?;
    Layout::new(mem_bytes).context("bad --mem-mib")?;
    let disk = match &args.disk {
        Some(path) => Some(Disk::open(path)?),
        None => None,
    };
    let disk_config = match &disk {
        Some(d) => Some(
            DiskConfig::new(d.bytes(), args.disk_write_from_mib)
                .context("bad --disk-write-from-mib")?,
        ),
        None => None,
    };
    let config = VmmConfig::with_disk(
        args.workload,
        mem_bytes,
        args.batch_pages,
        !args.no_verify,
        disk_config,
    )?;
    let mut machine = Machine::boot(config, disk).context("cannot create the VM")?;
    machine.run()?;
    tracing::info!(
        "guest running: {} MiB, workload {}{}",
        args.mem_mib,
        args.workload,
        match &args.disk {
            Some(p) => format!(", disk {}", p.display()),
            None => String::new(),
        }
    );
    match &args.link {
        Some(link) => {
            let server = LinkServer::register_source(link, machine, &args.name, report)
                .with_context(|| format!("cannot register with ferryd at {}", link.display()))?;
            serve(server, link, args.reattach_s)
        }
        None => standalone(machine, args.seconds),
    }
}

/// Serves ferryd on a thread of its own; the vCPU runs on another. When
/// the link closes with the guest running or paused, registers it again
/// with a ferryd that comes back within `reattach_s`.
fn serve(mut server: LinkServer, link: &Path, reattach_s: u64) -> Result<()> {
    loop {
        let outcome = std::thread::Builder::new()
            .name("link".into())
            .spawn(move || server.serve().map(|o| (o, server)))
            .context("cannot start the link thread")?
            .join()
            .map_err(|_| anyhow::anyhow!("the link thread panicked"))?;
        let (outcome, s) = outcome?;
        server = s;
        match outcome {
            Outcome::Quit(_) => return Ok(()),
            Outcome::LinkClosed(Lifecycle::Running | Lifecycle::Paused) => {
                if reattach_s > 0 {
                    match server.reattach(link, Duration::from_secs(reattach_s)) {
                        Ok(()) => continue,
                        Err(e) => tracing::warn!("cannot register with ferryd again: {e}"),
                    }
                }
                // See link_server's docs: keep the guest as it is; the operator decides.
                loop {
                    std::thread::sleep(Duration::from_secs(10));
                    if let Some(why) = server.machine().failure() {
                        bail!("the guest failed: {why}");
                    }
                }
            }
            Outcome::LinkClosed(state) => {
                bail!("ferryd closed the link before the VM ran here ({state:?})")
            }
        }
    }
}

fn standalone(mut machine: Machine, seconds: u64) -> Result<()> {
    let t0 = Instant::now();
    let mut last = machine.counters()?;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        if let Some(why) = machine.failure() {
            bail!("the guest failed: {why}");
        }
        let c = machine.counters()?;
        let mib_s = |now: u64, then: u64| (now - then) as f64 * 4096.0 / (1 << 20) as f64;
        print!(
            "t={:>4}s progress={} phase={} pages_written={} write_rate={:.1}MiB/s",
            t0.elapsed().as_secs(),
            c.progress,
            phase_name(c.phase),
            c.pages_written,
            mib_s(c.pages_written, last.pages_written)
        );
        if machine.disk().is_some() {
            print!(
                " blocks_written={} blocks_read={} disk_rate={:.1}MiB/s",
                c.blocks_written,
                c.blocks_read,
                mib_s(c.blocks_written, last.blocks_written)
            );
        }
        println!();
        last = c;
        if seconds > 0 && t0.elapsed() >= Duration::from_secs(seconds) {
            break;
        }
    }
    let p = machine.pause()?;
    let check = machine.check();
    println!(
        "paused in {:?} at progress {}; oracle: {} pages checked, {} stamped, {} bad; mem_hash {}",
        p.latency,
        p.progress,
        check.pages_checked,
        check.pages_stamped,
        check.pages_bad,
        machine.mem_hash()
    );
    for f in &check.first_faults {
        eprintln!("  {f}");
    }
    let mut blocks_bad = 0;
    if let (Some(disk), Some(hash)) = (machine.check_disk(), machine.disk_hash()) {
        println!(
            "disk oracle: {} blocks checked, {} bad; disk_hash {}",
            disk.blocks_checked, disk.blocks_bad, hash?
        );
        for f in &disk.first_faults {
            eprintln!("  {f}");
        }
        blocks_bad = disk.blocks_bad;
    }
    if check.pages_bad > 0 || blocks_bad > 0 {
        bail!(
            "{} bad pages, {blocks_bad} bad disk blocks",
            check.pages_bad
        );
    }
    Ok(())
}
