//! Incoming migrations the previous ferryd died in while it started the
//! guest: their last record in `concluded.jsonl` is `committing`, so the
//! guest may run here or not, and only its VMM can say. Until one of these
//! settles it, a source that asks is told BUSY (and keeps its VM paused):
//!
//! ```text
//!  the recorded VMM registers again (Reattach,     completed: the source hands the
//!    same pid), running, with all its memory         VM off; it is listed here
//!  the recorded VMM process is gone (or a zombie)  fenced: its guest is stopped for
//!                                                    good, the source takes the VM back
//!  it registers again paused, or as a post-copy    left in doubt, listed here paused:
//!    still waiting for pages; or no VMM recorded     the operator decides
//! ```
//!
//! A pre-copy target VMM keeps its guest running when its ferryd dies and
//! registers again with the next one; a post-copy one under a lease exits
//! at once (nobody renews the lease), so the source gets `fenced` and takes
//! the VM back from its last checkpoint as soon as this ferryd is up,
//! instead of after the grace period. The VMM is known by its pid and its
//! start time (`crate::concluded::Vmm`), noted when ferryd started it and
//! written with the `committing` record; a VMM started through a wrapper
//! that forks (rather than execs) is never matched and stays in doubt.

use std::sync::Arc;
use std::time::Duration;

use ferry_engine::wire::Conclusion;

use crate::concluded::Vmm;
use crate::daemon::Daemon;

/// How often a watcher looks at its VMM.
const WATCH_EVERY: Duration = Duration::from_millis(100);

/// At start: watches the VMM of each migration in doubt, and settles it
/// `fenced` when the VMM is gone.
pub fn start(d: &Arc<Daemon>) {
    for (id, epoch) in d.resumes.in_doubt() {
        let Some(vmm) = d.conclusions.vmm_of(&id) else {
            tracing::warn!(
                "migration {id}: the previous ferryd died while starting its guest and recorded \
                 no VMM for it; it stays in doubt (the source keeps the VM paused)"
            );
            continue;
        };
        tracing::warn!(
            "migration {id}: the previous ferryd died while starting VM {} (epoch {epoch}) in \
             VMM pid {}; waiting for that VMM to register again",
            vmm.vm,
            vmm.pid
        );
        let d2 = Arc::clone(d);
        crate::util::spawn_logged(format!("indoubt-{}", &id[..id.len().min(8)]), move || {
            watch(&d2, &id, &vmm)
        });
    }
}

fn in_doubt(d: &Daemon, id: &str) -> bool {
    d.resumes.in_doubt().iter().any(|(i, _)| i == id)
}

/// Until migration `id` settles: when its VMM is gone, settles it `fenced`.
fn watch(d: &Daemon, id: &str, vmm: &Vmm) {
    while !d.is_shutting_down() && in_doubt(d, id) {
        if !vmm.alive() {
            match d.resumes.settle(id, Conclusion::Fenced) {
                Ok(true) => tracing::warn!(
                    "migration {id}: VMM pid {} of VM {} is gone: its guest is stopped for good \
                     (fenced); the source takes the VM back",
                    vmm.pid,
                    vmm.vm
                ),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!("migration {id}: cannot record that it is fenced: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            }
            return;
        }
        std::thread::sleep(WATCH_EVERY);
    }
}

/// What a VMM registering again has to do with a migration in doubt.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// None: an ordinary VM registering again.
    None,
    /// It runs the guest of migration `id` with all its memory: once it is
    /// registered, [`settle_completed`] (it runs with `epoch`).
    Completed {
        /// The migration.
        id: String,
        /// The epoch its COMMIT gave.
        epoch: u64,
    },
    /// It holds the guest of migration `id` but cannot be called migrated
    /// (paused, or post-copy memory still missing): registered as it is,
    /// nothing resumed, the migration left in doubt.
    Hold {
        /// The migration.
        id: String,
    },
}

/// VM `name` registers again from process `pid`: is it the VMM of a
/// migration in doubt?
pub fn claim(d: &Daemon, name: &str, pid: Option<i32>, paused: bool, postcopy: bool) -> Claim {
    let Some(pid) = pid else {
        return Claim::None;
    };
    for (id, epoch) in d.resumes.in_doubt() {
        let Some(vmm) = d.conclusions.vmm_of(&id) else {
            continue;
        };
        if vmm.vm != name || vmm.pid != pid || !vmm.alive() {
            continue;
        }
        if paused || postcopy {
            tracing::warn!(
                "migration {id}: VM {name} came back {} from the VMM the previous ferryd was \
                 starting it in; the migration stays in doubt (the source keeps its copy \
                 paused): the operator decides",
                if postcopy {
                    "with post-copy memory still missing"
                } else {
                    "paused"
                }
            );
            return Claim::Hold { id };
        }
        return Claim::Completed { id, epoch };
    }
    Claim::None
}

/// The VM of migration `id`, in doubt, registered again running: the
/// migration completed here.
pub fn settle_completed(d: &Daemon, id: &str, name: &str, epoch: u64) {
    match d.resumes.settle(id, Conclusion::Completed { epoch }) {
        Ok(true) => tracing::info!(
            "migration {id}: VM {name} runs here (epoch {epoch}); the source hands it off when \
             it asks"
        ),
        Ok(false) => {}
        Err(e) => tracing::error!(
            "migration {id}: VM {name} runs here but that cannot be recorded ({e}); the migration \
             stays in doubt (the source keeps its copy paused)"
        ),
    }
}
