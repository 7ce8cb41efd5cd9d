//! What the experiment runners (`policies`, `compare`) share: checking their
//! lists and rewriting their JSON as they go.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// The first entry of `v` that an earlier one equals.
pub fn first_duplicate<T: PartialEq + std::fmt::Display>(v: &[T]) -> Option<&T> {
    v.iter()
        .enumerate()
        .find(|(i, x)| v[..*i].contains(x))
        .map(|(_, x)| x)
}

/// Checks an experiment's `--warmup-s` (0 to 3600 s).
pub fn check_warmup_s(warmup_s: f64) -> Result<()> {
    if !(0.0..=3600.0).contains(&warmup_s) {
        bail!("--warmup-s must be between 0 and 3600, not {warmup_s}");
    }
    Ok(())
}

/// Rewrites `dir/name` with `value` as pretty JSON, through a temporary file,
/// so a reader never sees half of one.
pub fn write_json(dir: &Path, name: &str, value: &impl Serialize) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let text = serde_json::to_string_pretty(value).context("cannot encode the experiment")?;
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_repeat() {
        assert_eq!(first_duplicate(&[1, 2, 3]), None);
        assert_eq!(first_duplicate(&[1, 2, 1, 2]), Some(&1));
        let none: [u8; 0] = [];
        assert_eq!(first_duplicate(&none), None);
    }
}
