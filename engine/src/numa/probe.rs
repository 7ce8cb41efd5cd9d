//! Where things live: the NUMA node of a NIC, of a block device, and of the
//! guest memory's pages.
//!
//! Devices: sysfs puts `numa_node` on the bus device (the PCI function); a
//! NIC's `device` link, or a block device's, often points at a child of it
//! (virtio), so the ancestors are searched too. -1 means the platform does not
//! know. Virtual devices (loopback, bridges, veth, tmpfs) have no `device` at
//! all: unknown.
//!
//! Memory: `move_pages(2)` with no target nodes only reports the node of each
//! page it is given and never faults one in (a query through `get_mempolicy`
//! would allocate holes of the memfd), so a sample of the mapping tells where
//! the guest's pages are without changing anything.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::memory::{GuestMem, PageIndex};

/// Pages of guest memory whose node is asked: one `move_pages` call with
/// 1024 x 8-byte addresses and 1024 x 4-byte answers (12 KiB), spread evenly
/// over guest memory, so a 1 TiB guest is sampled every 1 GiB.
pub const MEMORY_SAMPLE_PAGES: u64 = 1024;

/// Ancestors of a device directory searched for `numa_node`: the device, its
/// parent (virtio's PCI function, a partition's disk's controller) and a few
/// more; sysfs device trees are shallow there.
const DEVICE_ANCESTORS_MAX: usize = 4;

/// A device and its NUMA node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Device {
    /// Its name ("eth0", "nvme0n1"), for people.
    pub name: String,
    /// Its node; `None` when sysfs does not tell (-1, a virtual device).
    pub node: Option<u32>,
}

/// The NIC the kernel would use to reach `peer` ("192.0.2.1:7777"), and its
/// node. `None` when `peer` is not an IP address and port (an in-process
/// transport) or no interface holds the local address.
pub fn nic_towards(sys: &Path, peer: &str) -> Option<Device> {
    let peer: SocketAddr = peer.parse().ok()?;
    let local = local_ip_towards(peer).ok()?;
    let name = interface_of(local)?;
    Some(Device {
        node: net_device_node(sys, &name),
        name,
    })
}

/// The local address a connection to `peer` leaves from: a connected UDP
/// socket asks the routing table without sending anything.
pub fn local_ip_towards(peer: SocketAddr) -> io::Result<IpAddr> {
    let any: SocketAddr = match peer {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(any)?;
    s.connect(peer)?;
    Ok(s.local_addr()?.ip())
}

/// The interface holding the local address `ip` (a loopback address the
/// interfaces do not list exactly, such as 127.0.0.2, is on the loopback
/// interface).
pub fn interface_of(ip: IpAddr) -> Option<String> {
    use nix::net::if_::InterfaceFlags;
    let addrs: Vec<_> = nix::ifaddrs::getifaddrs().ok()?.collect();
    let exact = addrs.iter().find(|a| {
        let Some(addr) = a.address.as_ref() else {
            return false;
        };
        match ip {
            IpAddr::V4(v4) => addr.as_sockaddr_in().is_some_and(|s| s.ip() == v4),
            IpAddr::V6(v6) => addr.as_sockaddr_in6().is_some_and(|s| s.ip() == v6),
        }
    });
    exact
        .or_else(|| {
            ip.is_loopback()
                .then(|| {
                    addrs
                        .iter()
                        .find(|a| a.flags.contains(InterfaceFlags::IFF_LOOPBACK))
                })
                .flatten()
        })
        .map(|a| a.interface_name.clone())
}

/// The node of network interface `ifname` (`None`: a virtual interface, or
/// the platform does not know).
pub fn net_device_node(sys: &Path, ifname: &str) -> Option<u32> {
    // The name comes from the kernel, but keep it from walking the tree.
    if ifname.is_empty() || ifname.contains('/') || ifname == "." || ifname == ".." {
        return None;
    }
    node_of(&sys.join("class/net").join(ifname).join("device"))
}

/// The block device holding `file` (a partition answers for its disk), and
/// its node. Unknown parts stay unknown: the name falls back to
/// "major:minor", the node to `None`.
pub fn block_device(sys: &Path, file: &File) -> Device {
    let Ok(meta) = file.metadata() else {
        return Device {
            name: "unknown".into(),
            node: None,
        };
    };
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let fallback = Device {
        name: format!("{major}:{minor}"),
        node: None,
    };
    let Ok(mut dir) = std::fs::canonicalize(sys.join(format!("dev/block/{major}:{minor}"))) else {
        return fallback;
    };
    if dir.join("partition").exists() {
        match dir.parent() {
            Some(p) => dir = p.to_path_buf(),
            None => return fallback,
        }
    }
    Device {
        name: dir
            .file_name()
            .map_or(fallback.name, |n| n.to_string_lossy().into_owned()),
        node: node_of(&dir.join("device")),
    }
}

/// `numa_node` of `dir` or of one of its first ancestors.
pub fn node_of(dir: &Path) -> Option<u32> {
    let mut d = std::fs::canonicalize(dir).ok()?;
    for _ in 0..DEVICE_ANCESTORS_MAX {
        if let Ok(s) = std::fs::read_to_string(d.join("numa_node")) {
            // -1: the platform does not know.
            return s
                .trim()
                .parse::<i64>()
                .ok()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|&n| n <= super::NODE_ID_MAX);
        }
        d = d.parent()?.to_path_buf();
    }
    None
}

/// The node holding a strict majority of the guest memory's present pages
/// (sampled, [`MEMORY_SAMPLE_PAGES`]). `None` when no sampled page is
/// present, when they are spread (interleaved) with no majority, or when the
/// kernel refuses the query.
pub fn memory_node(mem: &GuestMem) -> Option<u32> {
    let pages = mem.pages();
    if pages == 0 {
        return None;
    }
    let n = pages.min(MEMORY_SAMPLE_PAGES);
    let addrs: Vec<usize> = (0..n)
        .filter_map(|i| mem.page(PageIndex(i * pages / n)))
        .map(|s| s.ptr_guard().as_ptr() as usize)
        .collect();
    let status = match page_nodes(&addrs) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!("move_pages: {e}; guest memory's node unknown");
            return None;
        }
    };
    majority(status.into_iter().filter_map(|s| u32::try_from(s).ok()))
}

/// The value more than half of `nodes` hold.
pub fn majority(nodes: impl IntoIterator<Item = u32>) -> Option<u32> {
    let mut counts = std::collections::BTreeMap::<u32, u64>::new();
    let mut total = 0u64;
    for n in nodes {
        *counts.entry(n).or_default() += 1;
        total += 1;
    }
    counts
        .into_iter()
        .find(|&(_, c)| 2 * c > total)
        .map(|(n, _)| n)
}

/// Per address (of this process), the node of its page, or a negative errno
/// (-ENOENT: not present, -EFAULT: not mapped).
pub fn page_nodes(addrs: &[usize]) -> io::Result<Vec<i32>> {
    let mut status = vec![i32::MIN; addrs.len()];
    // SAFETY: move_pages with a null node list only queries. The kernel reads
    // `addrs.len()` pointer-sized addresses from `addrs` and writes as many
    // ints to `status`; both slices are live and exactly that long. The
    // addresses themselves are never dereferenced by us, and the kernel
    // reports a bad one as -EFAULT in its status slot. pid 0 = this process.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0 as libc::c_int,
            addrs.len() as libc::c_ulong,
            addrs.as_ptr(),
            std::ptr::null::<libc::c_int>(),
            status.as_mut_ptr(),
            0 as libc::c_int,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(status)
}
