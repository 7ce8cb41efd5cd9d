//! Placement tests: fake sysfs trees (2 and 4 nodes), the policies, and this
//! machine.

use std::fs::File;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::*;
use crate::link::{RegionSpec, VmSpec};
use crate::GuestMem;

/// A fake sysfs tree in a temp dir, removed on drop.
struct FakeSys {
    root: PathBuf,
}

impl FakeSys {
    /// Nodes given as (cpulist, distance row); `has_memory` lists the nodes
    /// with memory.
    fn new(tag: &str, nodes: &[(&str, &str)], has_memory: &str) -> Self {
        let root = std::env::temp_dir().join(format!("ferry-numa-t-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join("devices/system/node");
        for (i, (cpus, dist)) in nodes.iter().enumerate() {
            let d = dir.join(format!("node{i}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("cpulist"), format!("{cpus}\n")).unwrap();
            std::fs::write(d.join("distance"), format!("{dist}\n")).unwrap();
        }
        std::fs::write(dir.join("has_memory"), format!("{has_memory}\n")).unwrap();
        std::fs::write(dir.join("online"), format!("0-{}\n", nodes.len() - 1)).unwrap();
        // Something that is not a node must be ignored.
        std::fs::create_dir_all(dir.join("power")).unwrap();
        FakeSys { root }
    }

    /// A PCI function on `node` (-1: unknown) with a virtio child.
    fn pci(&self, slot: &str, node: i32) -> PathBuf {
        let f = self
            .root
            .join(format!("devices/pci0000:00/0000:00:{slot}.0"));
        std::fs::create_dir_all(f.join("virtio0")).unwrap();
        std::fs::write(f.join("numa_node"), format!("{node}\n")).unwrap();
        f.join("virtio0")
    }

    /// NIC `name` behind a virtio device on a PCI function on `node`, as on
    /// real machines: class/net/<name>/device -> .../virtio0.
    fn nic(&self, name: &str, node: i32) {
        let dev = self.pci("03", node);
        let net = self.root.join("class/net").join(name);
        std::fs::create_dir_all(&net).unwrap();
        symlink(dev, net.join("device")).unwrap();
    }

    /// A virtual NIC (no `device`), like lo.
    fn virtual_nic(&self, name: &str) {
        std::fs::create_dir_all(self.root.join("class/net").join(name)).unwrap();
    }

    /// The block device of `file` as vdb on a PCI function on `node`.
    fn disk(&self, file: &File, node: i32) {
        let dev = self.pci("04", node);
        let block = dev.join("block/vdb");
        std::fs::create_dir_all(&block).unwrap();
        symlink("../..", block.join("device")).unwrap();
        let d = file.metadata().unwrap().dev();
        let link = self
            .root
            .join(format!("dev/block/{}:{}", libc::major(d), libc::minor(d)));
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        symlink(block, link).unwrap();
    }

    fn topo(&self) -> Topology {
        Topology::read(&self.root).unwrap()
    }
}

impl Drop for FakeSys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Two nodes of four CPUs each.
fn two_nodes(tag: &str) -> FakeSys {
    FakeSys::new(tag, &[("0-3", "10 21"), ("4-7", "21 10")], "0-1")
}

/// Four nodes: 0-2 with four CPUs each, 3 memory only (a CXL expander),
/// nearest to node 2.
fn four_nodes(tag: &str) -> FakeSys {
    FakeSys::new(
        tag,
        &[
            ("0-3", "10 16 16 32"),
            ("4-7", "16 10 16 28"),
            ("8-11", "16 16 10 14"),
            ("", "32 28 14 10"),
        ],
        "0-3",
    )
}

fn cpus(s: &str) -> CpuList {
    s.parse().unwrap()
}

fn dev(name: &str, node: Option<u32>) -> Option<Device> {
    Some(Device {
        name: name.into(),
        node,
    })
}

/// (stage, node, cpus, reason) of every stage.
fn rows(p: &Placement) -> Vec<(Stage, Option<u32>, String, String)> {
    p.stages
        .iter()
        .map(|s| (s.stage, s.node, s.cpus.to_string(), s.reason.clone()))
        .collect()
}

fn row(
    stage: Stage,
    node: Option<u32>,
    cpus: &str,
    reason: &str,
) -> (Stage, Option<u32>, String, String) {
    (stage, node, cpus.into(), reason.into())
}

#[test]
fn cpu_lists_parse_print_and_reject() {
    assert_eq!(cpus("0-3,8,10-11").as_slice(), &[0, 1, 2, 3, 8, 10, 11]);
    assert_eq!(
        cpus(" 8,0-3,2 \n").to_string(),
        "0-3,8",
        "sorted, deduplicated"
    );
    assert_eq!(cpus("5").to_string(), "5");
    assert!(cpus("").is_empty());
    for bad in ["3-1", "a", "1,,2", "-1", "0-99999", "8192"] {
        let e = bad.parse::<CpuList>().unwrap_err();
        assert!(matches!(e, NumaError::List { .. }), "{bad}: {e}");
    }
    assert_eq!(cpus("0-8191").len(), 8192, "the largest list is bounded");
    let json = serde_json::to_string(&cpus("0-3,8")).unwrap();
    assert_eq!(json, "\"0-3,8\"");
    assert_eq!(
        serde_json::from_str::<CpuList>(&json).unwrap(),
        cpus("0-3,8")
    );
    assert!(serde_json::from_str::<CpuList>("\"x\"").is_err());
}

#[test]
fn policies_parse_print_and_round_trip() {
    use PlacementPolicy::*;
    let cases: [(&str, PlacementPolicy, &str); 6] = [
        ("auto", Auto, "auto"),
        ("off", Off, "off"),
        ("cpus:0-3,8", Cpus(vec![0, 1, 2, 3, 8]), "cpus:0-3,8"),
        (" cpus:3,1 ", Cpus(vec![1, 3]), "cpus:1,3"),
        ("nodes:1", Nodes(vec![1]), "nodes:1"),
        ("nodes:0-2", Nodes(vec![0, 1, 2]), "nodes:0-2"),
    ];
    for (text, want, printed) in cases {
        let got: PlacementPolicy = text.parse().unwrap();
        assert_eq!(got, want, "{text}");
        assert_eq!(got.to_string(), printed);
        assert_eq!(printed.parse::<PlacementPolicy>().unwrap(), want);
        let json = serde_json::to_string(&got).unwrap();
        assert_eq!(
            serde_json::from_str::<PlacementPolicy>(&json).unwrap(),
            want
        );
    }
    assert_eq!(PlacementPolicy::default(), Auto);
}

#[test]
fn bad_policies_are_rejected_with_the_accepted_forms() {
    for bad in [
        "",
        "pin",
        "Auto",
        "cpu:1",
        "cpus:",
        "cpus:a",
        "cpus:3-1",
        "nodes:",
        "nodes:x",
        "nodes:1024",
        "cpus:0-9000",
    ] {
        let e = bad.parse::<PlacementPolicy>().unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, NumaError::Policy { .. }), "{bad:?}: {msg}");
        assert!(
            msg.contains("cpus:0-3,8") && msg.contains("nodes:1"),
            "{msg}"
        );
    }
    assert!(serde_json::from_str::<PlacementPolicy>("\"pin\"").is_err());
}

#[test]
fn unknown_cpus_and_nodes_are_rejected_against_the_topology() {
    let sys = four_nodes("check");
    let topo = sys.topo();
    let check = |s: &str| s.parse::<PlacementPolicy>().unwrap().check(&topo);
    check("cpus:0-11").unwrap();
    check("nodes:0-2").unwrap();
    let e = check("cpus:2,12").unwrap_err();
    assert!(matches!(e, NumaError::UnknownCpu { cpu: 12, .. }), "{e}");
    assert_eq!(
        e.to_string(),
        "CPU 12 does not exist on this machine (its CPUs: 0-11)"
    );
    let e = check("nodes:4").unwrap_err();
    assert_eq!(
        e.to_string(),
        "NUMA node 4 does not exist on this machine (its nodes: 0-3)"
    );
    let e = check("nodes:3").unwrap_err();
    assert_eq!(e.to_string(), "NUMA node 3 has no CPUs to run threads on");
    // The plan refuses them too.
    let p = PlacementPolicy::Cpus(vec![99]);
    assert!(Placement::plan(&topo, &p, Side::Source, &Facts::default()).is_err());
}

#[test]
fn topologies_are_read_from_sysfs() {
    let sys = two_nodes("read2");
    let t = sys.topo();
    assert_eq!(t.nodes().len(), 2);
    assert_eq!(t.nodes()[1].cpus, cpus("4-7"));
    assert_eq!(t.nodes()[1].distances, vec![21, 10]);
    assert!(t.is_multi_node());
    assert_eq!(t.distance(0, 1), Some(21));
    assert_eq!(t.cpus(), cpus("0-7"));

    let sys = four_nodes("read4");
    let t = sys.topo();
    assert_eq!(t.nodes().len(), 4);
    assert!(t.nodes()[3].cpus.is_empty() && t.nodes()[3].has_memory);
    assert_eq!(t.nearest_with_cpus(3), Some(2), "by distance: 14 < 28 < 32");
    assert_eq!(t.nearest_with_cpus(1), Some(1));
    assert_eq!(t.nearest_with_cpus(7), None);

    // Memory presence from has_memory; a missing distance file defaults.
    let sys = FakeSys::new("mem", &[("0-1", "10 20"), ("2-3", "20 10")], "0");
    std::fs::remove_file(sys.root.join("devices/system/node/node1/distance")).unwrap();
    let t = sys.topo();
    assert!(t.nodes()[0].has_memory && !t.nodes()[1].has_memory);
    assert_eq!(t.nodes()[1].distances, vec![20, 10]);
}

#[test]
fn malformed_sysfs_is_an_error_and_no_numa_is_one_node() {
    let sys = FakeSys::new("bad", &[("0-3", "10 21"), ("4-7", "21")], "0-1");
    let e = sys.topo_err();
    assert!(
        e.contains("node1/distance") && e.contains("1 distances for 2 nodes"),
        "{e}"
    );
    let sys = FakeSys::new("bad2", &[("0-3", "10 21"), ("4-x", "21 10")], "0-1");
    assert!(sys.topo_err().contains("node1/cpulist"));

    // A kernel without NUMA: one node with the online CPUs.
    let root = std::env::temp_dir().join(format!("ferry-numa-t-nonuma-{}", std::process::id()));
    std::fs::create_dir_all(root.join("devices/system/cpu")).unwrap();
    std::fs::write(root.join("devices/system/cpu/online"), "0-5\n").unwrap();
    let t = Topology::read(&root).unwrap();
    assert_eq!(t.nodes().len(), 1);
    assert_eq!(t.nodes()[0].cpus, cpus("0-5"));
    std::fs::remove_dir_all(&root).unwrap();
    let t = Topology::read(Path::new("/nonexistent-sys")).unwrap();
    assert_eq!(t, Topology::single());
    assert!(!t.cpus().is_empty());
}

impl FakeSys {
    fn topo_err(&self) -> String {
        Topology::read(&self.root).unwrap_err().to_string()
    }
}

#[test]
fn devices_are_found_through_sysfs() {
    let sys = two_nodes("devs");
    sys.nic("eth1", 1);
    sys.virtual_nic("lo");
    assert_eq!(probe::net_device_node(&sys.root, "eth1"), Some(1));
    assert_eq!(probe::net_device_node(&sys.root, "lo"), None, "no device");
    assert_eq!(probe::net_device_node(&sys.root, "eth9"), None);
    assert_eq!(probe::net_device_node(&sys.root, ".."), None);
    let file = File::open(std::env::temp_dir()).unwrap();
    sys.disk(&file, 1);
    assert_eq!(
        probe::block_device(&sys.root, &file),
        dev("vdb", Some(1)).unwrap()
    );
    let sys = two_nodes("devs-unknown");
    sys.nic("eth0", -1);
    assert_eq!(
        probe::net_device_node(&sys.root, "eth0"),
        None,
        "-1: unknown"
    );
}

#[test]
fn two_nodes_put_encoders_near_memory_and_senders_near_the_nic() {
    let sys = two_nodes("plan2");
    sys.nic("eth1", 1);
    let file = File::open(std::env::temp_dir()).unwrap();
    sys.disk(&file, 1);
    let topo = sys.topo();
    let facts = Facts {
        memory_node: Some(0),
        nic: dev("eth1", probe::net_device_node(&sys.root, "eth1")),
        disk: Some(probe::block_device(&sys.root, &file)),
        allowed: None,
    };
    let src = Placement::plan(&topo, &PlacementPolicy::Auto, Side::Source, &facts).unwrap();
    assert_eq!(
        rows(&src),
        vec![
            row(Stage::Encode, Some(0), "0-3", "guest memory on node 0"),
            row(Stage::Send, Some(1), "4-7", "NIC eth1 on node 1"),
            row(Stage::DiskRead, Some(1), "4-7", "disk vdb on node 1"),
        ]
    );
    assert_eq!(
        src.to_string(),
        "encode: CPUs 0-3 (node 0) (guest memory on node 0); \
         send: CPUs 4-7 (node 1) (NIC eth1 on node 1); \
         disk-read: CPUs 4-7 (node 1) (disk vdb on node 1)"
    );
    let dst = Placement::plan(&topo, &PlacementPolicy::Auto, Side::Target, &facts).unwrap();
    assert_eq!(
        rows(&dst),
        vec![
            row(Stage::Receive, Some(1), "4-7", "NIC eth1 on node 1"),
            row(Stage::Decode, Some(0), "0-3", "guest memory on node 0"),
            row(Stage::DiskWrite, Some(1), "4-7", "disk vdb on node 1"),
        ]
    );
    // The disk module's own answer (what its ring thread does) agrees, within
    // this process's CPUs as both see them.
    let facts = Facts {
        allowed: Some(current_affinity().unwrap()),
        ..facts
    };
    let p = Placement::plan(&topo, &PlacementPolicy::Auto, Side::Source, &facts).unwrap();
    let d = p.stage(Stage::DiskRead).unwrap();
    assert_eq!(
        crate::disk::numa::device_node_cpus(&sys.root, &file),
        d.node
            .filter(|_| !d.cpus.is_empty())
            .map(|n| (n, d.cpus.as_slice().to_vec()))
    );
}

#[test]
fn an_unknown_anchor_follows_the_other_one_or_stays_unpinned() {
    let sys = two_nodes("unknown");
    let topo = sys.topo();
    let auto = |facts: &Facts| {
        rows(&Placement::plan(&topo, &PlacementPolicy::Auto, Side::Source, facts).unwrap())
    };
    // Loopback: the NIC has no node; senders go near the memory they writev from.
    let facts = Facts {
        memory_node: Some(1),
        nic: dev("lo", None),
        ..Facts::default()
    };
    assert_eq!(
        auto(&facts),
        vec![
            row(Stage::Encode, Some(1), "4-7", "guest memory on node 1"),
            row(
                Stage::Send,
                Some(1),
                "4-7",
                "NIC lo: node unknown; guest memory on node 1"
            ),
        ]
    );
    // Memory spread over both nodes: encoders near the NIC.
    let facts = Facts {
        memory_node: None,
        nic: dev("eth0", Some(0)),
        ..Facts::default()
    };
    assert_eq!(
        auto(&facts)[0],
        row(
            Stage::Encode,
            Some(0),
            "0-3",
            "guest memory: node unknown; NIC eth0 on node 0"
        )
    );
    // Nothing known (an in-process transport, memory not yet touched).
    assert_eq!(
        auto(&Facts::default())[1],
        row(
            Stage::Send,
            None,
            "",
            "NIC: node unknown; guest memory: node unknown; not pinned"
        )
    );
    // A node the topology lacks counts as unknown.
    let facts = Facts {
        memory_node: Some(5),
        ..Facts::default()
    };
    assert!(auto(&facts)[0]
        .3
        .contains("node 5, which this topology lacks"));
}

#[test]
fn the_process_cpu_set_bounds_an_automatic_choice() {
    let sys = two_nodes("allowed");
    let topo = sys.topo();
    let mut facts = Facts {
        memory_node: Some(1),
        nic: dev("eth0", Some(0)),
        allowed: Some(cpus("0-5")),
        ..Facts::default()
    };
    let p = Placement::plan(&topo, &PlacementPolicy::Auto, Side::Source, &facts).unwrap();
    assert_eq!(p.stage(Stage::Encode).unwrap().cpus, cpus("4-5"));
    facts.allowed = Some(cpus("0-3"));
    let p = Placement::plan(&topo, &PlacementPolicy::Auto, Side::Source, &facts).unwrap();
    assert_eq!(
        rows(&p)[0],
        row(
            Stage::Encode,
            Some(0),
            "0-3",
            "guest memory on node 1, whose CPUs 4-7 are outside this process's CPU set; \
             NIC eth0 on node 0"
        )
    );
}

#[test]
fn four_nodes_hand_a_memory_only_node_to_the_nearest_cpus() {
    let sys = four_nodes("plan4");
    sys.nic("eth0", 1);
    let topo = sys.topo();
    let facts = Facts {
        memory_node: Some(3),
        nic: dev("eth0", probe::net_device_node(&sys.root, "eth0")),
        ..Facts::default()
    };
    let dst = Placement::plan(&topo, &PlacementPolicy::Auto, Side::Target, &facts).unwrap();
    assert_eq!(
        rows(&dst),
        vec![
            row(Stage::Receive, Some(1), "4-7", "NIC eth0 on node 1"),
            row(
                Stage::Decode,
                Some(2),
                "8-11",
                "guest memory on node 3 (no CPUs; nearest is node 2)"
            ),
        ]
    );
    let facts = Facts {
        memory_node: Some(2),
        ..facts
    };
    let src = Placement::plan(&topo, &PlacementPolicy::Auto, Side::Source, &facts).unwrap();
    assert_eq!(src.stage(Stage::Encode).unwrap().cpus, cpus("8-11"));
    assert_eq!(src.stage(Stage::Send).unwrap().node, Some(1));
}

#[test]
fn forced_choices_apply_to_every_stage_the_disk_too() {
    let sys = four_nodes("forced");
    let topo = sys.topo();
    let facts = Facts {
        memory_node: Some(2),
        nic: dev("eth0", Some(1)),
        disk: dev("vdb", Some(1)),
        allowed: None,
    };
    let plan = |p: &str| Placement::plan(&topo, &p.parse().unwrap(), Side::Source, &facts).unwrap();
    let p = plan("cpus:0-3");
    assert_eq!(
        rows(&p)[..2],
        [
            row(Stage::Encode, Some(0), "0-3", "forced: cpus 0-3"),
            row(Stage::Send, Some(0), "0-3", "forced: cpus 0-3"),
        ]
    );
    assert_eq!(
        rows(&p)[2],
        row(Stage::DiskRead, Some(0), "0-3", "forced: cpus 0-3")
    );
    // Under auto, the ring thread follows its device.
    let p = plan("auto");
    assert_eq!(rows(&p)[2].0, Stage::DiskRead);
    assert_eq!(rows(&p)[2].1, Some(1));
    let p = plan("cpus:3-4");
    assert_eq!(
        rows(&p)[0],
        row(Stage::Encode, None, "3-4", "forced: cpus 3-4")
    );
    let p = plan("nodes:2");
    assert_eq!(
        rows(&p)[1],
        row(Stage::Send, Some(2), "8-11", "forced: nodes 2")
    );
    let p = plan("nodes:0,2");
    assert_eq!(
        rows(&p)[0],
        row(Stage::Encode, None, "0-3,8-11", "forced: nodes 0,2")
    );
    let p = plan("off");
    assert_eq!(rows(&p)[0], row(Stage::Encode, None, "", "off: not pinned"));
    assert_eq!(p.pinner(Stage::Encode).cpus(), &CpuList::default());
}

#[test]
fn one_node_pins_nothing_unless_forced() {
    let sys = FakeSys::new("one", &[("0-7", "10")], "0");
    let topo = sys.topo();
    assert!(!topo.is_multi_node());
    let facts = Facts {
        memory_node: Some(0),
        nic: dev("eth0", Some(0)),
        disk: dev("vdb", Some(0)),
        allowed: None,
    };
    let p = Placement::plan(&topo, &PlacementPolicy::Auto, Side::Target, &facts).unwrap();
    assert!(p
        .stages
        .iter()
        .all(|s| s.cpus.is_empty() && s.node.is_none()));
    assert_eq!(
        p.to_string(),
        "all stages: any CPU (single node: not pinned)"
    );
    let p = Placement::plan(&topo, &"cpus:1".parse().unwrap(), Side::Target, &facts).unwrap();
    assert_eq!(
        rows(&p)[0],
        row(Stage::Receive, Some(0), "1", "forced: cpus 1")
    );
    // One node with CPUs plus a memory-only node is one node for threads.
    let sys = FakeSys::new("one-cxl", &[("0-7", "10 20"), ("", "20 10")], "0-1");
    assert!(!sys.topo().is_multi_node());
}

#[test]
fn placements_serialize_into_the_snapshot_and_print() {
    let mut s = crate::Snapshot::default();
    let json = serde_json::to_string(&s).unwrap();
    assert!(!json.contains("placement"), "empty placement is skipped");
    assert!(!s.to_string().contains("placement"));
    let back: crate::Snapshot = serde_json::from_str(&json).unwrap();
    assert!(back.placement.is_empty(), "old JSON reads as not planned");

    let sys = two_nodes("snap");
    let facts = Facts {
        memory_node: Some(1),
        nic: dev("eth0", Some(0)),
        ..Facts::default()
    };
    s.placement =
        Placement::plan(&sys.topo(), &PlacementPolicy::Auto, Side::Source, &facts).unwrap();
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(
        json["placement"]["stages"][0],
        serde_json::json!({"stage": "encode", "node": 1, "cpus": "4-7", "reason": "guest memory on node 1"})
    );
    let back: crate::Snapshot = serde_json::from_value(json).unwrap();
    assert_eq!(back.placement, s.placement);
    let text = s.to_string();
    assert!(
        text.contains("  placement:         encode: CPUs 4-7 (node 1) (guest memory on node 1); send: CPUs 0-3 (node 0) (NIC eth0 on node 0)"),
        "{text}"
    );
}

#[test]
fn majority_needs_more_than_half() {
    assert_eq!(probe::majority([0, 0, 1]), Some(0));
    assert_eq!(probe::majority([1, 1, 1, 0, 2]), Some(1));
    assert_eq!(probe::majority([0, 1]), None, "interleaved");
    assert_eq!(probe::majority([]), None);
}

fn guest(pages: u64) -> GuestMem {
    GuestMem::create(&VmSpec {
        name: "numa".into(),
        regions: vec![RegionSpec {
            gpa: 0,
            size: pages * 4096,
            memfd_offset: 0,
        }],
        vcpus: 1,
        vmm_config: serde_json::Value::Null,
        disk: None,
    })
    .unwrap()
}

#[test]
fn this_machine_gives_an_unpinned_plan_on_one_node() {
    let sys = Path::new(SYS_ROOT);
    let topo = Topology::read(sys).unwrap();
    eprintln!(
        "this machine: {} node(s), CPUs {}",
        topo.nodes().len(),
        topo.cpus()
    );
    let mem = guest(64);
    let p = Placement::probe(
        sys,
        Side::Source,
        &PlacementPolicy::Auto,
        &mem,
        "127.0.0.1:9",
        None,
    );
    eprintln!("this machine's plan: {p}");
    assert_eq!(p.stages.len(), 2);
    if topo.is_multi_node() {
        eprintln!("skipping the one-node check: this machine has several nodes");
        return;
    }
    assert!(p.stages.iter().all(|s| s.cpus.is_empty()));
    assert_eq!(
        p.to_string(),
        "all stages: any CPU (single node: not pinned)"
    );
    let p = Placement::probe(sys, Side::Target, &PlacementPolicy::Off, &mem, "", None);
    assert_eq!(p.to_string(), "all stages: any CPU (off: not pinned)");
    // A forced CPU this machine lacks: not applied, and said so.
    let p = Placement::probe(
        sys,
        Side::Target,
        &PlacementPolicy::Cpus(vec![8191]),
        &mem,
        "",
        None,
    );
    assert!(p.stages.iter().all(|s| s.cpus.is_empty()));
    assert!(
        p.stages[0].reason.contains("CPU 8191 does not exist"),
        "{p}"
    );
}

#[test]
fn this_machine_reports_where_guest_memory_lives() {
    let mem = guest(256);
    assert_eq!(probe::memory_node(&mem), None, "no page present yet");
    mem.prefault();
    let topo = Topology::read(Path::new(SYS_ROOT)).unwrap();
    let addr = mem.page(crate::PageIndex(0)).unwrap().ptr_guard().as_ptr() as usize;
    match probe::page_nodes(&[addr]) {
        Err(e) => eprintln!("skipping: move_pages refused here: {e}"),
        Ok(_) => {
            let node = probe::memory_node(&mem).expect("present pages have a node");
            assert!(topo.node(node).is_some(), "node {node}");
            if !topo.is_multi_node() {
                assert_eq!(node, topo.nodes()[0].id);
            }
        }
    }
}

#[test]
fn this_machine_finds_the_loopback_interface_without_a_device() {
    let local = probe::local_ip_towards("127.0.0.1:9".parse().unwrap()).unwrap();
    assert!(local.is_loopback(), "{local}");
    let Some(nic) = probe::nic_towards(Path::new(SYS_ROOT), "127.0.0.1:9") else {
        eprintln!("skipping: no interface holds 127.0.0.1 here");
        return;
    };
    assert_eq!(nic.node, None, "loopback has no device: {nic:?}");
    assert_eq!(probe::nic_towards(Path::new(SYS_ROOT), "inproc-peer"), None);
}

#[test]
fn a_pinned_thread_runs_on_exactly_its_cpus() {
    let mine = current_affinity().unwrap();
    assert!(!mine.is_empty());
    let one = CpuList::new([mine.as_slice()[0]]);
    let many = CpuList::new(mine.as_slice().iter().copied().take(2));
    for want in [one, many] {
        let topo = Topology::read(Path::new(SYS_ROOT)).unwrap();
        let policy = PlacementPolicy::Cpus(want.as_slice().to_vec());
        let plan = Placement::plan(&topo, &policy, Side::Source, &Facts::default()).unwrap();
        let pin = plan.pinner(Stage::Encode);
        let got = std::thread::spawn(move || {
            assert!(pin.enter());
            current_affinity().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(got, want);
    }
    // This thread was not touched.
    assert_eq!(current_affinity().unwrap(), mine);
    // An impossible pin fails cleanly, and the Pinner carries on unpinned.
    let refused = std::thread::spawn(|| {
        let r = (
            pin_current_thread(&[8000]),
            pin_current_thread(&[8000, 8001]),
        );
        (r.0.is_err(), r.1.is_err(), current_affinity().unwrap())
    })
    .join()
    .unwrap();
    assert_eq!(refused, (true, true, mine));
}

#[test]
fn touched_buffers_are_empty_with_their_capacity() {
    let b = touched_buffer(256 << 10);
    assert!(b.is_empty() && b.capacity() >= 256 << 10);
}

#[test]
fn the_source_pipeline_records_its_placement() {
    use ferry_transport::{inproc::InProcTransport, Transport};
    let t = InProcTransport::new();
    let mut l = t.listen("numa").unwrap();
    let conn = t
        .connect("numa", std::time::Duration::from_secs(1))
        .unwrap();
    let _far = l.accept(Some(std::time::Duration::from_secs(1))).unwrap();
    let metrics = Arc::new(crate::Metrics::new("m", "vm", "source", "p"));
    let p = crate::source::pipeline::Pipeline::start(
        Arc::new(guest(16)),
        vec![conn],
        metrics.clone(),
        None,
        0,
        None,
        &PlacementPolicy::Off,
    )
    .unwrap();
    p.stop(true);
    let s = metrics.snapshot();
    assert_eq!(
        s.placement.to_string(),
        "all stages: any CPU (off: not pinned)"
    );
}
