//! The plan: per stage of one side, its CPUs and why.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{
    current_affinity, probe, CpuList, Device, NumaError, Pinner, PlacementPolicy, Topology,
    SYS_ROOT,
};

/// Which end of a migration a plan is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Encoders and senders (and the disk reader).
    Source,
    /// Receivers and decoders (and the disk writer).
    Target,
}

/// A stage of the pipeline whose threads are placed together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Source: zero check, compression, delta (reads guest memory).
    Encode,
    /// Source: one thread per stream writing to the network.
    Send,
    /// Target: one thread per stream reading from the network.
    Receive,
    /// Target: decompression into guest memory.
    Decode,
    /// Source: the disk reader's io_uring thread.
    DiskRead,
    /// Target: the disk writer's io_uring thread.
    DiskWrite,
}

impl Stage {
    /// The name shown to users.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Encode => "encode",
            Stage::Send => "send",
            Stage::Receive => "receive",
            Stage::Decode => "decode",
            Stage::DiskRead => "disk-read",
            Stage::DiskWrite => "disk-write",
        }
    }
}

/// What placing a side depends on besides the topology and the policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// The node holding most of the guest memory's pages.
    pub memory_node: Option<u32>,
    /// The NIC of the data connections (`None`: no interface found, e.g. an
    /// in-process transport).
    pub nic: Option<Device>,
    /// The disk's block device (`None`: the VM has no disk). Its `node` is
    /// `None` when sysfs does not tell.
    pub disk: Option<Device>,
    /// The CPUs this process may use (`None`: no restriction known). An
    /// automatic choice keeps to them.
    pub allowed: Option<CpuList>,
}

/// Where one stage's threads run, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagePlacement {
    /// The stage.
    pub stage: Stage,
    /// The node its CPUs belong to (`None`: unpinned, or CPUs of several nodes).
    #[serde(default)]
    pub node: Option<u32>,
    /// Its CPUs; empty: not pinned (the scheduler places it).
    #[serde(default)]
    pub cpus: CpuList,
    /// Why ("guest memory on node 1", "single node: not pinned").
    #[serde(default)]
    pub reason: String,
}

impl StagePlacement {
    fn new(stage: Stage, node: Option<u32>, cpus: CpuList, reason: String) -> Self {
        StagePlacement {
            stage,
            node,
            cpus,
            reason,
        }
    }

    fn unpinned(stage: Stage, reason: impl Into<String>) -> Self {
        Self::new(stage, None, CpuList::default(), reason.into())
    }

    /// Where it runs, for people: "any CPU", "CPUs 4-7 (node 1)".
    fn where_(&self) -> String {
        match (self.cpus.is_empty(), self.node) {
            (true, _) => "any CPU".into(),
            (false, Some(n)) => format!("CPUs {} (node {n})", self.cpus),
            (false, None) => format!("CPUs {}", self.cpus),
        }
    }
}

impl fmt::Display for StagePlacement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stage = self.stage.name();
        write!(f, "{stage}: {} ({})", self.where_(), self.reason)
    }
}

/// The plan for one side's pipeline: per stage, its CPUs and why. Empty
/// (the default) means "not planned" (a snapshot from before placement).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// One entry per stage the side runs.
    pub stages: Vec<StagePlacement>,
}

/// An anchor of a stage: what it should be near, and that thing's node.
struct Anchor {
    what: String,
    node: Option<u32>,
}

impl Placement {
    /// Plans the source side on this machine; never fails (a problem leaves
    /// the stage unpinned, with the problem as its reason).
    pub fn for_source(
        policy: &PlacementPolicy,
        mem: &crate::GuestMem,
        peer: &str,
        disk: Option<&std::fs::File>,
    ) -> Self {
        Self::probe(Path::new(SYS_ROOT), Side::Source, policy, mem, peer, disk)
    }

    /// Plans the target side on this machine, as [`Self::for_source`].
    pub fn for_target(
        policy: &PlacementPolicy,
        mem: &crate::GuestMem,
        peer: &str,
        disk: Option<&std::fs::File>,
    ) -> Self {
        Self::probe(Path::new(SYS_ROOT), Side::Target, policy, mem, peer, disk)
    }

    /// Reads the topology under `sys`, gathers the [`Facts`] (only on a
    /// multi-node machine: on one node they change nothing) and plans.
    pub fn probe(
        sys: &Path,
        side: Side,
        policy: &PlacementPolicy,
        mem: &crate::GuestMem,
        peer: &str,
        disk: Option<&std::fs::File>,
    ) -> Self {
        let topo = Topology::read(sys).unwrap_or_else(|e| {
            tracing::warn!("NUMA topology unknown, treating the machine as one node: {e}");
            Topology::single()
        });
        let facts = if topo.is_multi_node() {
            Facts {
                memory_node: probe::memory_node(mem),
                nic: probe::nic_towards(sys, peer),
                disk: disk.map(|f| probe::block_device(sys, f)),
                allowed: current_affinity().ok(),
            }
        } else {
            Facts {
                disk: disk.map(|_| Device::default()),
                ..Facts::default()
            }
        };
        let plan = Self::plan(&topo, policy, side, &facts).unwrap_or_else(|e| {
            tracing::warn!("placement {policy} cannot be applied: {e}");
            let reason = format!("placement {policy} not applied: {e}");
            Self::unpinned(side, facts.disk.is_some(), &reason)
        });
        tracing::info!("pipeline placement: {plan}");
        plan
    }

    fn unpinned(side: Side, disk: bool, reason: &str) -> Self {
        let stages = Self::stages(side, disk)
            .into_iter()
            .map(|s| StagePlacement::unpinned(s, reason))
            .collect();
        Placement { stages }
    }

    fn stages(side: Side, disk: bool) -> Vec<Stage> {
        let mut v = match side {
            Side::Source => vec![Stage::Encode, Stage::Send],
            Side::Target => vec![Stage::Receive, Stage::Decode],
        };
        if disk {
            v.push(match side {
                Side::Source => Stage::DiskRead,
                Side::Target => Stage::DiskWrite,
            });
        }
        v
    }

    /// The plan for `side` from `topo`, `policy` and `facts`; pure, so tests
    /// feed it fake machines. Errs when a forced CPU or node is not in `topo`.
    ///
    /// The disk's ring thread is a stage like the others: near its device
    /// under `auto`, where an override says otherwise.
    pub fn plan(
        topo: &Topology,
        policy: &PlacementPolicy,
        side: Side,
        facts: &Facts,
    ) -> Result<Self, NumaError> {
        policy.check(topo)?;
        let memory = Anchor {
            what: "guest memory".into(),
            node: facts.memory_node,
        };
        let nic = Anchor {
            what: facts
                .nic
                .as_ref()
                .map_or_else(|| "NIC".into(), |d| format!("NIC {}", d.name)),
            node: facts.nic.as_ref().and_then(|d| d.node),
        };
        let disk = Anchor {
            what: facts
                .disk
                .as_ref()
                .map_or_else(|| "disk".into(), |d| format!("disk {}", d.name)),
            node: facts.disk.as_ref().and_then(|d| d.node),
        };
        let mut stages = Vec::new();
        for stage in Self::stages(side, facts.disk.is_some()) {
            let (primary, fallback) = match stage {
                Stage::Encode | Stage::Decode => (&memory, Some(&nic)),
                Stage::Send | Stage::Receive => (&nic, Some(&memory)),
                Stage::DiskRead | Stage::DiskWrite => (&disk, None),
            };
            stages.push(match policy {
                PlacementPolicy::Auto => {
                    auto(topo, stage, primary, fallback, facts.allowed.as_ref())
                }
                PlacementPolicy::Off => StagePlacement::unpinned(stage, "off: not pinned"),
                PlacementPolicy::Cpus(c) => {
                    let cpus = CpuList::new(c.iter().copied());
                    let reason = format!("forced: cpus {cpus}");
                    StagePlacement::new(stage, topo.node_holding(&cpus), cpus, reason)
                }
                PlacementPolicy::Nodes(ns) => {
                    let ids = CpuList::new(ns.iter().map(|&n| n as usize));
                    let cpus = CpuList::new(
                        ns.iter()
                            .filter_map(|&n| topo.node(n))
                            .flat_map(|n| n.cpus.0.iter().copied()),
                    );
                    let node = (ns.len() == 1).then(|| ns[0]);
                    StagePlacement::new(stage, node, cpus, format!("forced: nodes {ids}"))
                }
            });
        }
        Ok(Placement { stages })
    }

    /// Whether nothing was planned.
    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    /// The entry of `stage`.
    pub fn stage(&self, stage: Stage) -> Option<&StagePlacement> {
        self.stages.iter().find(|s| s.stage == stage)
    }

    /// What a thread of `stage` calls first (unpinned when the plan has no
    /// entry for it).
    pub fn pinner(&self, stage: Stage) -> Pinner {
        Pinner {
            stage,
            cpus: self
                .stage(stage)
                .map(|s| s.cpus.clone())
                .unwrap_or_default(),
        }
    }
}

/// Where a stage anchored at `primary` runs under `auto`: near its anchor,
/// else near `fallback`, else anywhere.
fn auto(
    topo: &Topology,
    stage: Stage,
    primary: &Anchor,
    fallback: Option<&Anchor>,
    allowed: Option<&CpuList>,
) -> StagePlacement {
    if !topo.is_multi_node() {
        return StagePlacement::unpinned(stage, "single node: not pinned");
    }
    let near = |a: &Anchor| -> Result<(u32, CpuList, String), String> {
        let node = a.node.ok_or_else(|| format!("{}: node unknown", a.what))?;
        let cpu_node = topo
            .nearest_with_cpus(node)
            .ok_or_else(|| format!("{} on node {node}, which this topology lacks", a.what))?;
        let mut why = format!("{} on node {node}", a.what);
        if cpu_node != node {
            why.push_str(&format!(" (no CPUs; nearest is node {cpu_node})"));
        }
        let all = topo
            .node(cpu_node)
            .map(|n| n.cpus.clone())
            .unwrap_or_default();
        let cpus = allowed.map_or_else(|| all.clone(), |a| all.intersect(a));
        if cpus.is_empty() {
            return Err(format!(
                "{why}, whose CPUs {all} are outside this process's CPU set"
            ));
        }
        Ok((cpu_node, cpus, why))
    };
    match near(primary) {
        Ok((node, cpus, why)) => StagePlacement::new(stage, Some(node), cpus, why),
        Err(first) => match fallback.map(near) {
            Some(Ok((node, cpus, why))) => {
                StagePlacement::new(stage, Some(node), cpus, format!("{first}; {why}"))
            }
            Some(Err(second)) => {
                StagePlacement::unpinned(stage, format!("{first}; {second}; not pinned"))
            }
            None => StagePlacement::unpinned(stage, format!("{first}; not pinned")),
        },
    }
}

impl fmt::Display for Placement {
    /// One line: "all stages: any CPU (single node: not pinned)" when every
    /// stage is placed alike, else "encode: CPUs 4-7 (node 1) (guest memory on
    /// node 1); send: ...".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(first) = self.stages.first() else {
            return f.write_str("not planned");
        };
        if self.stages.len() > 1
            && self
                .stages
                .iter()
                .all(|s| s.cpus == first.cpus && s.node == first.node && s.reason == first.reason)
        {
            return write!(f, "all stages: {} ({})", first.where_(), first.reason);
        }
        for (i, s) in self.stages.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{s}")?;
        }
        Ok(())
    }
}
