//! The convergence policies a migration can ask ferryd for, by the names
//! ferryd's API takes (`MigrateRequest::policy`); `ferry_engine::policy`
//! defines them.

use clap::ValueEnum;
use serde::Serialize;

/// A convergence policy. ferry-bench passes the name through; the engine
/// decides what it means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// QEMU's rule: stop when the rest fits the downtime budget; give up at
    /// the round or time limit.
    Baseline,
    /// Memory pattern: stop early, within `downtime_max_ms`, once the guest
    /// is memory-intensive.
    Mp,
    /// Hold pages dirtied at two consecutive syncs back for the final round.
    HotDefer,
    /// Stop iterating fragments whose dirty count stopped shrinking.
    Fragment,
    /// Throttle the vCPUs of a memory-intensive guest.
    AutoConverge,
    /// hot-defer and fragments, mp's early stop, throttling as a last resort.
    Adaptive,
}

impl Policy {
    /// Every policy, in the order of the API docs.
    pub const ALL: [Policy; 6] = [
        Policy::Baseline,
        Policy::Mp,
        Policy::HotDefer,
        Policy::Fragment,
        Policy::AutoConverge,
        Policy::Adaptive,
    ];

    /// The name ferryd's API takes.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Baseline => "baseline",
            Policy::Mp => "mp",
            Policy::HotDefer => "hot-defer",
            Policy::Fragment => "fragment",
            Policy::AutoConverge => "auto-converge",
            Policy::Adaptive => "adaptive",
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_clap_and_serde() {
        for p in Policy::ALL {
            let clap_name = p.to_possible_value().map(|v| v.get_name().to_owned());
            assert_eq!(clap_name.as_deref(), Some(p.name()));
            assert_eq!(serde_json::to_value(p).unwrap(), p.name());
            assert_eq!(Policy::from_str(p.name(), false), Ok(p));
        }
        assert!(Policy::from_str("fastest", false).is_err());
    }
}
