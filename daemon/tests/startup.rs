//! ferryd's start-up checks and shutdown.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{run_with_deadline, stderr, Ferryd, Opts, TempDir, FERRYD};

#[test]
fn refuses_to_start_without_a_usable_key() {
    let dir = TempDir::new("nokey");
    let state = dir.path().to_str().unwrap();
    let o = run_with_deadline(std::process::Command::new(FERRYD).args(["--state-dir", state]));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--key-file"), "{}", stderr(&o));

    let missing = dir.path().join("missing");
    let o = run_with_deadline(
        std::process::Command::new(FERRYD)
            .args(["--state-dir", state, "--key-file"])
            .arg(&missing),
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("cannot read key file"),
        "{}",
        stderr(&o)
    );

    let bad = dir.path().join("bad");
    std::fs::write(&bad, "not a key\n").unwrap();
    let o = run_with_deadline(
        std::process::Command::new(FERRYD)
            .args(["--state-dir", state, "--key-file"])
            .arg(&bad),
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("64 hex digits"), "{}", stderr(&o));
    assert!(!dir.path().join("ferryd.sock").exists());
}

#[test]
fn warns_about_a_readable_key_and_stops_cleanly() {
    let keydir = TempDir::new("lax");
    let key = common::write_key(keydir.path());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut d = Ferryd::start_with(Opts {
        key: Some(key),
        ..Opts::default()
    });
    d.wait_log(&["WARN", "readable by group or others"]);
    let status = d.stop().expect("ferryd stops on SIGTERM");
    assert!(status.success(), "{status}");
    assert!(
        !d.socket.exists() && !d.link_socket.exists(),
        "sockets removed"
    );
    d.wait_log(&["ferryd stopped"]);
}

#[test]
fn config_file_and_stale_sockets() {
    let dir = TempDir::new("cfg");
    let key = common::write_key(dir.path());
    let state = dir.path().join("state");
    let cfg = dir.path().join("ferryd.json");
    std::fs::write(
        &cfg,
        serde_json::json!({
            "state_dir": state,
            "key_file": key,
            "listen": "127.0.0.1:0",
            "control_socket": dir.path().join("ctl.sock"),
        })
        .to_string(),
    )
    .unwrap();
    // A stale socket file from a crashed ferryd is replaced.
    drop(std::os::unix::net::UnixListener::bind(dir.path().join("ctl.sock")).unwrap());
    let mut child = std::process::Command::new(FERRYD)
        .arg("--config")
        .arg(&cfg)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = ferry_daemon::client::Client::new(&dir.path().join("ctl.sock"));
    let deadline = std::time::Instant::now() + common::DEADLINE;
    let ping = loop {
        if let Ok(p) = client.get::<ferry_daemon::api::Ping>("/api/v1/ping") {
            break p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ferryd did not start from its config file"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(ping.listen.starts_with("127.0.0.1:"));
    assert!(
        state.join("link.sock").exists(),
        "link socket under the config's state_dir"
    );
    // A second ferryd on the same sockets refuses to start.
    let o = run_with_deadline(std::process::Command::new(FERRYD).arg("--config").arg(&cfg));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("another ferryd"), "{}", stderr(&o));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_busy_data_port_fails_cleanly() {
    let dir = TempDir::new("busy");
    let key = common::write_key(dir.path());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let o = run_with_deadline(
        std::process::Command::new(FERRYD)
            .arg("--state-dir")
            .arg(dir.path())
            .arg("--key-file")
            .arg(&key)
            .args(["--listen", &addr]),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains(&addr), "{}", stderr(&o));
    assert!(
        !dir.path().join("ferryd.sock").exists(),
        "no socket left behind"
    );
    assert!(
        !dir.path().join("link.sock").exists(),
        "no socket left behind"
    );
}

#[test]
fn rdma_settings_are_checked_and_an_unusable_rdma_is_one_line() {
    let dir = TempDir::new("rdma");
    let key = common::write_key(dir.path());
    let ferryd = |extra: &[&str]| {
        run_with_deadline(
            std::process::Command::new(FERRYD)
                .arg("--state-dir")
                .arg(dir.path())
                .arg("--key-file")
                .arg(&key)
                .args(["--listen", "127.0.0.1:0"])
                .args(extra),
        )
    };
    for bad in [
        &["--rdma-port", "0"][..],
        &["--rdma-port", "256"],
        &["--rdma-gid-index", "-1"],
        &["--rdma-device", "../rxe0"],
        &["--transport", "rdma0"],
    ] {
        let o = ferryd(bad);
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", stderr(&o));
    }
    // Where rdma cannot start (no device, or a build without it), ferryd
    // says why in one line and exits; where it can, this is not the test.
    let rdma = ferry_daemon::transports::TransportKind::Rdma;
    let opts = ferry_daemon::transports::RdmaOptions {
        device: Some("rxe0".into()),
        ..Default::default()
    };
    let Err(why) = ferry_daemon::transports::get(rdma, &opts) else {
        eprintln!("skipped the failure case: rdma on rxe0 works here");
        return;
    };
    let o = ferryd(&["--transport", "rdma", "--rdma-device", "rxe0"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].ends_with(&why.to_string()), "{err}");
    assert!(
        !dir.path().join("ferryd.sock").exists(),
        "no socket left behind"
    );
}
