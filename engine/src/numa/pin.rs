//! Pinning the calling thread, and first-touch buffers.

use super::{CpuList, NumaError, Stage};

/// Pins the thread that calls [`Pinner::enter`] to one stage's CPUs.
#[derive(Clone, Debug)]
pub struct Pinner {
    pub(super) stage: Stage,
    pub(super) cpus: CpuList,
}

impl Pinner {
    /// Pins the calling thread (nothing when the stage is unpinned). A
    /// failure (a CPU taken offline, a cpuset that shrank) is logged and the
    /// thread runs unpinned: placement is an optimization, never a reason to
    /// fail a migration. Returns whether the thread is pinned.
    pub fn enter(&self) -> bool {
        if self.cpus.is_empty() {
            return false;
        }
        match pin_current_thread(self.cpus.as_slice()) {
            Ok(()) => {
                tracing::debug!("{} thread pinned to CPUs {}", self.stage.name(), self.cpus);
                true
            }
            Err(e) => {
                tracing::warn!("{} thread: {e}; running unpinned", self.stage.name());
                false
            }
        }
    }

    /// The CPUs it pins to (empty: none).
    pub fn cpus(&self) -> &CpuList {
        &self.cpus
    }
}

/// Restricts the calling thread to `cpus`: one CPU through `core_affinity`,
/// a set through `sched_setaffinity`.
pub fn pin_current_thread(cpus: &[usize]) -> Result<(), NumaError> {
    let err = |source: std::io::Error| NumaError::Affinity {
        op: "pin the thread to",
        cpus: CpuList::new(cpus.iter().copied()),
        source,
    };
    if let Some(&cpu) = cpus.iter().find(|&&c| c >= nix::sched::CpuSet::count()) {
        // core_affinity would abort the process on such an id (libc's
        // CPU_SET asserts its bound).
        return Err(err(std::io::Error::other(format!(
            "CPU {cpu} is beyond the {} a CPU set holds",
            nix::sched::CpuSet::count()
        ))));
    }
    if let [cpu] = cpus {
        if core_affinity::set_for_current(core_affinity::CoreId { id: *cpu }) {
            return Ok(());
        }
        return Err(err(std::io::Error::other(
            "core_affinity refused (no such CPU, or outside this process's cpuset)",
        )));
    }
    let mut set = nix::sched::CpuSet::new();
    for &c in cpus {
        set.set(c).map_err(|e| err(e.into()))?;
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(|e| err(e.into()))
}

/// The CPUs the calling thread may run on.
pub fn current_affinity() -> Result<CpuList, NumaError> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).map_err(|e| {
        NumaError::Affinity {
            op: "read the affinity of",
            cpus: CpuList::default(),
            source: e.into(),
        }
    })?;
    Ok(CpuList(
        (0..nix::sched::CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
    ))
}

/// A buffer of `bytes` capacity, every byte written once by the calling
/// thread, so its pages come from the node this thread runs on (the kernel
/// places an anonymous page where it is first touched). Returned empty.
pub fn touched_buffer(bytes: usize) -> Vec<u8> {
    let mut v = vec![0u8; bytes];
    // vec![0; n] may come from calloc's already-zero pages, never touched:
    // write them.
    v.fill(1);
    v.clear();
    v
}
