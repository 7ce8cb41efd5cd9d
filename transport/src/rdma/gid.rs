//! Which device, port and GID a connection uses, found from the IP address
//! its TCP side channel runs over, the way RDMA CM resolves an address:
//! the RoCE v2 GID that carries that address (IPv4-mapped for IPv4). On
//! InfiniBand, where GIDs are not IP addresses, the port's GID 0 and its LID.
//!
//! Everything is read from sysfs (`/sys/class/infiniband/<dev>/ports/<n>/`:
//! `state`, `link_layer`, `gids/<i>`, `gid_attrs/types/<i>`), so the search
//! is testable against a fake tree.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::RdmaConfig;

/// Where a connection's RDMA traffic goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Device name.
    pub device: String,
    /// Port, from 1.
    pub port: u8,
    /// GID table index.
    pub gid_index: u8,
    /// The GID itself.
    pub gid: [u8; 16],
    /// Whether packets carry a global route header (RoCE: always; IB: no,
    /// routed by LID).
    pub global: bool,
}

/// One usable GID table entry.
#[derive(Clone, Debug)]
struct Entry {
    device: String,
    port: u8,
    index: u8,
    gid: [u8; 16],
    roce_v2: bool,
    infiniband: bool,
}

/// The sysfs root of RDMA devices.
pub const SYSFS: &str = "/sys/class/infiniband";

/// Finds the route for a connection whose side channel's local address is
/// `local`, honouring every field `config` pins.
pub fn resolve(root: &Path, config: &RdmaConfig, local: IpAddr) -> io::Result<Route> {
    let entries = scan(root, config)?;
    if entries.is_empty() {
        let what = match (&config.device, config.port) {
            (Some(d), Some(p)) => format!("port {p} of {d} has"),
            (Some(d), None) => format!("{d} has"),
            _ => "no RDMA device has".to_string(),
        };
        let what = if what.starts_with("no ") {
            format!("{what} an active port with a GID")
        } else {
            format!("{what} no active port with a GID")
        };
        return Err(io::Error::new(io::ErrorKind::NotFound, what));
    }
    let pick = |e: &Entry| Route {
        device: e.device.clone(),
        port: e.port,
        gid_index: e.index,
        gid: e.gid,
        global: !e.infiniband,
    };
    if config.gid_index.is_some() {
        // scan kept only that index.
        return Ok(pick(&entries[0]));
    }
    let want = match local {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    if let Some(e) = entries.iter().find(|e| e.roce_v2 && e.gid == want) {
        return Ok(pick(e));
    }
    if local.is_loopback() {
        // A loopback side channel (both ends on this host): any RoCE v2 GID
        // reaches ourselves; prefer an IPv4-mapped one, as RDMA CM would.
        let v4 = |e: &&Entry| e.roce_v2 && e.gid[..12] == IPV4_MAPPED_PREFIX;
        if let Some(e) = entries
            .iter()
            .find(v4)
            .or(entries.iter().find(|e| e.roce_v2))
        {
            return Ok(pick(e));
        }
    }
    if let Some(e) = entries.iter().find(|e| e.infiniband) {
        return Ok(pick(e));
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "no RDMA device has a RoCE v2 GID for {local} (the address this connection \
             uses); give the device and GID index by hand, or use an address on an RDMA netdev"
        ),
    ))
}

const IPV4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// Every non-zero GID of every active port, filtered by `config`.
fn scan(root: &Path, config: &RdmaConfig) -> io::Result<Vec<Entry>> {
    let mut devices: Vec<String> = match fs::read_dir(root) {
        Ok(dir) => dir
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    devices.sort();
    let mut out = Vec::new();
    for device in devices {
        if config.device.as_ref().is_some_and(|d| *d != device) {
            continue;
        }
        let ports_dir = root.join(&device).join("ports");
        let mut ports: Vec<u8> = match fs::read_dir(&ports_dir) {
            Ok(dir) => dir
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect(),
            Err(_) => continue,
        };
        ports.sort();
        for port in ports {
            if config.port.is_some_and(|p| p != port) {
                continue;
            }
            let dir = ports_dir.join(port.to_string());
            let active = read(&dir.join("state")).is_some_and(|s| s.contains("ACTIVE"));
            if !active {
                continue;
            }
            let infiniband = read(&dir.join("link_layer")).is_some_and(|s| s == "InfiniBand");
            let mut indexes: Vec<u8> = match fs::read_dir(dir.join("gids")) {
                Ok(d) => d
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect(),
                Err(_) => continue,
            };
            indexes.sort();
            for index in indexes {
                if config.gid_index.is_some_and(|g| g != index) {
                    continue;
                }
                let Some(gid) = read(&dir.join("gids").join(index.to_string()))
                    .as_deref()
                    .and_then(parse_gid)
                else {
                    continue;
                };
                if gid == [0; 16] {
                    continue;
                }
                let roce_v2 = read(&dir.join("gid_attrs/types").join(index.to_string()))
                    .is_some_and(|t| t.eq_ignore_ascii_case("RoCE v2"));
                out.push(Entry {
                    device: device.clone(),
                    port,
                    index,
                    gid,
                    roce_v2,
                    infiniband,
                });
            }
        }
    }
    Ok(out)
}

fn read(path: &PathBuf) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// Parses sysfs's `0000:0000:0000:0000:0000:ffff:0a4d:0001`.
pub fn parse_gid(s: &str) -> Option<[u8; 16]> {
    let mut out = [0u8; 16];
    let groups: Vec<&str> = s.trim().split(':').collect();
    if groups.len() != 8 {
        return None;
    }
    for (i, g) in groups.iter().enumerate() {
        if g.len() != 4 {
            return None;
        }
        let v = u16::from_str_radix(g, 16).ok()?;
        out[2 * i..2 * i + 2].copy_from_slice(&v.to_be_bytes());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    struct Fake(PathBuf);

    impl Fake {
        fn new(name: &str) -> Fake {
            let dir = std::env::temp_dir().join(format!(
                "ferry-gid-{name}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Fake(dir)
        }

        fn port(&self, dev: &str, port: u8, state: &str, layer: &str, gids: &[(u8, &str, &str)]) {
            let p = self.0.join(dev).join("ports").join(port.to_string());
            fs::create_dir_all(p.join("gids")).unwrap();
            fs::create_dir_all(p.join("gid_attrs/types")).unwrap();
            fs::write(p.join("state"), format!("{state}\n")).unwrap();
            fs::write(p.join("link_layer"), format!("{layer}\n")).unwrap();
            for (i, gid, ty) in gids {
                fs::write(p.join("gids").join(i.to_string()), format!("{gid}\n")).unwrap();
                fs::write(
                    p.join("gid_attrs/types").join(i.to_string()),
                    format!("{ty}\n"),
                )
                .unwrap();
            }
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const LINK_LOCAL: &str = "fe80:0000:0000:0000:1c14:22ff:fee6:d1e1";
    const V4_1: &str = "0000:0000:0000:0000:0000:ffff:0a4d:0001";
    const V4_2: &str = "0000:0000:0000:0000:0000:ffff:c0a8:0107";
    const ZERO: &str = "0000:0000:0000:0000:0000:0000:0000:0000";

    fn rxe(fake: &Fake) {
        fake.port(
            "rxe0",
            1,
            "4: ACTIVE",
            "Ethernet",
            &[
                (0, LINK_LOCAL, "RoCE v2"),
                (1, V4_1, "RoCE v2"),
                (2, ZERO, ""),
            ],
        );
        fake.port(
            "mlx5_1",
            1,
            "4: ACTIVE",
            "Ethernet",
            &[
                (0, LINK_LOCAL, "IB/RoCE v1"),
                (1, V4_2, "IB/RoCE v1"),
                (2, V4_2, "RoCE v2"),
            ],
        );
        fake.port("mlx5_1", 2, "1: DOWN", "Ethernet", &[(3, V4_1, "RoCE v2")]);
    }

    #[test]
    fn the_address_picks_device_port_and_roce_v2_gid() {
        let fake = Fake::new("addr");
        rxe(&fake);
        let any = RdmaConfig::default();
        let r = resolve(&fake.0, &any, Ipv4Addr::new(10, 77, 0, 1).into()).unwrap();
        assert_eq!(
            (r.device.as_str(), r.port, r.gid_index, r.global),
            ("rxe0", 1, 1, true)
        );
        let r = resolve(&fake.0, &any, Ipv4Addr::new(192, 168, 1, 7).into()).unwrap();
        assert_eq!((r.device.as_str(), r.port, r.gid_index), ("mlx5_1", 1, 2));
        assert_eq!(r.gid, parse_gid(V4_2).unwrap());
    }

    #[test]
    fn loopback_takes_an_ipv4_roce_v2_gid_and_unknown_addresses_fail() {
        let fake = Fake::new("lo");
        rxe(&fake);
        let any = RdmaConfig::default();
        let r = resolve(&fake.0, &any, Ipv4Addr::LOCALHOST.into()).unwrap();
        assert_eq!((r.device.as_str(), r.gid_index), ("mlx5_1", 2));
        let e = resolve(&fake.0, &any, Ipv4Addr::new(10, 0, 0, 9).into()).unwrap_err();
        assert!(e.to_string().contains("10.0.0.9"), "{e}");
    }

    #[test]
    fn config_pins_device_port_and_index() {
        let fake = Fake::new("pin");
        rxe(&fake);
        let cfg = RdmaConfig {
            device: Some("rxe0".into()),
            port: None,
            gid_index: Some(0),
        };
        let r = resolve(&fake.0, &cfg, Ipv4Addr::new(10, 0, 0, 9).into()).unwrap();
        assert_eq!((r.device.as_str(), r.gid_index), ("rxe0", 0));
        // A down port is never used, even when named.
        let cfg = RdmaConfig {
            device: Some("mlx5_1".into()),
            port: Some(2),
            gid_index: None,
        };
        let e = resolve(&fake.0, &cfg, Ipv4Addr::new(10, 77, 0, 1).into()).unwrap_err();
        assert!(e.to_string().contains("port 2 of mlx5_1"), "{e}");
        let cfg = RdmaConfig {
            device: Some("nope".into()),
            ..RdmaConfig::default()
        };
        assert!(resolve(&fake.0, &cfg, Ipv4Addr::LOCALHOST.into()).is_err());
    }

    #[test]
    fn infiniband_uses_its_port_gid_without_a_global_header() {
        let fake = Fake::new("ib");
        fake.port(
            "mlx4_0",
            1,
            "4: ACTIVE",
            "InfiniBand",
            &[(0, "fe80:0000:0000:0000:0002:c903:0010:3f41", "IB/RoCE v1")],
        );
        let r = resolve(
            &fake.0,
            &RdmaConfig::default(),
            Ipv4Addr::new(10, 1, 1, 1).into(),
        )
        .unwrap();
        assert_eq!(
            (r.device.as_str(), r.gid_index, r.global),
            ("mlx4_0", 0, false)
        );
    }

    #[test]
    fn no_devices_is_a_clear_error() {
        let fake = Fake::new("none");
        let e = resolve(&fake.0, &RdmaConfig::default(), Ipv4Addr::LOCALHOST.into()).unwrap_err();
        assert!(e.to_string().contains("no RDMA device"), "{e}");
        assert!(parse_gid("0000:ffff").is_none());
        assert!(parse_gid("zzzz:0000:0000:0000:0000:ffff:0a4d:0001").is_none());
    }
}
