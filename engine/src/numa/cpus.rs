//! CPU (and node) lists in the kernel's format.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{NumaError, CPU_ID_MAX};

/// A set of CPU ids, ascending and without duplicates. Reads and prints the
/// kernel's list format ("0-3,8"); serialized as that string.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct CpuList(pub(super) Vec<usize>);

impl CpuList {
    /// The set of `cpus` (any order, duplicates dropped).
    pub fn new(cpus: impl IntoIterator<Item = usize>) -> Self {
        let mut v: Vec<usize> = cpus.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        CpuList(v)
    }

    /// The CPU ids, ascending.
    pub fn as_slice(&self) -> &[usize] {
        &self.0
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of CPUs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether `cpu` is in the set.
    pub fn contains(&self, cpu: usize) -> bool {
        self.0.binary_search(&cpu).is_ok()
    }

    /// The CPUs in both sets.
    pub fn intersect(&self, other: &CpuList) -> CpuList {
        CpuList(
            self.0
                .iter()
                .copied()
                .filter(|&c| other.contains(c))
                .collect(),
        )
    }

    /// Parses the kernel's list format of ids up to `max`: comma-separated ids
    /// and inclusive ranges, whitespace around the whole ignored, "" empty.
    pub(super) fn parse_ids(s: &str, max: usize) -> Result<Vec<usize>, NumaError> {
        let bad = |detail: String| NumaError::List {
            input: s.into(),
            detail,
        };
        let t = s.trim();
        let mut ids = Vec::new();
        if t.is_empty() {
            return Ok(ids);
        }
        let id = |p: &str| -> Result<usize, NumaError> {
            let n: usize = p
                .parse()
                .map_err(|_| bad(format!("{p:?} is not a number")))?;
            if n > max {
                return Err(bad(format!("{n} is above the largest id, {max}")));
            }
            Ok(n)
        };
        for part in t.split(',') {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (id(a)?, id(b)?);
                    if b < a {
                        return Err(bad(format!("range {a}-{b} runs backwards")));
                    }
                    ids.extend(a..=b);
                }
                None => ids.push(id(part)?),
            }
        }
        Ok(ids)
    }
}

impl FromStr for CpuList {
    type Err = NumaError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(CpuList::new(CpuList::parse_ids(s, CPU_ID_MAX)?))
    }
}

/// Writes ascending ids as the kernel does: "0-3,8,10-11".
pub(super) fn write_ranges(f: &mut fmt::Formatter<'_>, ids: &[usize]) -> fmt::Result {
    let mut i = 0;
    while i < ids.len() {
        let mut j = i;
        while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
            j += 1;
        }
        if i > 0 {
            f.write_str(",")?;
        }
        if j > i {
            write!(f, "{}-{}", ids[i], ids[j])?;
        } else {
            write!(f, "{}", ids[i])?;
        }
        i = j + 1;
    }
    Ok(())
}

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_ranges(f, &self.0)
    }
}

impl Serialize for CpuList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CpuList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
