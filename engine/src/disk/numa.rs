//! Placing the disk's ring threads near the image's block device.
//!
//! sysfs says which NUMA node a block device hangs off:
//! `/sys/dev/block/<major>:<minor>` links to the device (a partition's parent
//! is the disk), whose `device` directory, or one above it (the controller,
//! the PCI function), has `numa_node`; `/sys/devices/system/node/node<N>/cpulist`
//! lists that node's CPUs. Unknown (-1, a virtual device, no NUMA) means no
//! pinning: the scheduler places the thread.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The NUMA node of the device that holds `file`, and that node's CPUs, read
/// from the sysfs tree at `sys` (normally `/sys`). `None` when unknown, or
/// when the machine has one node (pinning would only restrict the scheduler).
pub fn device_node_cpus(sys: &Path, file: &File) -> Option<(u32, Vec<usize>)> {
    let dev = file.metadata().ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let mut dir = std::fs::canonicalize(sys.join(format!("dev/block/{major}:{minor}"))).ok()?;
    if dir.join("partition").exists() {
        dir = dir.parent()?.to_path_buf();
    }
    let node = node_of(&dir.join("device"))?;
    let nodes = std::fs::read_dir(sys.join("devices/system/node"))
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.strip_prefix("node")
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .count();
    if nodes < 2 {
        return None;
    }
    let list = std::fs::read_to_string(sys.join(format!("devices/system/node/node{node}/cpulist")))
        .ok()?;
    let cpus = parse_cpulist(list.trim())?;
    (!cpus.is_empty()).then_some((node, cpus))
}

/// `numa_node` of `dir` or of one of its first few ancestors (a block
/// device's own directory often lacks it; its controller has it).
fn node_of(dir: &Path) -> Option<u32> {
    let mut d = std::fs::canonicalize(dir).ok()?;
    for _ in 0..4 {
        if let Ok(s) = std::fs::read_to_string(d.join("numa_node")) {
            // -1: the platform does not know.
            return s
                .trim()
                .parse::<i64>()
                .ok()
                .and_then(|n| u32::try_from(n).ok());
        }
        d = d.parent()?.to_path_buf();
    }
    None
}

/// Parses a kernel CPU list ("0-3,8,10-11"). `None` on anything else.
pub fn parse_cpulist(s: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    if s.is_empty() {
        return Some(cpus);
    }
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                if b < a || b - a > 4096 {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

/// Restricts the calling thread to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> nix::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    for &c in cpus {
        set.set(c)?;
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::path::PathBuf;

    #[test]
    fn cpulists_parse() {
        assert_eq!(
            parse_cpulist("0-3,8,10-11"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpulist("5"), Some(vec![5]));
        assert_eq!(parse_cpulist(""), Some(vec![]));
        assert_eq!(parse_cpulist("3-1"), None);
        assert_eq!(parse_cpulist("a"), None);
        assert_eq!(parse_cpulist("0-99999"), None);
    }

    /// A fake sysfs with `nodes` nodes (node n has CPUs 4n..4n+3) and the
    /// block device of `file` on a controller in `node` (-1: unknown),
    /// optionally as a partition.
    fn fake_sys(tag: &str, file: &File, nodes: u32, node: i32, partition: bool) -> PathBuf {
        let root = std::env::temp_dir().join(format!("ferry-numa-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for n in 0..nodes {
            let d = root.join(format!("devices/system/node/node{n}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("cpulist"), format!("{}-{}\n", 4 * n, 4 * n + 3)).unwrap();
        }
        let ctrl = root.join("devices/pci0000:00/0000:00:04.0");
        let disk = ctrl.join("virtio1/block/vdb");
        std::fs::create_dir_all(disk.join("vdb1")).unwrap();
        std::fs::write(disk.join("vdb1/partition"), "1\n").unwrap();
        symlink("../../..", disk.join("device")).unwrap();
        std::fs::write(ctrl.join("numa_node"), format!("{node}\n")).unwrap();
        let dev = file.metadata().unwrap().dev();
        let link = root.join(format!(
            "dev/block/{}:{}",
            libc::major(dev),
            libc::minor(dev)
        ));
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let target = if partition { disk.join("vdb1") } else { disk };
        symlink(target, link).unwrap();
        root
    }

    #[test]
    fn the_device_node_is_found_through_sysfs() {
        let file = File::open(std::env::temp_dir()).unwrap();
        let sys = fake_sys("two", &file, 2, 1, false);
        assert_eq!(device_node_cpus(&sys, &file), Some((1, vec![4, 5, 6, 7])));
        let sys = fake_sys("four", &file, 4, 3, true);
        assert_eq!(
            device_node_cpus(&sys, &file),
            Some((3, vec![12, 13, 14, 15]))
        );
        let sys = fake_sys("unknown", &file, 2, -1, false);
        assert_eq!(device_node_cpus(&sys, &file), None, "node -1: not pinned");
        let sys = fake_sys("one", &file, 1, 0, false);
        assert_eq!(device_node_cpus(&sys, &file), None, "one node: not pinned");
        for t in ["two", "four", "unknown", "one"] {
            let _ = std::fs::remove_dir_all(
                std::env::temp_dir().join(format!("ferry-numa-{t}-{}", std::process::id())),
            );
        }
    }

    #[test]
    fn this_machine_is_answered_without_error() {
        // One node here, or no NUMA information: no pinning either way.
        let file = File::open(std::env::temp_dir()).unwrap();
        let got = device_node_cpus(Path::new("/sys"), &file);
        eprintln!("this machine: {got:?}");
        if let Some((_, cpus)) = got {
            pin_current_thread(&cpus).unwrap();
        }
    }

    #[test]
    fn pinning_to_the_current_cpus_works() {
        let all: Vec<usize> =
            (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
        std::thread::spawn(move || pin_current_thread(&all).unwrap())
            .join()
            .unwrap();
    }
}
