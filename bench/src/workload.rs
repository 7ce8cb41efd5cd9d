//! When a guest counts as warm. The workloads themselves, their syntax and
//! their phase names are ferry-vmm's own ([`ferry_vmm::config::Workload`],
//! [`ferry_vmm::guest::phase_name`]), so the two cannot drift apart.

use ferry_vmm::abi;
use ferry_vmm::guest::phase_name;

pub use ferry_vmm::config::Workload;

/// What to wait for before measuring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Warmup {
    /// Nothing to warm: settle briefly after the VM registered.
    Settle,
    /// Wait until the guest reports this phase.
    Phase(&'static str),
    /// Wait until the guest reports this phase, then `--warmup-s` more.
    PhaseThenDelay(&'static str),
}

/// The warm-up rule of a workload: fill and mixed guests are warm once
/// their pass is done and they idle; a dirty guest once its mixed pass is
/// done and it has dirtied for a while; an idle guest after a short settle.
pub fn warmup(w: Workload) -> Warmup {
    match w {
        Workload::Idle => Warmup::Settle,
        Workload::Fill | Workload::Mixed => Warmup::Phase(phase_name(abi::PHASE_IDLE)),
        Workload::Dirty { .. } => Warmup::PhaseThenDelay(phase_name(abi::PHASE_DIRTY)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_rules() {
        let w = |s: &str| warmup(s.parse().unwrap());
        assert_eq!(w("idle"), Warmup::Settle);
        assert_eq!(w("fill"), Warmup::Phase("idle"));
        assert_eq!(w("mixed"), Warmup::Phase("idle"));
        assert_eq!(w("dirty:50:hot=20"), Warmup::PhaseThenDelay("dirty"));
    }
}
