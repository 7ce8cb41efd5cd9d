//! Placing the disk's ring threads near the image's block device.
//!
//! sysfs says which NUMA node a block device hangs off:
//! `/sys/dev/block/<major>:<minor>` links to the device (a partition's parent
//! is the disk), whose `device` directory, or one above it (the controller,
//! the PCI function), has `numa_node`; `/sys/devices/system/node/node<N>/cpulist`
//! lists that node's CPUs. Unknown (-1, a virtual device, no NUMA) means no
//! pinning: the scheduler places the thread. The topology, the device lookup
//! and the rule (a memory-only node hands over to the nearest node with CPUs)
//! are [`crate::numa`]'s, shared with the rest of the pipeline.

use std::fs::File;
use std::path::Path;

use crate::numa::{self, CpuList, Facts, Placement, PlacementPolicy, Side, Stage, Topology};

pub use crate::numa::pin_current_thread;

/// The NUMA node of the device that holds `file`, and the CPUs its ring
/// thread should run on, read from the sysfs tree at `sys` (normally
/// `/sys`): the rule of [`Placement::plan`] for the disk stage, so what the
/// migration's placement reports is what the thread does. `None` when
/// unknown, or when the machine has one node (pinning would only restrict
/// the scheduler).
pub fn device_node_cpus(sys: &Path, file: &File) -> Option<(u32, Vec<usize>)> {
    device_node_cpus_within(sys, file, numa::current_affinity().ok())
}

/// [`device_node_cpus`] keeping to the CPUs `allowed` (`None`: any).
fn device_node_cpus_within(
    sys: &Path,
    file: &File,
    allowed: Option<CpuList>,
) -> Option<(u32, Vec<usize>)> {
    let topo = Topology::read(sys).ok()?;
    if !topo.is_multi_node() {
        return None;
    }
    let facts = Facts {
        disk: Some(numa::probe::block_device(sys, file)),
        allowed,
        ..Facts::default()
    };
    let plan = Placement::plan(&topo, &PlacementPolicy::Auto, Side::Source, &facts).ok()?;
    let s = plan.stage(Stage::DiskRead)?;
    let node = s.node?;
    (!s.cpus.is_empty()).then(|| (node, s.cpus.as_slice().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt};
    use std::path::PathBuf;

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
        assert_eq!(
            device_node_cpus_within(&sys, &file, None),
            Some((1, vec![4, 5, 6, 7]))
        );
        let sys = fake_sys("four", &file, 4, 3, true);
        assert_eq!(
            device_node_cpus_within(&sys, &file, None),
            Some((3, vec![12, 13, 14, 15]))
        );
        let sys = fake_sys("unknown", &file, 2, -1, false);
        assert_eq!(
            device_node_cpus_within(&sys, &file, None),
            None,
            "node -1: not pinned"
        );
        let sys = fake_sys("one", &file, 1, 0, false);
        assert_eq!(
            device_node_cpus_within(&sys, &file, None),
            None,
            "one node: not pinned"
        );
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
