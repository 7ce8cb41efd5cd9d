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
//!
//! A VM with a disk adds the image's size and the guest's write window, and
//! its disk version table in the layout (configs without them still parse):
//!
//! ```json
//! {"format":1,"workload":"fill+disk:20", ...,
//!  "layout":{..,"disk_table_gpa":1114112,"disk_table_blocks":15360},
//!  "disk":{"bytes":67108864,"window_first_block":1024}}
//! ```
//!
//! Workload strings: `<memory workload>[+disk:<MiB/s>]` or `disk:<MiB/s>`
//! (memory idle). The memory part is a [`Workload`]; the disk part a
//! [`DiskWorkload`]; together a [`GuestWorkload`].

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;

use ferry_engine::link::{DiskSpec, DISK_BLOCK_BYTES};
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
    /// A workload string with its disk part does not parse.
    #[error(
        "invalid workload {0:?}: expected <memory>[+disk:<MiB/s>] or disk:<MiB/s>, where \
         <memory> is idle, fill, mixed, or dirty:<MiB/s>[:hot=<pct>][:fill] \
         (MiB/s > 0, 0 < pct <= 100)"
    )]
    GuestWorkload(String),
    /// The workload writes to a disk the VM does not have.
    #[error("workload {workload:?} writes to a disk, but the VM has none (give one with --disk)")]
    NoDisk {
        /// The workload.
        workload: String,
    },
    /// The disk or its write window is unusable.
    #[error("invalid disk: {0}")]
    Disk(String),
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

/// The disk part of a workload: stamped block writes at a paced rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskWorkload {
    /// Rate in MiB/s of whole blocks: `mib_per_s * 256` block writes per
    /// second (blocks x 4 KiB), the rate of blocks the disk log reports. A
    /// rewrite changes a block's header and one 256-byte slot, like a page.
    pub mib_per_s: NonZeroU32,
}

impl DiskWorkload {
    /// Block writes per second.
    pub fn blocks_per_s(&self) -> u64 {
        u64::from(self.mib_per_s.get()) * ((1 << 20) / DISK_BLOCK_BYTES)
    }
}

/// Everything the guest does: a memory workload and, optionally, a disk one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestWorkload {
    /// What the guest does with its memory.
    pub memory: Workload,
    /// Stamped disk writes, if any.
    pub disk: Option<DiskWorkload>,
}

impl From<Workload> for GuestWorkload {
    fn from(memory: Workload) -> Self {
        GuestWorkload { memory, disk: None }
    }
}

impl FromStr for GuestWorkload {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::GuestWorkload(s.to_string());
        let (memory, disk) = match s.rsplit_once('+') {
            Some((memory, disk)) => (memory.parse().map_err(|_| bad())?, Some(disk)),
            None if s.starts_with("disk:") => (Workload::Idle, Some(s)),
            None => (s.parse().map_err(|_| bad())?, None),
        };
        let disk = match disk {
            None => None,
            Some(d) => {
                let rate = d.strip_prefix("disk:").ok_or_else(bad)?;
                // Digits only: no sign, no spaces.
                if rate.is_empty() || !rate.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                let mib_per_s = rate.parse::<NonZeroU32>().map_err(|_| bad())?;
                Some(DiskWorkload { mib_per_s })
            }
        };
        Ok(GuestWorkload { memory, disk })
    }
}

impl fmt::Display for GuestWorkload {
    /// The canonical form: `disk:R` for an idle memory with a disk part.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.memory, self.disk) {
            (m, None) => write!(f, "{m}"),
            (Workload::Idle, Some(d)) => write!(f, "disk:{}", d.mib_per_s),
            (m, Some(d)) => write!(f, "{m}+disk:{}", d.mib_per_s),
        }
    }
}

/// The disk part of `vmm_config`: the image's size and where the guest's
/// stamped writes go. The target's image must have the same size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Size of the image in bytes (a non-zero multiple of 4 KiB).
    pub bytes: u64,
    /// First block the guest writes; the window runs to the end of the disk,
    /// and blocks before it (a file system, say) stay untouched.
    pub window_first_block: u64,
}

impl DiskConfig {
    /// A disk of `bytes` whose guest writes start at `write_from_mib` MiB.
    pub fn new(bytes: u64, write_from_mib: u64) -> Result<Self, ConfigError> {
        let window_first_block = write_from_mib
            .checked_mul((1 << 20) / DISK_BLOCK_BYTES)
            .ok_or_else(|| ConfigError::Disk(format!("write window at {write_from_mib} MiB")))?;
        let cfg = DiskConfig {
            bytes,
            window_first_block,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Blocks of the disk.
    pub fn blocks(&self) -> u64 {
        self.bytes / DISK_BLOCK_BYTES
    }

    /// Blocks of the guest's write window.
    pub fn window_blocks(&self) -> u64 {
        self.blocks() - self.window_first_block
    }

    /// The disk as ferry sees it.
    pub fn spec(&self) -> DiskSpec {
        DiskSpec { bytes: self.bytes }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.spec().validate().map_err(ConfigError::Disk)?;
        if self.window_first_block >= self.blocks() {
            return Err(ConfigError::Disk(format!(
                "the write window starts at block {} ({} MiB), but the disk has {} blocks \
                 ({} MiB): nothing is left to write",
                self.window_first_block,
                (self.window_first_block * DISK_BLOCK_BYTES) >> 20,
                self.blocks(),
                self.bytes >> 20
            )));
        }
        Ok(())
    }
}

/// The layout part of `vmm_config`, so a target can refuse a layout it
/// would compute differently (a VMM version skew).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutConfig {
    /// GPA of the version table.
    pub table_gpa: u64,
    /// GPA of the disk version table (0: none; absent from old configs).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub disk_table_gpa: u64,
    /// Entries of the disk version table (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub disk_table_blocks: u64,
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
            disk_table_gpa: l.disk_table_gpa,
            disk_table_blocks: l.disk_table_blocks,
            data_gpa: l.data_gpa,
            data_pages: l.data_pages,
            hot_pages: l.hot_pages,
        }
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Everything the target VMM needs; sent as `VmSpec::vmm_config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmConfig {
    /// [`VMM_CONFIG_FORMAT`].
    pub format: u32,
    /// The workload ([`GuestWorkload`]), in its command-line form.
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
    /// The disk, if the VM has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskConfig>,
}

impl VmmConfig {
    /// A config for a new VM without a disk.
    pub fn new(
        workload: impl Into<GuestWorkload>,
        mem_bytes: u64,
        batch_pages: u64,
        verify: bool,
    ) -> Result<Self, ConfigError> {
        Self::with_disk(workload, mem_bytes, batch_pages, verify, None)
    }

    /// A config for a new VM, with a disk or without.
    pub fn with_disk(
        workload: impl Into<GuestWorkload>,
        mem_bytes: u64,
        batch_pages: u64,
        verify: bool,
        disk: Option<DiskConfig>,
    ) -> Result<Self, ConfigError> {
        let workload = workload.into();
        let layout = layout_of(mem_bytes, &workload, disk.as_ref())?;
        let cfg = VmmConfig {
            format: VMM_CONFIG_FORMAT,
            workload: workload.to_string(),
            mem_bytes,
            vcpus: 1,
            batch_pages,
            verify,
            layout: LayoutConfig::from(&layout),
            disk,
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
    pub fn workload(&self) -> Result<GuestWorkload, ConfigError> {
        self.workload.parse()
    }

    /// The layout, recomputed from `mem_bytes`, the workload and the disk,
    /// and checked against the config.
    pub fn layout(&self) -> Result<Layout, ConfigError> {
        let layout = layout_of(self.mem_bytes, &self.workload()?, self.disk.as_ref())?;
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
        let workload = self.workload()?;
        match (&self.disk, workload.disk) {
            (None, Some(_)) => {
                return Err(ConfigError::NoDisk {
                    workload: self.workload.clone(),
                })
            }
            (Some(disk), _) => disk.validate()?,
            (None, None) => {}
        }
        self.layout()?;
        Ok(())
    }
}

/// The layout for a workload: a disk workload needs a version table entry
/// per block of its window.
fn layout_of(
    mem_bytes: u64,
    workload: &GuestWorkload,
    disk: Option<&DiskConfig>,
) -> Result<Layout, ConfigError> {
    let table_blocks = match (workload.disk, disk) {
        (Some(_), Some(d)) => d.window_blocks(),
        (Some(_), None) => {
            return Err(ConfigError::NoDisk {
                workload: workload.to_string(),
            })
        }
        (None, _) => 0,
    };
    Layout::with_disk_table(mem_bytes, table_blocks)
        .map_err(|e| ConfigError::Invalid(e.to_string()))
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

    #[test]
    fn guest_workloads_round_trip() {
        for s in [
            "idle",
            "fill",
            "dirty:5:hot=10:fill",
            "disk:20",
            "fill+disk:20",
            "mixed+disk:1",
            "dirty:64:hot=80+disk:3",
            "dirty:5:fill+disk:4294967295",
        ] {
            let w: GuestWorkload = s.parse().unwrap();
            assert_eq!(w.to_string(), s);
        }
        let w: GuestWorkload = "disk:20".parse().unwrap();
        assert_eq!(w.memory, Workload::Idle);
        assert_eq!(w.disk.unwrap().blocks_per_s(), 20 * 256);
        assert_eq!(
            "idle+disk:5".parse::<GuestWorkload>().unwrap().to_string(),
            "disk:5",
            "an idle memory part is left out"
        );
        assert_eq!(
            "fill".parse::<GuestWorkload>().unwrap(),
            GuestWorkload::from(Workload::Fill)
        );
        for s in [
            "",
            "disk",
            "disk:",
            "disk:0",
            "disk:-1",
            "disk:+1",
            "disk: 1",
            "disk:1x",
            "disk:4294967296",
            "disk:5:hot=3",
            "fill+",
            "+disk:3",
            "fill+disk:0",
            "fill+disk",
            "fill+dsk:3",
            "fill+disk:3+disk:4",
            "disk:3+fill",
            "disk:3+disk:3",
            "bogus+disk:3",
            "dirty:0+disk:3",
        ] {
            let e = s.parse::<GuestWorkload>().unwrap_err();
            assert!(
                e.to_string().contains("+disk:<MiB/s>"),
                "{s:?}: the message shows the grammar: {e}"
            );
        }
    }

    #[test]
    fn old_configs_still_parse_to_the_same_layout() {
        let old = serde_json::json!({
            "format": 1, "workload": "dirty:64:hot=80", "mem_bytes": 134217728, "vcpus": 1,
            "batch_pages": 16, "verify": true,
            "layout": {"table_gpa": 1048576, "data_gpa": 2097152, "data_pages": 32256,
                       "hot_pages": 3225}
        });
        let c = VmmConfig::from_json(&old).unwrap();
        assert_eq!(c.disk, None);
        assert_eq!(c.layout().unwrap(), Layout::new(128 << 20).unwrap());
        // And a config without a disk serialises as before.
        assert_eq!(c.to_json(), old);
    }

    #[test]
    fn a_disk_workload_needs_a_disk_and_a_window() {
        let w: GuestWorkload = "fill+disk:20".parse().unwrap();
        let e = VmmConfig::with_disk(w, 64 << 20, 16, true, None).unwrap_err();
        assert!(matches!(e, ConfigError::NoDisk { .. }), "{e}");
        assert!(e.to_string().contains("--disk"), "{e}");

        let disk = DiskConfig::new(64 << 20, 8).unwrap();
        assert_eq!(disk.window_first_block, 8 * 256);
        assert_eq!(disk.window_blocks(), 56 * 256);
        let c = VmmConfig::with_disk(w, 64 << 20, 16, true, Some(disk.clone())).unwrap();
        let l = c.layout().unwrap();
        assert_eq!(l.disk_table_blocks, 56 * 256);
        assert_ne!(l.disk_table_gpa, 0);
        assert_eq!(VmmConfig::from_json(&c.to_json()).unwrap(), c);
        assert_eq!(c.to_json()["disk"]["bytes"], 64 << 20);

        // A disk without a disk workload: no table, the old layout.
        let c = VmmConfig::with_disk(Workload::Fill, 64 << 20, 16, true, Some(disk)).unwrap();
        assert_eq!(c.layout().unwrap(), Layout::new(64 << 20).unwrap());

        // A received config whose disk was dropped, or whose table differs.
        let good = VmmConfig::with_disk(
            w,
            64 << 20,
            16,
            true,
            Some(DiskConfig::new(64 << 20, 0).unwrap()),
        )
        .unwrap()
        .to_json();
        let mut j = good.clone();
        j.as_object_mut().unwrap().remove("disk");
        assert!(matches!(
            VmmConfig::from_json(&j),
            Err(ConfigError::NoDisk { .. })
        ));
        let mut j = good.clone();
        j["disk"]["window_first_block"] = 256.into();
        assert!(VmmConfig::from_json(&j).is_err(), "layout skew");
        let mut j = good;
        j["disk"]["bytes"] = 4095.into();
        assert!(VmmConfig::from_json(&j).is_err());
    }

    #[test]
    fn disk_sizes_and_windows_are_checked() {
        assert!(DiskConfig::new(4096, 0).is_ok());
        for (bytes, from_mib) in [
            (0, 0),
            (4095, 0),
            ((1 << 20) + 1, 0),
            (1 << 20, 1),
            (1 << 20, 2),
            (8 << 20, u64::MAX),
            (ferry_engine::link::DISK_BYTES_MAX + 4096, 0),
        ] {
            let e = DiskConfig::new(bytes, from_mib).unwrap_err();
            assert!(matches!(e, ConfigError::Disk(_)), "{bytes} {from_mib}: {e}");
        }
        // A window too big for the RAM's layout is refused when the config is made.
        let w: GuestWorkload = "disk:1".parse().unwrap();
        let disk = DiskConfig::new(16 << 30, 0).unwrap();
        let e = VmmConfig::with_disk(w, 4 << 20, 16, true, Some(disk)).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
    }
}
