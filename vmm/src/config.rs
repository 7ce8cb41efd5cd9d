//! Workloads and the `vmm_config` a source VMM puts in its `VmSpec`.
//!
//! ferry treats `vmm_config` as opaque and hands it to the target VMM, which
//! needs it to recreate the VM before the state blob arrives:
//!
//! ```json
//! {"format":1,"workload":"dirty:64:hot=80","mem_bytes":134217728,"vcpus":1,
//!  "batch_pages":16,"verify":true,
//!  "layout":{"table_gpa":1048576,"data_gpa":2097152,"data_pages":32256,"hot_pages":3225}}
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::layout::Layout;

/// Version of the `vmm_config` format.
pub const VMM_CONFIG_FORMAT: u32 = 1;
/// Pages the dirty workload writes between exits: 16 x 4 KiB = 64 KiB, so a
/// pause waits at most ~16 page writes (~20 µs) and pacing sleeps stay coarse
/// enough to be accurate up to ~1 GiB/s (one exit per 64 µs).
pub const BATCH_PAGES_DEFAULT: u64 = 16;
/// Cap on the batch: a pause never waits for more than 1024 page writes.
pub const BATCH_PAGES_MAX: u64 = 1024;

/// Errors of workload strings and configs.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The workload string does not parse.
    #[error(
        "invalid workload {0:?}: expected idle, fill, mixed, or dirty:<MiB/s>[:hot=<pct>][:fill] \
         (MiB/s > 0, 0 < pct <= 100)"
    )]
    Workload(String),
    /// The `vmm_config` JSON is not ours or is inconsistent.
    #[error("invalid vmm_config: {0}")]
    Invalid(String),
}

/// What the guest does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Loops; memory stays zero.
    Idle,
    /// Stamps every data page once, incompressible; then idles.
    Fill,
    /// Stamps pages by class (40% zero, 30% text, 30% random); then idles.
    Mixed,
    /// Mixed, then rewrites random pages: `mib_per_s` MiB/s means
    /// `mib_per_s * 256` page rewrites per second (pages x 4 KiB), the rate
    /// of pages the dirty log reports. A rewrite changes only the page's
    /// header and one 256-byte slot of it (see [`crate::oracle`]), so the
    /// bytes that change are ~8% of that. `hot_pct`% of the rewrites go to a
    /// hot set of 10% of the data pages spread evenly over memory (every
    /// 10th page; 0: uniform).
    Dirty {
        /// Rewrite rate in MiB/s of whole pages (4 KiB per rewritten page).
        mib_per_s: u32,
        /// Percentage of writes into the hot set (0: uniform).
        hot_pct: u8,
        /// `:fill`: start from `fill` instead of `mixed`, and rewrite every
        /// page as incompressible data (a guest whose dirty pages cost
        /// their full size on the wire without XOR-delta).
        fill: bool,
    },
}

impl Workload {
    /// The `abi::WORKLOAD_*` code.
    pub fn code(&self) -> u64 {
        match self {
            Workload::Idle => crate::abi::WORKLOAD_IDLE,
            Workload::Fill => crate::abi::WORKLOAD_FILL,
            Workload::Mixed => crate::abi::WORKLOAD_MIXED,
            Workload::Dirty { fill: false, .. } => crate::abi::WORKLOAD_DIRTY,
            Workload::Dirty { fill: true, .. } => crate::abi::WORKLOAD_DIRTY_FILL,
        }
    }

    /// Bytes per second of rewritten pages in the dirty phase, 4 KiB per
    /// page (None: no pacing).
    pub fn dirty_bytes_per_s(&self) -> Option<u64> {
        match self {
            Workload::Dirty { mib_per_s, .. } => Some(u64::from(*mib_per_s) << 20),
            _ => None,
        }
    }
}

impl FromStr for Workload {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::Workload(s.to_string());
        match s {
            "idle" => return Ok(Workload::Idle),
            "fill" => return Ok(Workload::Fill),
            "mixed" => return Ok(Workload::Mixed),
            _ => {}
        }
        let rest = s.strip_prefix("dirty:").ok_or_else(bad)?;
        let mut parts = rest.split(':');
        let mib_per_s: u32 = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let (mut hot, mut fill) = (None, false);
        for part in parts {
            match part.strip_prefix("hot=") {
                Some(h) if hot.is_none() && !fill => {
                    hot = Some(h.parse::<u8>().map_err(|_| bad())?)
                }
                None if part == "fill" && !fill => fill = true,
                _ => return Err(bad()),
            }
        }
        let hot_pct = hot.unwrap_or(0);
        if mib_per_s == 0 || (hot.is_some() && !(1..=100).contains(&hot_pct)) {
            return Err(bad());
        }
        Ok(Workload::Dirty {
            mib_per_s,
            hot_pct,
            fill,
        })
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Workload::Idle => f.write_str("idle"),
            Workload::Fill => f.write_str("fill"),
            Workload::Mixed => f.write_str("mixed"),
            Workload::Dirty {
                mib_per_s,
                hot_pct,
                fill,
            } => {
                write!(f, "dirty:{mib_per_s}")?;
                if *hot_pct > 0 {
                    write!(f, ":hot={hot_pct}")?;
                }
                if *fill {
                    f.write_str(":fill")?;
                }
                Ok(())
            }
        }
    }
}

/// The layout part of `vmm_config`, so a target can refuse a layout it
/// would compute differently (a VMM version skew).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutConfig {
    /// GPA of the version table.
    pub table_gpa: u64,
    /// GPA of data page 0.
    pub data_gpa: u64,
    /// Number of data pages.
    pub data_pages: u64,
    /// Pages of the dirty hot set.
    pub hot_pages: u64,
}

impl From<&Layout> for LayoutConfig {
    fn from(l: &Layout) -> Self {
        LayoutConfig {
            table_gpa: l.table_gpa,
            data_gpa: l.data_gpa,
            data_pages: l.data_pages,
            hot_pages: l.hot_pages,
        }
    }
}

/// Everything the target VMM needs; sent as `VmSpec::vmm_config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmConfig {
    /// [`VMM_CONFIG_FORMAT`].
    pub format: u32,
    /// The workload, in its command-line form.
    pub workload: String,
    /// Guest RAM in bytes (one region at GPA 0).
    pub mem_bytes: u64,
    /// vCPUs (1 for now).
    pub vcpus: u32,
    /// Dirty workload: pages per batch (one exit per batch).
    pub batch_pages: u64,
    /// Whether the target VMM checks memory (hash + oracle) at restore.
    pub verify: bool,
    /// The memory layout.
    pub layout: LayoutConfig,
}

impl VmmConfig {
    /// A config for a new VM.
    pub fn new(
        workload: Workload,
        mem_bytes: u64,
        batch_pages: u64,
        verify: bool,
    ) -> Result<Self, ConfigError> {
        let layout = Layout::new(mem_bytes).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let cfg = VmmConfig {
            format: VMM_CONFIG_FORMAT,
            workload: workload.to_string(),
            mem_bytes,
            vcpus: 1,
            batch_pages,
            verify,
            layout: LayoutConfig::from(&layout),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses and checks a config received from ferryd.
    pub fn from_json(v: &serde_json::Value) -> Result<Self, ConfigError> {
        let cfg: VmmConfig =
            serde_json::from_value(v.clone()).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("VmmConfig serialises")
    }

    /// The parsed workload.
    pub fn workload(&self) -> Result<Workload, ConfigError> {
        self.workload.parse()
    }

    /// The layout, recomputed from `mem_bytes` and checked against the config.
    pub fn layout(&self) -> Result<Layout, ConfigError> {
        let layout =
            Layout::new(self.mem_bytes).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if LayoutConfig::from(&layout) != self.layout {
            return Err(ConfigError::Invalid(format!(
                "layout {:?} differs from this VMM's {:?} (version skew?)",
                self.layout,
                LayoutConfig::from(&layout)
            )));
        }
        Ok(layout)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.format != VMM_CONFIG_FORMAT {
            return Err(ConfigError::Invalid(format!(
                "format {} (this VMM reads format {VMM_CONFIG_FORMAT})",
                self.format
            )));
        }
        if self.vcpus != 1 {
            return Err(ConfigError::Invalid(format!(
                "{} vCPUs (only 1 is supported)",
                self.vcpus
            )));
        }
        if !(1..=BATCH_PAGES_MAX).contains(&self.batch_pages) {
            return Err(ConfigError::Invalid(format!(
                "batch of {} pages (1..={BATCH_PAGES_MAX})",
                self.batch_pages
            )));
        }
        self.workload()?;
        self.layout()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_round_trip() {
        for s in [
            "idle",
            "fill",
            "mixed",
            "dirty:64",
            "dirty:1:hot=90",
            "dirty:5:hot=100",
            "dirty:5:fill",
            "dirty:5:hot=10:fill",
        ] {
            assert_eq!(s.parse::<Workload>().unwrap().to_string(), s);
        }
        for s in [
            "",
            "busy",
            "dirty",
            "dirty:",
            "dirty:0",
            "dirty:-1",
            "dirty:5:hot=0",
            "dirty:5:fill:hot=3",
            "dirty:5:fill:fill",
            "dirty:5:hot=3:hot=4",
            "dirty:5:hot=101",
            "dirty:5:cold=3",
            "dirty:5:hot=x",
        ] {
            assert!(s.parse::<Workload>().is_err(), "{s}");
        }
    }

    #[test]
    fn config_round_trips_and_rejects_skew() {
        let c = VmmConfig::new(Workload::Mixed, 64 << 20, 16, true).unwrap();
        assert_eq!(VmmConfig::from_json(&c.to_json()).unwrap(), c);
        let mut j = c.to_json();
        j["layout"]["data_gpa"] = 0.into();
        assert!(VmmConfig::from_json(&j).is_err());
        let mut j = c.to_json();
        j["format"] = 99.into();
        assert!(VmmConfig::from_json(&j).is_err());
        assert!(VmmConfig::from_json(&serde_json::json!({"workload": "idle"})).is_err());
    }
}
