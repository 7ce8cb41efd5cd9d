//! Workloads of `ferry-bench policies`: ferry-vmm's own syntax, plus
//! `dirty:<F>x[:hot=<pct>]`, a dirty rate given as a multiple of the
//! bandwidth cap, so one list describes "slower than the link", "as fast"
//! and "faster" whatever the cap.

use std::fmt;
use std::str::FromStr;

use crate::workload::Workload;

/// Largest multiple of the bandwidth cap a relative rate may name: far past
/// any useful experiment, and small enough that the product stays exact.
const FACTOR_MAX: f64 = 1000.0;

/// One entry of `--workloads`.
#[derive(Clone, Debug, PartialEq)]
pub enum WorkloadSpec {
    /// A workload as ferry-vmm spells it (`idle`, `dirty:50:hot=10`, ...).
    Literal(Workload),
    /// `dirty:<factor>x[:hot=<pct>]`: dirty at `factor` times the cap.
    Relative {
        /// Multiple of the bandwidth cap, > 0.
        factor: f64,
        /// Share of writes into the hot set, as in ferry-vmm (0: uniform).
        hot_pct: u8,
        /// `:fill`: incompressible pages, as in ferry-vmm.
        fill: bool,
    },
}

impl FromStr for WorkloadSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let relative = s.strip_prefix("dirty:").and_then(|rest| {
            let (rate, tail) = rest.find(':').map_or((rest, ""), |i| rest.split_at(i));
            rate.strip_suffix('x').map(|f| (f, tail))
        });
        let Some((factor, tail)) = relative else {
            return s
                .parse::<Workload>()
                .map(WorkloadSpec::Literal)
                .map_err(|e| {
                    format!("{e} (or dirty:<F>x[:hot=<pct>], F a multiple of --bandwidth-mib-s)")
                });
        };
        let factor: f64 = factor
            .parse()
            .map_err(|_| format!("{s:?}: {factor:?} is not a number"))?;
        if !(factor > 0.0 && factor <= FACTOR_MAX) {
            return Err(format!(
                "{s:?}: the multiple must be above 0 and at most {FACTOR_MAX}"
            ));
        }
        // The hot part in ferry-vmm's own syntax, checked by its parser.
        let (hot_pct, fill) = match format!("dirty:1{tail}").parse::<Workload>() {
            Ok(Workload::Dirty { hot_pct, fill, .. }) => (hot_pct, fill),
            _ => return Err(format!("{s:?}: expected dirty:<F>x[:hot=<1..100>][:fill]")),
        };
        Ok(WorkloadSpec::Relative {
            factor,
            hot_pct,
            fill,
        })
    }
}

impl fmt::Display for WorkloadSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkloadSpec::Literal(w) => write!(f, "{w}"),
            WorkloadSpec::Relative {
                factor,
                hot_pct,
                fill,
            } => {
                write!(f, "dirty:{factor}x")?;
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

impl WorkloadSpec {
    /// The workload the guest runs under a cap of `bandwidth_mib_s`: a
    /// relative rate becomes `round(factor x cap)` MiB/s, which must be at
    /// least 1.
    pub fn resolve(&self, bandwidth_mib_s: u64) -> Result<Workload, String> {
        match *self {
            WorkloadSpec::Literal(w) => Ok(w),
            WorkloadSpec::Relative {
                factor,
                hot_pct,
                fill,
            } => {
                let mib_s = (factor * bandwidth_mib_s as f64).round();
                if mib_s < 1.0 || mib_s > f64::from(u32::MAX) {
                    return Err(format!(
                        "{self} of {bandwidth_mib_s} MiB/s is {mib_s} MiB/s, \
                         outside 1..={} MiB/s",
                        u32::MAX
                    ));
                }
                Ok(Workload::Dirty {
                    mib_per_s: mib_s as u32,
                    hot_pct,
                    fill,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> WorkloadSpec {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn relative_rates_resolve_against_the_cap() {
        let cases = [
            ("dirty:0.5x", 64, "dirty:32"),
            ("dirty:1x", 64, "dirty:64"),
            ("dirty:1.5x", 64, "dirty:96"),
            ("dirty:3x", 64, "dirty:192"),
            ("dirty:1.5x:hot=90", 64, "dirty:96:hot=90"),
            ("dirty:3x:fill", 64, "dirty:192:fill"),
            ("dirty:1x:hot=90:fill", 64, "dirty:64:hot=90:fill"),
            ("dirty:0.33x", 100, "dirty:33"),
            // Rounded to the nearest MiB/s.
            ("dirty:0.5x", 3, "dirty:2"),
        ];
        for (s, cap, want) in cases {
            let w = spec(s).resolve(cap).unwrap();
            assert_eq!(w.to_string(), want, "{s} at {cap}");
            // The label reads as written.
            assert_eq!(spec(s).to_string(), s);
        }
    }

    #[test]
    fn literal_workloads_pass_through() {
        for s in [
            "idle",
            "fill",
            "mixed",
            "dirty:50",
            "dirty:50:hot=10",
            "dirty:5:fill",
        ] {
            assert_eq!(spec(s), WorkloadSpec::Literal(s.parse().unwrap()));
            assert_eq!(spec(s).resolve(64).unwrap().to_string(), s);
            assert_eq!(spec(s).to_string(), s);
        }
    }

    #[test]
    fn rejects_bad_specs() {
        for bad in [
            "dirty:x",
            "dirty:0x",
            "dirty:-1x",
            "dirty:nanx",
            "dirty:infx",
            "dirty:1001x",
            "dirty:1x:hot=0",
            "dirty:1x:hot=101",
            "dirty:1x:cold=5",
            "dirty:1x:",
            "dirty:1x:fill:fill",
            "dirty:1x:fill:hot=5",
            "dirty:1.5",
            "spin",
            "",
        ] {
            assert!(bad.parse::<WorkloadSpec>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn a_rate_that_rounds_to_nothing_is_refused() {
        let e = spec("dirty:0.1x").resolve(4).unwrap_err();
        assert!(e.contains("0 MiB/s"), "{e}");
        assert_eq!(
            spec("dirty:0.1x").resolve(10).unwrap().to_string(),
            "dirty:1"
        );
    }
}
