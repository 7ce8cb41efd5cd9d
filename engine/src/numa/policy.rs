//! The user's placement choice: `auto`, `off`, `cpus:<list>`, `nodes:<list>`.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::cpus::write_ranges;
use super::{CpuList, NumaError, Topology, CPU_ID_MAX, NODE_ID_MAX, SYS_ROOT};

/// How the user wants the pipeline placed (`--placement`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PlacementPolicy {
    /// Near guest memory / the NIC / the disk on a multi-node machine;
    /// nothing pinned on one node.
    #[default]
    Auto,
    /// Nothing pinned, whatever the topology.
    Off,
    /// Every pipeline thread on these CPUs.
    Cpus(Vec<usize>),
    /// Every pipeline thread on the CPUs of these nodes.
    Nodes(Vec<u32>),
}

impl PlacementPolicy {
    /// Parses `s` and checks it against this machine's topology (`/sys`):
    /// what a daemon or a CLI calls on the user's text.
    pub fn parse_for_host(s: &str) -> Result<Self, NumaError> {
        let p: PlacementPolicy = s.parse()?;
        p.check(&Topology::read(Path::new(SYS_ROOT))?)?;
        Ok(p)
    }

    /// Checks that every forced CPU or node exists in `topo` (and that a
    /// forced node has CPUs).
    pub fn check(&self, topo: &Topology) -> Result<(), NumaError> {
        match self {
            PlacementPolicy::Auto | PlacementPolicy::Off => Ok(()),
            PlacementPolicy::Cpus(cpus) => {
                let known = topo.cpus();
                match cpus.iter().find(|&&c| !known.contains(c)) {
                    Some(&cpu) => Err(NumaError::UnknownCpu { cpu, known }),
                    None => Ok(()),
                }
            }
            PlacementPolicy::Nodes(nodes) => {
                for &node in nodes {
                    match topo.node(node) {
                        None => {
                            return Err(NumaError::UnknownNode {
                                node,
                                known: topo.node_ids(),
                            })
                        }
                        Some(n) if n.cpus.is_empty() => {
                            return Err(NumaError::NodeWithoutCpus { node })
                        }
                        Some(_) => {}
                    }
                }
                Ok(())
            }
        }
    }
}

impl FromStr for PlacementPolicy {
    type Err = NumaError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |detail: String| NumaError::Policy {
            input: s.into(),
            detail,
        };
        let t = s.trim();
        let list = |l: &str, what: &str, max: usize| {
            let ids = CpuList::parse_ids(l, max).map_err(|e| bad(e.to_string()))?;
            if ids.is_empty() {
                return Err(bad(format!("no {what} listed")));
            }
            Ok(CpuList::new(ids).0)
        };
        if t == "auto" {
            Ok(PlacementPolicy::Auto)
        } else if t == "off" {
            Ok(PlacementPolicy::Off)
        } else if let Some(l) = t.strip_prefix("cpus:") {
            Ok(PlacementPolicy::Cpus(list(l, "CPUs", CPU_ID_MAX)?))
        } else if let Some(l) = t.strip_prefix("nodes:") {
            let ids = list(l, "nodes", NODE_ID_MAX as usize)?;
            Ok(PlacementPolicy::Nodes(
                ids.into_iter().map(|n| n as u32).collect(),
            ))
        } else {
            Err(bad("unknown form".into()))
        }
    }
}

impl fmt::Display for PlacementPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlacementPolicy::Auto => f.write_str("auto"),
            PlacementPolicy::Off => f.write_str("off"),
            PlacementPolicy::Cpus(c) => {
                f.write_str("cpus:")?;
                write_ranges(f, &CpuList::new(c.iter().copied()).0)
            }
            PlacementPolicy::Nodes(n) => {
                f.write_str("nodes:")?;
                write_ranges(f, &CpuList::new(n.iter().map(|&n| n as usize)).0)
            }
        }
    }
}

impl Serialize for PlacementPolicy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PlacementPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
