//! The control API over the real ferryd: socket mode, ping, VM and migration
//! endpoints, and how bad requests are refused.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};

use common::Ferryd;
use ferry_daemon::api::{ErrorBody, VmInfo};
use ferry_engine::Snapshot;

fn error_of(body: &[u8]) -> String {
    serde_json::from_slice::<ErrorBody>(body)
        .expect("error JSON")
        .error
}

#[test]
fn sockets_are_private_and_ping_answers() {
    let d = Ferryd::start();
    for s in [&d.socket, &d.link_socket] {
        let meta = std::fs::symlink_metadata(s).unwrap();
        assert!(meta.file_type().is_socket(), "{s:?}");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{s:?}");
    }
    assert_eq!(d.ping.pid, d.child.as_ref().unwrap().id());
    assert_eq!(d.ping.version, env!("CARGO_PKG_VERSION"));
    let port: u16 = d.listen().rsplit_once(':').unwrap().1.parse().unwrap();
    assert_ne!(port, 0, "ping reports the real port");
}

#[test]
fn empty_lists_and_unknown_names() {
    let d = Ferryd::start();
    let c = d.client();
    assert_eq!(
        c.request("GET", "/api/v1/vms", None).unwrap(),
        (200, b"[]".to_vec())
    );
    assert_eq!(
        c.request("GET", "/api/v1/migrations", None).unwrap(),
        (200, b"[]".to_vec())
    );
    for path in [
        "/api/v1/vms/nosuch",
        "/api/v1/migrations/abc",
        "/api/v1/nothing",
        "/other",
    ] {
        let (status, body) = c.request("GET", path, None).unwrap();
        assert_eq!(status, 404, "{path}");
        assert!(!error_of(&body).is_empty());
    }
    let (status, body) = c
        .request("POST", "/api/v1/migrations/abc/cancel", None)
        .unwrap();
    assert_eq!(status, 404);
    assert!(error_of(&body).contains("abc"));
    let (status, _) = c.request("DELETE", "/api/v1/vms", None).unwrap();
    assert_eq!(status, 405);
}

#[test]
fn migration_requests_are_validated() {
    let d = Ferryd::start();
    let c = d.client();
    let post = |body: &str| {
        c.request("POST", "/api/v1/migrations", Some(body.as_bytes()))
            .unwrap()
    };
    let (status, body) = post(r#"{"vm": "nosuch", "to": "127.0.0.1:1"}"#);
    assert_eq!(status, 404);
    assert!(error_of(&body).contains("nosuch"));
    for bad in [
        r#"{"vm": "v", "to": "127.0.0.1:1", "streams": 0}"#,
        r#"{"vm": "v", "to": "127.0.0.1:1", "streams": 65}"#,
        r#"{"vm": "v", "to": "127.0.0.1:1", "downtime_ms": 0}"#,
        r#"{"vm": "v", "to": "127.0.0.1:1", "downtime_ms": 60001}"#,
        r#"{"vm": "v", "to": "127.0.0.1:1", "bandwidth_mib_s": 0}"#,
        r#"{"vm": "v", "to": "127.0.0.1:1", "bandwidth_mib_s": -5}"#,
        r#"{"vm": "v", "to": "127.0.0.1:1", "streams": "four"}"#,
        r#"{"vm": "v", "to": "no-port"}"#,
        r#"{"vm": "v", "to": "127.0.0.1:1", "strems": 4}"#,
        r#"{"vm": "v", "to": "127.0.0.1:1", "transport": "udp"}"#,
        r#"{"vm": "v"}"#,
        r#"{"vm": "v", "#,
        "",
    ] {
        let (status, body) = post(bad);
        assert_eq!(status, 400, "{bad}");
        let msg = error_of(&body);
        assert!(!msg.is_empty() && !msg.contains('\n'), "{bad}: {msg}");
    }
    // rdma where this host (or this build) cannot run it: refused before
    // the VM is looked up, in one line that says why.
    let rdma = ferry_daemon::transports::TransportKind::Rdma;
    if let Err(why) = ferry_daemon::transports::get(rdma, &Default::default()) {
        let (status, body) = post(r#"{"vm": "v", "to": "127.0.0.1:1", "transport": "rdma"}"#);
        assert_eq!(status, 400);
        let msg = error_of(&body);
        assert_eq!(msg, format!("\"transport\": {why}"));
        assert!(!msg.contains('\n'), "{msg}");
    }
    let huge = format!(
        r#"{{"vm": "{}", "to": "127.0.0.1:1"}}"#,
        "x".repeat(100 << 10)
    );
    let (status, _) = post(&huge);
    assert_eq!(status, 413);
    // ferryd is still fine.
    assert_eq!(c.request("GET", "/api/v1/ping", None).unwrap().0, 200);
}

#[test]
fn registered_vm_lists_and_migration_failure_keeps_it_running() {
    let d = Ferryd::start();
    let vmm = common::FakeVmm::register(&d.link_socket, &common::spec("vm0", 2)).unwrap();
    let vm: VmInfo = d.client().get("/api/v1/vms/vm0").unwrap();
    assert_eq!((vm.mem_bytes, vm.vcpus, vm.epoch), (2 << 20, 1, 0));
    assert_eq!(vm.progress, Some(42));
    assert_eq!(vm.phase.as_deref(), Some("idle"));

    // Nothing listens on port 1: the migration fails and the VM stays.
    let (status, body) = d
        .client()
        .request(
            "POST",
            "/api/v1/migrations",
            Some(br#"{"vm": "vm0", "to": "127.0.0.1:1", "streams": 1}"#),
        )
        .unwrap();
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let id = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = std::time::Instant::now() + common::DEADLINE;
    let snap = loop {
        let s: Snapshot = d.client().get(&format!("/api/v1/migrations/{id}")).unwrap();
        if s.status.is_final() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "migration did not end: {s:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(snap.role, "source");
    assert!(snap.error.is_some(), "{snap:?}");
    let vm: VmInfo = d.client().get("/api/v1/vms/vm0").unwrap();
    assert_eq!(serde_json::to_value(vm.state).unwrap(), "running");
    let (status, _) = d
        .client()
        .request("POST", &format!("/api/v1/migrations/{id}/cancel"), None)
        .unwrap();
    assert_eq!(status, 409, "a final migration cannot be cancelled");
    let all: Vec<Snapshot> = d.client().get("/api/v1/migrations").unwrap();
    assert_eq!(all.len(), 1);
    drop(vmm);
}
