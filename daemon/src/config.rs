//! `ferryd`'s settings: command-line flags, optionally a JSON config file
//! (`--config FILE`), and defaults. A flag given on the command line wins over
//! the file; the file wins over the default.
//!
//! The config file holds any subset of these keys (unknown keys are an error):
//!
//! ```json
//! {
//!   "state_dir": "/var/lib/ferry",
//!   "control_socket": "/var/lib/ferry/ferryd.sock",
//!   "link_socket": "/var/lib/ferry/link.sock",
//!   "listen": "0.0.0.0:7070",
//!   "key_file": "/etc/ferry/key",
//!   "vmm_command": "/usr/bin/ferry-vmm",
//!   "vmm_args": ["--log-level", "info"],
//!   "log_level": "info",
//!   "disk_dir": "/var/lib/ferry/disks",
//!   "transport": "tcp",
//!   "rdma_device": "mlx5_0",
//!   "rdma_port": 1,
//!   "rdma_gid_index": 3,
//!   "placement": "auto"
//! }
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default state directory.
pub const STATE_DIR_DEFAULT: &str = "/var/lib/ferry";
/// Default TCP data listener.
pub const LISTEN_DEFAULT: &str = "0.0.0.0:7070";
/// Cap on the config file: a few hundred bytes of settings.
pub const CONFIG_FILE_BYTES_MAX: u64 = 64 << 10;

/// Cap on `--reserve-mib`: 1 TiB, the engine's cap on guest RAM.
pub const RESERVE_MIB_MAX: u64 = 1 << 20;

/// ferryd's command line.
#[derive(Debug, Default, clap::Parser)]
#[command(
    name = "ferryd",
    version,
    about = "ferry's per-host live-migration service"
)]
pub struct Args {
    /// JSON config file; flags given here override its values.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for sockets and target VMM logs [default: /var/lib/ferry].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Control API socket [default: STATE_DIR/ferryd.sock].
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Socket VMMs register on [default: STATE_DIR/link.sock].
    #[arg(long, value_name = "PATH")]
    pub link_socket: Option<PathBuf>,
    /// TCP data listener for incoming migrations; port 0 picks a free port
    /// [default: 0.0.0.0:7070].
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Pre-shared key file (64 hex digits, see `ferry keygen`). Required.
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// VMM to spawn for incoming migrations [default: ferry-vmm next to ferryd].
    #[arg(long, value_name = "PATH")]
    pub vmm_command: Option<PathBuf>,
    /// Extra argument for the spawned VMM, before ferryd's own; repeatable.
    #[arg(long = "vmm-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub vmm_arg: Vec<String>,
    /// Log filter (tracing syntax: "info", "ferry=debug"); wins over RUST_LOG
    /// [default: RUST_LOG, else info].
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Keep this much zeroed, pre-faulted memory ready for incoming
    /// migrations (MiB; 0 = none) so receiving does not pay first-touch page
    /// faults [default: 0].
    #[arg(long, value_name = "MIB")]
    pub reserve_mib: Option<u64>,
    /// Where incoming VMs' disk images are written (`<vm>.img`)
    /// [default: STATE_DIR/disks].
    #[arg(long, value_name = "DIR")]
    pub disk_dir: Option<PathBuf>,
    /// How this host moves migration bytes: `tcp`, `uring` (TCP driven by
    /// io_uring) or `rdma` (RDMA verbs); for its listener and, unless a
    /// migration asks otherwise, for outgoing migrations [default: tcp].
    #[arg(long, value_name = "NAME")]
    pub transport: Option<crate::transports::TransportKind>,
    /// RDMA device of the rdma transport (`rxe0`, `mlx5_0`) [default: the
    /// device that holds the IP address a connection uses].
    #[arg(long, value_name = "NAME")]
    pub rdma_device: Option<String>,
    /// Port of the RDMA device, from 1 [default: the port that holds the
    /// address].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..))]
    pub rdma_port: Option<u8>,
    /// GID table index of the rdma transport [default: the RoCE v2 GID of
    /// the address].
    #[arg(long, value_name = "N")]
    pub rdma_gid_index: Option<u8>,
    /// Where migration threads run: `auto` (near guest memory, the NIC and
    /// the disk on a multi-node machine; not pinned on one node), `off`,
    /// `cpus:LIST` or `nodes:LIST` [default: auto].
    #[arg(long, value_name = "POLICY")]
    pub placement: Option<String>,
}

/// The JSON config file: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`Args::state_dir`].
    pub state_dir: Option<PathBuf>,
    /// See [`Args::control_socket`].
    pub control_socket: Option<PathBuf>,
    /// See [`Args::link_socket`].
    pub link_socket: Option<PathBuf>,
    /// See [`Args::listen`].
    pub listen: Option<String>,
    /// See [`Args::key_file`].
    pub key_file: Option<PathBuf>,
    /// See [`Args::vmm_command`].
    pub vmm_command: Option<PathBuf>,
    /// See [`Args::vmm_arg`].
    pub vmm_args: Option<Vec<String>>,
    /// See [`Args::log_level`].
    pub log_level: Option<String>,
    /// See [`Args::reserve_mib`].
    pub reserve_mib: Option<u64>,
    /// See [`Args::disk_dir`].
    pub disk_dir: Option<PathBuf>,
    /// See [`Args::transport`].
    pub transport: Option<crate::transports::TransportKind>,
    /// See [`Args::rdma_device`].
    pub rdma_device: Option<String>,
    /// See [`Args::rdma_port`].
    pub rdma_port: Option<u8>,
    /// See [`Args::rdma_gid_index`].
    pub rdma_gid_index: Option<u8>,
    /// See [`Args::placement`].
    pub placement: Option<String>,
}

/// The settings ferryd runs with.
#[derive(Clone, Debug)]
pub struct Config {
    /// Directory for sockets and VMM logs.
    pub state_dir: PathBuf,
    /// Control API socket.
    pub control_socket: PathBuf,
    /// Link socket.
    pub link_socket: PathBuf,
    /// TCP data listener address.
    pub listen: String,
    /// Pre-shared key file.
    pub key_file: PathBuf,
    /// Target-side VMM executable.
    pub vmm_command: PathBuf,
    /// Arguments before ferryd's own (`--restore --link P --token T`).
    pub vmm_args: Vec<String>,
    /// Log filter from a flag or the file; `None`: RUST_LOG, else "info".
    pub log_level: Option<String>,
    /// Pre-faulted memory kept for incoming migrations, MiB (0 = none).
    pub reserve_mib: u64,
    /// Incoming disk images; `None`: STATE_DIR/disks.
    pub disk_dir: Option<PathBuf>,
    /// The transport of the listener and the default for outgoing migrations.
    pub transport: crate::transports::TransportKind,
    /// The rdma transport's device, port and GID index (any transport may
    /// be asked for rdma per migration, so these hold whatever `transport` is).
    pub rdma: crate::transports::RdmaOptions,
    /// Thread placement of every migration (checked against this machine).
    pub placement: ferry_engine::numa::PlacementPolicy,
}

impl Config {
    /// Where incoming disk images go.
    pub fn disk_dir(&self) -> PathBuf {
        self.disk_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("disks"))
    }
}

/// Why the settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid JSON of the expected shape.
    #[error("config file {path} is invalid: {source}")]
    Parse {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A setting is invalid.
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Merges flags, the config file they name (if any), and defaults.
    pub fn resolve(args: Args) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let state_dir = args
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| PathBuf::from(STATE_DIR_DEFAULT));
        let control_socket = args
            .control_socket
            .or(file.control_socket)
            .unwrap_or_else(|| state_dir.join("ferryd.sock"));
        let link_socket = args
            .link_socket
            .or(file.link_socket)
            .unwrap_or_else(|| state_dir.join("link.sock"));
        let listen = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| LISTEN_DEFAULT.into());
        let key_file = args.key_file.or(file.key_file).ok_or_else(|| {
            ConfigError::Invalid(
                "no pre-shared key: pass --key-file PATH (make one with `ferry keygen --out PATH`)"
                    .into(),
            )
        })?;
        let vmm_command = match args.vmm_command.or(file.vmm_command) {
            Some(p) => p,
            None => default_vmm_command()?,
        };
        let vmm_args = if args.vmm_arg.is_empty() {
            file.vmm_args.unwrap_or_default()
        } else {
            args.vmm_arg
        };
        let log_level = args.log_level.or(file.log_level);
        let disk_dir = args.disk_dir.or(file.disk_dir);
        let transport = args.transport.or(file.transport).unwrap_or_default();
        let rdma = crate::transports::RdmaOptions {
            device: args.rdma_device.or(file.rdma_device),
            port: args.rdma_port.or(file.rdma_port),
            gid_index: args.rdma_gid_index.or(file.rdma_gid_index),
        };
        rdma.check().map_err(ConfigError::Invalid)?;
        let placement = match args.placement.or(file.placement) {
            None => ferry_engine::numa::PlacementPolicy::default(),
            Some(p) => ferry_engine::numa::PlacementPolicy::parse_for_host(&p)
                .map_err(|e| ConfigError::Invalid(format!("--placement {p:?}: {e}")))?,
        };
        let reserve_mib = args.reserve_mib.or(file.reserve_mib).unwrap_or(0);
        if reserve_mib > RESERVE_MIB_MAX {
            return Err(ConfigError::Invalid(format!(
                "--reserve-mib {reserve_mib} is over the {RESERVE_MIB_MAX} MiB cap"
            )));
        }
        check_listen(&listen)?;
        if control_socket == link_socket {
            return Err(ConfigError::Invalid(format!(
                "the control socket and the link socket are the same path ({})",
                control_socket.display()
            )));
        }
        Ok(Config {
            state_dir,
            control_socket,
            link_socket,
            listen,
            key_file,
            vmm_command,
            vmm_args,
            log_level,
            reserve_mib,
            disk_dir,
            transport,
            rdma,
            placement,
        })
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let p = path.display().to_string();
    let read_err = |source| ConfigError::Read {
        path: p.clone(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > CONFIG_FILE_BYTES_MAX {
        return Err(ConfigError::Invalid(format!(
            "config file {p} is {len} bytes, over the {CONFIG_FILE_BYTES_MAX}-byte cap"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    serde_json::from_str(&text).map_err(|source| ConfigError::Parse { path: p, source })
}

/// `ferry-vmm` in the directory of the running executable.
fn default_vmm_command() -> Result<PathBuf, ConfigError> {
    let exe = std::env::current_exe().map_err(|e| {
        ConfigError::Invalid(format!(
            "cannot find ferryd's own executable ({e}); pass --vmm-command"
        ))
    })?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    Ok(dir.join("ferry-vmm"))
}

/// Checks `HOST:PORT` (an IPv6 host in brackets) without resolving it.
pub fn check_listen(addr: &str) -> Result<(), ConfigError> {
    split_host_port(addr)
        .map(|_| ())
        .map_err(|e| ConfigError::Invalid(format!("--listen: {e}")))
}

/// Splits `HOST:PORT`; the host may be a name, an IPv4 address or a bracketed
/// IPv6 address. The port may be 0.
pub fn split_host_port(addr: &str) -> Result<(&str, u16), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("{addr:?} is not HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{addr:?} has no valid port (0-65535)"))?;
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(format!("{addr:?} has no valid host"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(format!(
            "{addr:?}: write an IPv6 host in brackets, like [::1]:7070"
        ));
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("ferry-config-{}", crate::util::random_hex(6)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ferryd.json");
        std::fs::write(
            &path,
            r#"{"state_dir": "/s", "listen": "127.0.0.1:9", "key_file": "/k", "vmm_args": ["-a"]}"#,
        )
        .unwrap();
        let args = Args {
            config: Some(path.clone()),
            listen: Some("127.0.0.1:0".into()),
            vmm_command: Some("/bin/true".into()),
            ..Args::default()
        };
        let c = Config::resolve(args).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/s"));
        assert_eq!(c.control_socket, PathBuf::from("/s/ferryd.sock"));
        assert_eq!(c.link_socket, PathBuf::from("/s/link.sock"));
        assert_eq!(c.listen, "127.0.0.1:0");
        assert_eq!(c.key_file, PathBuf::from("/k"));
        assert_eq!(c.vmm_args, vec!["-a".to_string()]);

        std::fs::write(&path, r#"{"key_file": "/k", "lisen": "x"}"#).unwrap();
        let args = Args {
            config: Some(path),
            ..Args::default()
        };
        assert!(matches!(
            Config::resolve(args),
            Err(ConfigError::Parse { .. })
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn rdma_settings_come_from_flags_or_the_file() {
        let dir = std::env::temp_dir().join(format!("ferry-config-{}", crate::util::random_hex(6)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ferryd.json");
        std::fs::write(
            &path,
            r#"{"key_file": "/k", "transport": "rdma", "rdma_device": "mlx5_0",
                "rdma_port": 2, "rdma_gid_index": 3}"#,
        )
        .unwrap();
        let args = |device: Option<&str>| Args {
            config: Some(path.clone()),
            vmm_command: Some("/bin/true".into()),
            rdma_device: device.map(String::from),
            ..Args::default()
        };
        let c = Config::resolve(args(None)).unwrap();
        assert_eq!(c.transport, crate::transports::TransportKind::Rdma);
        let want = crate::transports::RdmaOptions {
            device: Some("mlx5_0".into()),
            port: Some(2),
            gid_index: Some(3),
        };
        assert_eq!(c.rdma, want);
        let c = Config::resolve(args(Some("rxe0"))).unwrap();
        assert_eq!(c.rdma.device.as_deref(), Some("rxe0"));
        assert!(matches!(
            Config::resolve(args(Some("a/b"))),
            Err(ConfigError::Invalid(_))
        ));
        std::fs::write(&path, r#"{"key_file": "/k", "rdma_port": 0}"#).unwrap();
        let e = Config::resolve(args(None)).unwrap_err().to_string();
        assert!(e.contains("count from 1"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn key_file_is_required_and_listen_checked() {
        assert!(Config::resolve(Args::default()).is_err());
        for good in ["0.0.0.0:7070", "localhost:0", "[::1]:7070"] {
            assert!(split_host_port(good).is_ok(), "{good}");
        }
        for bad in ["7070", ":7070", "host:", "host:70000", "::1:7070", "a b:1"] {
            assert!(split_host_port(bad).is_err(), "{bad}");
        }
    }
}
