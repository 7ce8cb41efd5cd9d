//! Small helpers shared by the daemon's modules: poison-tolerant locks, ids,
//! name checks, thread spawning that survives panics, and child reaping.

use std::process::Child;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Locks `m`, recovering the data if a panicking thread poisoned it: every
/// table keeps its invariants between statements, so a panic elsewhere must
/// not take the daemon down with it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fresh random id: `bytes` random bytes as lower-case hex.
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    // The OS random source only fails on a system with no entropy source at
    // all; fall back to time + pid so an id is still unlikely to repeat.
    if getrandom::fill(&mut b).is_err() {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
            ^ u128::from(std::process::id());
        for (i, x) in b.iter_mut().enumerate() {
            *x = (seed >> ((i % 16) * 8)) as u8;
        }
    }
    hex::encode(b)
}

/// Longest VM name accepted (it becomes part of a log file name).
pub const VM_NAME_BYTES_MAX: usize = 64;

/// Checks a VM name from a VMM or a peer: 1..=64 of `[A-Za-z0-9._-]`, not
/// starting with `.` or `-`, so it is safe in a file name and a command line.
pub fn check_vm_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > VM_NAME_BYTES_MAX {
        return Err(format!(
            "VM name must be 1 to {VM_NAME_BYTES_MAX} characters, got {}",
            name.len()
        ));
    }
    if !name.chars().all(ok_char) || name.starts_with(['.', '-']) {
        return Err(format!(
            "VM name {name:?} may only hold letters, digits, '.', '_' and '-', and not start with '.' or '-'"
        ));
    }
    Ok(())
}

/// Spawns a named thread whose panic is caught and logged instead of
/// unwinding into nothing. Returns false (and logs) when the OS refuses a thread.
pub fn spawn_logged(name: String, f: impl FnOnce() + Send + 'static) -> bool {
    let label = name.clone();
    let r = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                tracing::error!("thread {label} panicked: {}", panic_message(&panic));
            }
        });
    match r {
        Ok(_) => true,
        Err(e) => {
            tracing::error!("cannot start thread {name}: {e}");
            false
        }
    }
}

/// The message of a caught panic, when it has one.
pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

/// How long a child VMM gets to exit by itself before it is killed.
pub const CHILD_GRACE: Duration = Duration::from_secs(5);

/// Reaps `child` in the background: waits up to `grace` for it to exit by
/// itself, then kills it. Never leaves a zombie.
pub fn reap(mut child: Child, what: String, grace: Duration) {
    let pid = child.id();
    let spawned = spawn_logged(format!("reap-{pid}"), move || {
        reap_now(&mut child, &what, grace)
    });
    if !spawned {
        tracing::error!("cannot reap process {pid}; it may stay a zombie");
    }
}

/// Like [`reap`], in the calling thread.
pub fn reap_now(child: &mut Child, what: &str, grace: Duration) {
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                tracing::info!("{what} (pid {}) exited: {status}", child.id());
                return;
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => break,
            Err(e) => {
                tracing::warn!("cannot wait for {what} (pid {}): {e}", child.id());
                break;
            }
        }
    }
    tracing::warn!(
        "{what} (pid {}) did not exit in {grace:?}; killing it",
        child.id()
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// Counts running threads of one kind so shutdown can wait for them.
#[derive(Debug, Default)]
pub struct WaitGroup {
    running: Mutex<usize>,
    idle: Condvar,
}

/// Held by a running thread; dropping it (even in a panic) counts the thread out.
#[derive(Debug)]
pub struct WaitGuard(Arc<WaitGroup>);

impl WaitGroup {
    /// Counts one more thread in (call before spawning it, move the guard in).
    pub fn enter(self: &Arc<Self>) -> WaitGuard {
        *lock(&self.running) += 1;
        WaitGuard(Arc::clone(self))
    }

    /// Waits until no thread is counted or `timeout` passes; returns how many remain.
    pub fn wait_idle(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut n = lock(&self.running);
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            n = self
                .idle
                .wait_timeout(n, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *n
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        let mut n = lock(&self.0.running);
        *n -= 1;
        self.0.idle.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names() {
        assert!(check_vm_name("vm0").is_ok());
        assert!(check_vm_name("a.b_c-d").is_ok());
        for bad in ["", ".x", "-x", "a/b", "a b", "../x", &"x".repeat(65)] {
            assert!(check_vm_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ids_are_hex() {
        let id = random_hex(8);
        assert_eq!(id.len(), 16);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(id, random_hex(8));
    }
}
