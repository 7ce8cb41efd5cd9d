//! What ferry-bench can tell about the RDMA devices of an rdma run, from
//! sysfs: above all whether they are software emulations (soft-RoCE `rxe`,
//! soft-iWARP `siw`). On those the CPU moves every byte through the kernel's
//! network stack, so a migration's rate says nothing about RDMA hardware;
//! the report says so instead of letting the figure pass for one.
//!
//! ```text
//!  --listen-ip ─▶ interface holding it (getifaddrs)
//!  /sys/class/infiniband/<dev>/ports/<p>/gid_attrs/ndevs/<i> ─▶ interfaces of each device
//!  devices on that interface (else: every device here) ─▶ software? ─▶ RdmaNote
//! ```
//!
//! A device is software when it has no `device` link in sysfs: hardware
//! adapters link to their bus device (PCI), while rxe and siw are virtual
//! devices (`/sys/devices/virtual/infiniband/rxe0`) with a `parent` file
//! naming the interface they run on.

use std::net::IpAddr;
use std::path::Path;

use serde::Serialize;

/// Where the kernel lists RDMA devices.
pub const SYS_CLASS: &str = "/sys/class/infiniband";
/// Cap on devices read: far above any machine (a few adapters with a few
/// virtual functions), so a strange sysfs cannot make the report huge.
const DEVICES_MAX: usize = 256;
/// Cap on ports per device read (adapters have 1 or 2).
const PORTS_MAX: usize = 16;
/// Cap on GID entries per port read: the kernel's RoCE GID tables hold up
/// to 1024 (rxe's does; each entry is one small sysfs read).
const GIDS_MAX: usize = 1024;

/// One RDMA device of this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// Its name (`rxe0`, `mlx5_0`).
    pub name: String,
    /// A software emulation (no bus device behind it).
    pub software: bool,
    /// The network interfaces its GIDs (or, for rxe and siw, its `parent`)
    /// belong to.
    pub netdevs: Vec<String>,
}

/// What an rdma run's report says about its devices.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct RdmaNote {
    /// The devices the run could use: those on the interface holding the
    /// listen address, else (loopback, say) every device of this host.
    pub devices: Vec<String>,
    /// Every one of them is a software emulation (soft-RoCE, soft-iWARP):
    /// throughput, effective rate and link ratio are not meaningful for
    /// RDMA hardware.
    pub software_emulation: bool,
    /// One sentence for the table.
    pub note: String,
}

impl RdmaNote {
    /// The note for a run whose daemons listen on `ip`, from this host's sysfs.
    pub fn probe(ip: IpAddr) -> Self {
        let netdev = interface_of(ip);
        Self::from_devices(&devices(Path::new(SYS_CLASS)), netdev.as_deref())
    }

    /// The note for `all` devices of a host whose listen address is on
    /// `netdev` (`None`: not on any interface found).
    pub fn from_devices(all: &[Device], netdev: Option<&str>) -> Self {
        let on_netdev: Vec<&Device> = all
            .iter()
            .filter(|d| netdev.is_some_and(|n| d.netdevs.iter().any(|x| x == n)))
            .collect();
        let used: Vec<&Device> = if on_netdev.is_empty() {
            all.iter().collect()
        } else {
            on_netdev
        };
        let devices: Vec<String> = used.iter().map(|d| d.name.clone()).collect();
        let software_emulation = !used.is_empty() && used.iter().all(|d| d.software);
        let note = if used.is_empty() {
            format!("no RDMA device found in {SYS_CLASS}")
        } else if software_emulation {
            format!(
                "{} {} software emulation (soft-RoCE or soft-iWARP): the CPU moves every byte, \
                 so throughput here is not meaningful for RDMA hardware (the link figures are \
                 raw TCP)",
                devices.join(", "),
                if devices.len() == 1 { "is" } else { "are" }
            )
        } else {
            format!(
                "{} (link figures are raw TCP over the same address)",
                devices.join(", ")
            )
        };
        RdmaNote {
            devices,
            software_emulation,
            note,
        }
    }
}

/// The interface that holds `ip`, if any.
fn interface_of(ip: IpAddr) -> Option<String> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    for a in addrs {
        let Some(s) = a.address else { continue };
        let holds = match ip {
            IpAddr::V4(v4) => s.as_sockaddr_in().is_some_and(|x| x.ip() == v4),
            IpAddr::V6(v6) => s.as_sockaddr_in6().is_some_and(|x| x.ip() == v6),
        };
        if holds {
            return Some(a.interface_name);
        }
    }
    None
}

/// Every RDMA device under `class` (a sysfs `class/infiniband`), by name;
/// none where there is no such directory.
pub fn devices(class: &Path) -> Vec<Device> {
    let Ok(rd) = std::fs::read_dir(class) else {
        return Vec::new();
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .take(DEVICES_MAX)
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let dir = class.join(&name);
            let software = std::fs::symlink_metadata(dir.join("device")).is_err();
            let mut netdevs = Vec::new();
            if let Some(p) = read_trimmed(&dir.join("parent")) {
                netdevs.push(p);
            }
            for port in 1..=PORTS_MAX {
                let ndevs = dir.join(format!("ports/{port}/gid_attrs/ndevs"));
                if !ndevs.is_dir() {
                    break;
                }
                // Unused entries fail to read; that is how sysfs says "empty".
                for i in 0..GIDS_MAX {
                    if let Some(n) = read_trimmed(&ndevs.join(i.to_string())) {
                        if !netdevs.contains(&n) {
                            netdevs.push(n);
                        }
                    }
                }
            }
            Device {
                name,
                software,
                netdevs,
            }
        })
        .collect()
}

fn read_trimmed(p: &Path) -> Option<String> {
    let s = std::fs::read_to_string(p).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake `class/infiniband`: rxe0 on d0 (virtual, with `parent`) and
    /// mlx5_0 on eth0 (a `device` link, GIDs on eth0).
    fn fake_class(root: &Path) -> std::path::PathBuf {
        let class = root.join("class/infiniband");
        let rxe = class.join("rxe0");
        std::fs::create_dir_all(rxe.join("ports/1/gid_attrs/ndevs")).unwrap();
        std::fs::write(rxe.join("parent"), "d0\n").unwrap();
        std::fs::write(rxe.join("ports/1/gid_attrs/ndevs/0"), "d0\n").unwrap();
        let mlx = class.join("mlx5_0");
        std::fs::create_dir_all(mlx.join("ports/1/gid_attrs/ndevs")).unwrap();
        std::fs::create_dir_all(root.join("pci0000:00/0000:00:02.0")).unwrap();
        std::os::unix::fs::symlink(root.join("pci0000:00/0000:00:02.0"), mlx.join("device"))
            .unwrap();
        for (i, n) in [(0, "eth0"), (1, "eth0"), (3, "eth0.10")] {
            std::fs::write(mlx.join(format!("ports/1/gid_attrs/ndevs/{i}")), n).unwrap();
        }
        class
    }

    #[test]
    fn reads_devices_and_tells_software_from_hardware() {
        let dir = crate::procs::TempDir::new().unwrap();
        let class = fake_class(dir.path());
        let all = devices(&class);
        assert_eq!(
            all,
            [
                Device {
                    name: "mlx5_0".into(),
                    software: false,
                    netdevs: vec!["eth0".into(), "eth0.10".into()],
                },
                Device {
                    name: "rxe0".into(),
                    software: true,
                    netdevs: vec!["d0".into()],
                },
            ]
        );
        assert!(devices(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn notes_pick_the_devices_of_the_listen_interface() {
        let dir = crate::procs::TempDir::new().unwrap();
        let all = devices(&fake_class(dir.path()));
        let rxe = RdmaNote::from_devices(&all, Some("d0"));
        assert_eq!(rxe.devices, ["rxe0"]);
        assert!(rxe.software_emulation);
        assert!(
            rxe.note
                .starts_with("rxe0 is software emulation (soft-RoCE or soft-iWARP)"),
            "{}",
            rxe.note
        );
        assert!(rxe.note.contains("not meaningful"), "{}", rxe.note);
        let mlx = RdmaNote::from_devices(&all, Some("eth0.10"));
        assert_eq!(mlx.devices, ["mlx5_0"]);
        assert!(!mlx.software_emulation);
        // Loopback: no device on it, so every device, and not all software.
        let lo = RdmaNote::from_devices(&all, Some("lo"));
        assert_eq!(lo.devices, ["mlx5_0", "rxe0"]);
        assert!(!lo.software_emulation);
        let only_rxe: Vec<Device> = all.into_iter().filter(|d| d.software).collect();
        assert!(RdmaNote::from_devices(&only_rxe, None).software_emulation);
        let none = RdmaNote::from_devices(&[], None);
        assert!(!none.software_emulation && none.devices.is_empty());
        assert!(
            none.note.starts_with("no RDMA device found"),
            "{}",
            none.note
        );
        let v = serde_json::to_value(&rxe).unwrap();
        assert_eq!(v["software_emulation"], true);
        assert_eq!(v["devices"][0], "rxe0");
    }

    /// Inside `cargo xtask rdma`'s guest (FERRY_RDMA_ADDR set: an RDMA
    /// device holds that address): the probe finds it, and calls a
    /// soft-RoCE or soft-iWARP device software.
    #[test]
    fn finds_the_device_of_ferry_rdma_addr() {
        let Ok(addr) = std::env::var("FERRY_RDMA_ADDR") else {
            eprintln!("skipped: FERRY_RDMA_ADDR is not set, so no RDMA device to probe");
            return;
        };
        let ip: IpAddr = addr
            .parse()
            .or_else(|_| addr.parse::<std::net::SocketAddr>().map(|a| a.ip()))
            .expect("FERRY_RDMA_ADDR is an IP address");
        assert!(interface_of(ip).is_some(), "no interface holds {ip}");
        let note = RdmaNote::probe(ip);
        eprintln!("{ip}: {note:?}");
        assert!(!note.devices.is_empty(), "{note:?}");
        let soft_names = note
            .devices
            .iter()
            .all(|d| d.starts_with("rxe") || d.starts_with("siw"));
        assert_eq!(note.software_emulation, soft_names, "{note:?}");
    }

    #[test]
    fn loopback_is_on_an_interface() {
        // Every Linux machine has lo with 127.0.0.1; the probe must not fail.
        assert_eq!(
            interface_of(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)).as_deref(),
            Some("lo")
        );
        let _ = RdmaNote::probe(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    }
}
