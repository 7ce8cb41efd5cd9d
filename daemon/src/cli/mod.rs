//! `ferry`, the command line of the local ferryd. docs/cli.md is its reference.
//!
//! Every failure is one line `ferry: <message>` on stderr and an exit code:
//!
//! | code | meaning                                                   |
//! |------|-----------------------------------------------------------|
//! | 0    | done (a migration completed)                              |
//! | 1    | a migration failed or was cancelled; other failures       |
//! | 2    | usage or bad input (unknown VM or id, invalid value, 4xx) |
//! | 3    | cannot reach ferryd                                       |
//! | 4    | a migration's COMMIT outcome is unknown                   |

mod follow;
mod keygen;
mod table;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferry_engine::Snapshot;

use crate::api::{Created, MigrateRequest, VmInfo};
use crate::client::{Client, ClientError, SOCKET_DEFAULT};

/// Exit code: a migration failed or was cancelled, or something else failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: usage error or bad input.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: ferryd cannot be reached.
pub const EXIT_UNREACHABLE: u8 = 3;
/// Exit code: COMMIT was sent and its outcome is unknown.
pub const EXIT_UNKNOWN: u8 = 4;

/// ferry's command line.
#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Live-migrate KVM VMs through the local ferryd"
)]
pub struct Cli {
    /// ferryd's control socket.
    #[arg(long, global = true, env = "FERRY_SOCKET", default_value = SOCKET_DEFAULT, value_name = "PATH")]
    pub socket: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// ferry's commands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// VMs of this host.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Migrate a VM to another host and follow it to the end.
    Migrate(Box<MigrateArgs>),
    /// All migrations as a table, or one in full.
    Status {
        /// A migration id; without it, all migrations.
        id: Option<String>,
        /// Print JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a running migration (before COMMIT the VM stays here).
    Cancel {
        /// The migration id.
        id: String,
    },
    /// Make a pre-shared key for a pair of ferryds.
    Keygen {
        /// Write it to FILE (mode 0600) instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Replace FILE if it exists.
        #[arg(long, requires = "out")]
        force: bool,
    },
}

/// `ferry vm ...`.
#[derive(Debug, Subcommand)]
pub enum VmCmd {
    /// List VMs: NAME STATE MEM EPOCH PROGRESS.
    List {
        /// Print JSON instead.
        #[arg(long)]
        json: bool,
    },
}

/// `ferry migrate`.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// The VM to move.
    #[arg(required_unless_present = "resume")]
    pub vm: Option<String>,
    /// The target ferryd's data address.
    #[arg(long, value_name = "HOST:PORT", required_unless_present = "resume")]
    pub to: Option<String>,
    /// Finish migration ID, whose outcome was left unknown (its VM is
    /// paused here): ask its target how it ended, go on with a post-copy
    /// it still waits for, or take the VM back. Uses what was recorded at
    /// its hand-off; no other flag applies but --detach and --json.
    #[arg(long, value_name = "ID", conflicts_with_all = ["vm", "to"])]
    pub resume: Option<String>,
    /// Data streams (1-64) [default: 4].
    #[arg(long, value_name = "N")]
    pub streams: Option<u32>,
    /// Downtime budget in ms (1-60000) [default: 300].
    #[arg(long, value_name = "MS")]
    pub downtime_ms: Option<u64>,
    /// Cap the send rate at B MiB/s [default: no cap].
    #[arg(long, value_name = "B")]
    pub bandwidth_mib_s: Option<u64>,
    /// Give up after N pre-copy rounds (1-1000) [default: 30].
    #[arg(long, value_name = "N")]
    pub rounds_max: Option<u32>,
    /// Give up after S seconds (1-86400) [default: 300].
    #[arg(long, value_name = "S")]
    pub time_max_s: Option<u64>,
    /// Convergence policy: baseline, mp, hot-defer, fragment, auto-converge
    /// or adaptive [default: adaptive].
    #[arg(long, value_name = "NAME")]
    pub policy: Option<String>,
    /// precopy, postcopy (the VM moves right after its device state; memory
    /// follows on demand and in the background) or hybrid (pre-copy rounds,
    /// then post-copy when they do not converge) [default: precopy].
    #[arg(long, value_name = "MODE")]
    pub mode: Option<String>,
    /// Post-copy: keep reconnecting for S seconds after the connection to
    /// the target broke (1-3600) [default: 60].
    #[arg(long, value_name = "S")]
    pub postcopy_grace_s: Option<u64>,
    /// Post-copy: the target sends back a checkpoint (pages its guest wrote,
    /// vCPU state) every MS milliseconds; a lost target's VM is taken back
    /// from the last one. 0 turns checkpoints (and take-back) off
    /// [default: 1000].
    #[arg(long, value_name = "MS")]
    pub checkpoint_ms: Option<u64>,
    /// Downtime mp / adaptive may spend to force convergence of a guest that
    /// dirties memory faster than the link carries it, ms [default: 2000].
    #[arg(long, value_name = "MS")]
    pub downtime_max_ms: Option<u64>,
    /// XOR-delta memory, MiB: copies of last-sent pages, and chunk
    /// fingerprints of every page (1/32 of guest memory) when it is at least
    /// 1/16 of it; 0 turns XOR-delta off [default: 1/8 of guest memory, at
    /// least 16 MiB].
    #[arg(long, value_name = "MIB")]
    pub xor_cache_mib: Option<u64>,
    /// For a VM with a disk: in the bulk phase send only the blocks the
    /// ext4 file system in its image uses (else all allocated extents; an
    /// image without one falls back to extents, with the reason reported).
    #[arg(long)]
    pub disk_fs_aware: bool,
    /// How this host sends the migration: `tcp`, `uring` (TCP driven by
    /// io_uring) or `rdma` (RDMA verbs; the target must listen with rdma)
    /// [default: ferryd's --transport].
    #[arg(long, value_name = "NAME")]
    pub transport: Option<String>,
    /// Where this migration's threads run: `auto`, `off`, `cpus:LIST`,
    /// `nodes:LIST` [default: ferryd's --placement].
    #[arg(long, value_name = "POLICY")]
    pub placement: Option<String>,
    /// Print the migration id and return at once.
    #[arg(long)]
    pub detach: bool,
    /// Print only the final migration snapshot, as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A failure: exit code and one line for stderr.
#[derive(Debug)]
pub struct Fail {
    /// Exit code.
    pub code: u8,
    /// The message (one line).
    pub message: String,
}

impl Fail {
    /// A failure with `code`.
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Fail {
            code,
            message: message.into(),
        }
    }
}

impl From<ClientError> for Fail {
    fn from(e: ClientError) -> Self {
        let code = match &e {
            ClientError::Connect { .. } | ClientError::Io { .. } | ClientError::Protocol(_) => {
                EXIT_UNREACHABLE
            }
            ClientError::Api { status, .. } if (400..500).contains(status) => EXIT_USAGE,
            ClientError::Api { .. } => EXIT_FAILED,
        };
        Fail::new(code, e.to_string())
    }
}

impl From<anyhow::Error> for Fail {
    fn from(e: anyhow::Error) -> Self {
        Fail::new(EXIT_FAILED, format!("{e:#}"))
    }
}

/// Runs ferry with the process's arguments; never panics on bad input.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            {
                let _ = e.print();
                let code = if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    EXIT_USAGE
                } else {
                    0
                };
                return ExitCode::from(code);
            }
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("ferry: {first} (see ferry --help)");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("ferry: {}", f.message.replace('\n', " "));
            ExitCode::from(f.code)
        }
    }
}

/// Runs one command; returns the exit code.
pub fn run(cli: &Cli) -> Result<u8, Fail> {
    let client = Client::new(&cli.socket);
    match &cli.cmd {
        Cmd::Vm(VmCmd::List { json }) => {
            let vms: Vec<VmInfo> = client.get("/api/v1/vms")?;
            if *json {
                print_json(&vms);
            } else {
                print!("{}", table::vms(&vms));
            }
            Ok(0)
        }
        Cmd::Migrate(args) => migrate(&client, args),
        Cmd::Status { id: Some(id), json } => {
            let snap: Snapshot = client.get(&format!("/api/v1/migrations/{}", path_part(id)?))?;
            if *json {
                print_json(&snap);
            } else {
                println!("{snap}");
            }
            Ok(0)
        }
        Cmd::Status { id: None, json } => {
            let all: Vec<Snapshot> = client.get("/api/v1/migrations")?;
            if *json {
                print_json(&all);
            } else {
                print!("{}", table::migrations(&all));
            }
            Ok(0)
        }
        Cmd::Cancel { id } => {
            let path = format!("/api/v1/migrations/{}/cancel", path_part(id)?);
            let c: Created = client.call("POST", &path, None::<&()>)?;
            println!("cancel requested for migration {}", c.id);
            Ok(0)
        }
        Cmd::Keygen { out, force } => keygen::run(out.as_deref(), *force),
    }
}

fn migrate(client: &Client, a: &MigrateArgs) -> Result<u8, Fail> {
    let created: Created = match (&a.resume, &a.vm, &a.to) {
        (Some(id), _, _) => {
            let path = format!("/api/v1/migrations/{}/resume", path_part(id)?);
            client.call("POST", &path, None::<&()>)?
        }
        (None, Some(vm), Some(to)) => start(client, a, vm, to)?,
        _ => {
            return Err(Fail::new(
                EXIT_USAGE,
                "migrate needs a VM and --to, or --resume ID",
            ))
        }
    };
    if a.detach {
        if a.json {
            print_json(&created);
        } else {
            println!("{}", created.id);
        }
        return Ok(0);
    }
    let mode = if a.json {
        follow::Mode::Json
    } else if std::io::stdout().is_terminal() {
        follow::Mode::Bar
    } else {
        follow::Mode::Lines
    };
    follow::follow(client, &created.id, mode)
}

fn start(client: &Client, a: &MigrateArgs, vm: &str, to: &str) -> Result<Created, Fail> {
    let req = MigrateRequest {
        vm: vm.to_string(),
        to: to.to_string(),
        streams: a.streams,
        downtime_ms: a.downtime_ms,
        bandwidth_mib_s: a.bandwidth_mib_s,
        rounds_max: a.rounds_max,
        time_max_s: a.time_max_s,
        policy: a.policy.clone(),
        mode: a.mode.clone(),
        postcopy_grace_s: a.postcopy_grace_s,
        checkpoint_ms: a.checkpoint_ms,
        downtime_max_ms: a.downtime_max_ms,
        xor_cache_mib: a.xor_cache_mib,
        disk_fs_aware: a.disk_fs_aware,
        transport: a.transport.clone(),
        placement: a.placement.clone(),
    };
    Ok(client.call("POST", "/api/v1/migrations", Some(&req))?)
}

/// An id or name as one path segment: refuses what would change the path.
fn path_part(s: &str) -> Result<&str, Fail> {
    let ok = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(s)
    } else {
        Err(Fail::new(
            EXIT_USAGE,
            format!("{s:?} is not a valid migration id"),
        ))
    }
}

fn print_json(v: &impl serde::Serialize) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("ferry: cannot print JSON: {e}"),
    }
}
