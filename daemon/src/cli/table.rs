//! Plain-text tables of `ferry vm list` and `ferry status`.

use ferry_engine::Snapshot;

use super::follow::mib;
use crate::api::VmInfo;
use crate::migrations::status_name;

/// Formats rows as left-aligned columns two spaces apart.
fn columns(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `ferry vm list`: NAME STATE MEM EPOCH PROGRESS.
pub fn vms(vms: &[VmInfo]) -> String {
    let mut rows = vec![["NAME", "STATE", "MEM", "EPOCH", "PROGRESS"]
        .map(String::from)
        .to_vec()];
    for v in vms {
        let state = serde_json::to_value(v.state)
            .ok()
            .and_then(|s| s.as_str().map(String::from));
        rows.push(vec![
            v.name.clone(),
            state.unwrap_or_default(),
            mem(v.mem_bytes),
            v.epoch.to_string(),
            v.progress.map_or_else(|| "-".into(), |p| p.to_string()),
        ]);
    }
    columns(&rows)
}

/// `ferry status`: one row per migration.
pub fn migrations(all: &[Snapshot]) -> String {
    let head = [
        "ID", "VM", "ROLE", "STATUS", "ROUND", "SENT", "TIME", "PEER",
    ];
    let mut rows = vec![head.map(String::from).to_vec()];
    for s in all {
        rows.push(vec![
            s.id.clone(),
            s.vm.clone(),
            s.role.clone(),
            status_name(s.status),
            s.iterations.to_string(),
            mib(s.transferred_bytes),
            format!("{:.1}s", s.total_time_ms as f64 / 1000.0),
            s.peer.clone(),
        ]);
    }
    columns(&rows)
}

/// Guest RAM in MiB or GiB, whichever reads better ("-" when unknown).
fn mem(bytes: u64) -> String {
    const GIB: u64 = 1 << 30;
    match bytes {
        0 => "-".into(),
        b if b >= GIB && b % GIB == 0 => format!("{} GiB", b / GIB),
        b => format!("{} MiB", b >> 20),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::VmState;

    #[test]
    fn vm_table() {
        let v = VmInfo {
            id: "1".into(),
            name: "vm0".into(),
            mem_bytes: 2 << 30,
            vcpus: 2,
            state: VmState::MigratedAway,
            epoch: 3,
            progress: None,
            phase: None,
            migration: None,
        };
        let t = vms(&[v]);
        assert_eq!(
            t,
            "NAME  STATE          MEM    EPOCH  PROGRESS\nvm0   migrated-away  2 GiB  3      -\n"
        );
    }
}
