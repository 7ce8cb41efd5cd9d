//! The machine's NUMA nodes, from `/sys/devices/system/node`.

use std::path::Path;

use super::{current_affinity, CpuList, NumaError, CPU_ID_MAX, LOCAL_DISTANCE, NODE_ID_MAX};

/// One NUMA node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// The node id (`node<id>` in sysfs).
    pub id: u32,
    /// Its CPUs (empty for a memory-only node).
    pub cpus: CpuList,
    /// Whether it has memory (`has_memory`).
    pub has_memory: bool,
    /// Its distance row: index i is the distance to the topology's i-th node.
    pub distances: Vec<u32>,
}

/// The machine's NUMA nodes, ascending by id (never empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    nodes: Vec<Node>,
}

impl Topology {
    /// Reads the topology under `sys` (normally `/sys`). A kernel without
    /// NUMA support has no `devices/system/node`: one node with every online
    /// CPU then ([`Topology::single`] when even that is missing).
    pub fn read(sys: &Path) -> Result<Self, NumaError> {
        let dir = sys.join("devices/system/node");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::one_node(sys));
            }
            Err(source) => return Err(NumaError::Read { path: dir, source }),
        };
        let mut ids: Vec<u32> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name();
                let n = name.to_str()?.strip_prefix("node")?.parse::<u32>().ok()?;
                (n <= NODE_ID_MAX).then_some(n)
            })
            .collect();
        if ids.is_empty() {
            return Ok(Self::one_node(sys));
        }
        ids.sort_unstable();
        // Nodes with memory; every node when the kernel does not say.
        let with_memory = match read_optional(&dir.join("has_memory"))? {
            Some(s) => Some(parse_list_file(&dir.join("has_memory"), &s)?),
            None => None,
        };
        let mut nodes = Vec::with_capacity(ids.len());
        for (i, &id) in ids.iter().enumerate() {
            let node_dir = dir.join(format!("node{id}"));
            let path = node_dir.join("cpulist");
            let text = std::fs::read_to_string(&path).map_err(|source| NumaError::Read {
                path: path.clone(),
                source,
            })?;
            let cpus = CpuList::new(parse_list_file(&path, &text)?);
            let path = node_dir.join("distance");
            let distances = match read_optional(&path)? {
                None => (0..ids.len())
                    .map(|j| {
                        if j == i {
                            LOCAL_DISTANCE
                        } else {
                            2 * LOCAL_DISTANCE
                        }
                    })
                    .collect(),
                Some(s) => {
                    let row: Vec<u32> = s
                        .split_whitespace()
                        .map(str::parse)
                        .collect::<Result<_, _>>()
                        .map_err(|e| NumaError::Malformed {
                            path: path.clone(),
                            detail: format!("{s:?}: {e}"),
                        })?;
                    if row.len() != ids.len() {
                        return Err(NumaError::Malformed {
                            path,
                            detail: format!("{} distances for {} nodes", row.len(), ids.len()),
                        });
                    }
                    row
                }
            };
            nodes.push(Node {
                id,
                cpus,
                has_memory: with_memory
                    .as_ref()
                    .is_none_or(|m| m.contains(&(id as usize))),
                distances,
            });
        }
        Ok(Topology { nodes })
    }

    /// One node (0) with the CPUs this process may run on: the fallback when
    /// sysfs says nothing.
    pub fn single() -> Self {
        let cpus = current_affinity().unwrap_or_else(|_| {
            CpuList::new(0..std::thread::available_parallelism().map_or(1, |n| n.get()))
        });
        Self::with_one_node(cpus)
    }

    fn with_one_node(cpus: CpuList) -> Self {
        Topology {
            nodes: vec![Node {
                id: 0,
                cpus,
                has_memory: true,
                distances: vec![LOCAL_DISTANCE],
            }],
        }
    }

    /// One node holding the online CPUs under `sys`, else [`Self::single`].
    fn one_node(sys: &Path) -> Self {
        std::fs::read_to_string(sys.join("devices/system/cpu/online"))
            .ok()
            .and_then(|s| s.parse::<CpuList>().ok())
            .filter(|c| !c.is_empty())
            .map_or_else(Self::single, Self::with_one_node)
    }

    /// The nodes, ascending by id.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node `id`.
    pub fn node(&self, id: u32) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Every CPU of every node.
    pub fn cpus(&self) -> CpuList {
        CpuList::new(self.nodes.iter().flat_map(|n| n.cpus.0.iter().copied()))
    }

    /// Whether threads can run on more than one node: only then does
    /// placing them matter.
    pub fn is_multi_node(&self) -> bool {
        self.nodes.iter().filter(|n| !n.cpus.is_empty()).count() > 1
    }

    /// The distance from node `a` to node `b`.
    pub fn distance(&self, a: u32, b: u32) -> Option<u32> {
        let j = self.nodes.iter().position(|n| n.id == b)?;
        self.node(a)?.distances.get(j).copied()
    }

    /// The node whose CPUs should serve data on `node`: itself when it has
    /// CPUs, else the nearest node with CPUs (the lowest id on a tie).
    pub fn nearest_with_cpus(&self, node: u32) -> Option<u32> {
        let n = self.node(node)?;
        if !n.cpus.is_empty() {
            return Some(node);
        }
        self.nodes
            .iter()
            .filter(|m| !m.cpus.is_empty())
            .min_by_key(|m| (self.distance(node, m.id).unwrap_or(u32::MAX), m.id))
            .map(|m| m.id)
    }

    /// The node whose CPUs include all of `cpus`, if one does.
    pub(super) fn node_holding(&self, cpus: &CpuList) -> Option<u32> {
        self.nodes
            .iter()
            .find(|n| !cpus.is_empty() && cpus.0.iter().all(|&c| n.cpus.contains(c)))
            .map(|n| n.id)
    }

    pub(super) fn node_ids(&self) -> String {
        let ids: Vec<usize> = self.nodes.iter().map(|n| n.id as usize).collect();
        CpuList(ids).to_string()
    }
}

/// Reads `path`, `None` when it does not exist.
fn read_optional(path: &Path) -> Result<Option<String>, NumaError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(NumaError::Read {
            path: path.into(),
            source,
        }),
    }
}

fn parse_list_file(path: &Path, text: &str) -> Result<Vec<usize>, NumaError> {
    CpuList::parse_ids(text, CPU_ID_MAX).map_err(|e| NumaError::Malformed {
        path: path.into(),
        detail: e.to_string(),
    })
}
