//! The `ferry` CLI against a real ferryd (and against none).

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{ferry, stderr, stdout, Ferryd, TempDir};

fn one_line_error(o: &std::process::Output) -> String {
    let err = stderr(o);
    assert_eq!(err.lines().count(), 1, "stderr is not one line: {err:?}");
    assert!(err.starts_with("ferry: "), "{err:?}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err:?}"
    );
    err
}

#[test]
fn vm_list_status_and_unknown_names() {
    let d = Ferryd::start();
    let o = d.ferry(&["vm", "list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "NAME  STATE  MEM  EPOCH  PROGRESS");
    let o = d.ferry(&["vm", "list", "--json"]);
    assert_eq!(stdout(&o).trim(), "[]");

    let o = d.ferry(&["migrate", "nosuch", "--to", "127.0.0.1:1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(one_line_error(&o).contains("nosuch"));

    let o = d.ferry(&["migrate", "nosuch", "--to", "127.0.0.1:1", "--streams", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(one_line_error(&o).contains("streams"));
    let o = d.ferry(&[
        "migrate",
        "vm",
        "--to",
        "127.0.0.1:1",
        "--downtime-ms",
        "-3",
    ]);
    assert_eq!(o.status.code(), Some(2));
    one_line_error(&o);
    let o = d.ferry(&[
        "migrate",
        "vm",
        "--to",
        "127.0.0.1:1",
        "--bandwidth-mib-s",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(2));
    one_line_error(&o);

    let o = d.ferry(&["status", "feedface"]);
    assert_eq!(o.status.code(), Some(2));
    one_line_error(&o);
    let o = d.ferry(&["cancel", "feedface"]);
    assert_eq!(o.status.code(), Some(2));
    one_line_error(&o);
    let o = d.ferry(&["status", "../../x"]);
    assert_eq!(o.status.code(), Some(2));
    one_line_error(&o);
    let o = d.ferry(&["status"]);
    assert!(o.status.success());
    assert!(stdout(&o).starts_with("ID"));
}

#[test]
fn migrate_of_a_registered_vm_to_nowhere_fails_with_one_line() {
    let d = Ferryd::start();
    let _vmm = common::FakeVmm::register(&d.link_socket, &common::spec("vm0", 1)).unwrap();
    let o = d.ferry(&["migrate", "vm0", "--to", "127.0.0.1:1", "--streams", "1"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(one_line_error(&o).contains("failed"));
    let o = d.ferry(&["migrate", "vm0", "--to", "127.0.0.1:1", "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let snap: ferry_engine::Snapshot =
        serde_json::from_slice(&o.stdout).expect("final snapshot JSON");
    assert_eq!(snap.vm, "vm0");
    let o = d.ferry(&["vm", "list"]);
    assert!(
        stdout(&o).contains("vm0   running  1 MiB  0      42"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn unreachable_ferryd_is_exit_3() {
    let dir = TempDir::new("noferryd");
    let sock = dir.path().join("nothing.sock");
    let o = ferry(&["--socket", sock.to_str().unwrap(), "vm", "list"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(one_line_error(&o).contains("cannot reach ferryd"));
    let o = common::run_with_deadline(
        std::process::Command::new(common::FERRY)
            .args(["status"])
            .env("FERRY_SOCKET", &sock),
    );
    assert_eq!(o.status.code(), Some(3));
    assert!(one_line_error(&o).contains("nothing.sock"));
}

#[test]
fn usage_errors_are_one_line_exit_2() {
    let o = ferry(&["migrate", "vm0"]);
    assert_eq!(o.status.code(), Some(2));
    one_line_error(&o);
    let o = ferry(&["migrate", "vm0", "--to", "h:1", "--streams", "many"]);
    assert_eq!(o.status.code(), Some(2));
    one_line_error(&o);
    let o = ferry(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    one_line_error(&o);
    assert!(ferry(&["--help"]).status.success());
}

#[test]
fn keygen_writes_private_files_and_stdout() {
    let o = ferry(&["keygen"]);
    assert!(o.status.success());
    let text = stdout(&o);
    assert_eq!(text.len(), 65, "{text:?}");
    assert!(text.ends_with('\n') && text.trim_end().chars().all(|c| c.is_ascii_hexdigit()));
    assert!(ferry_engine::Key::from_hex(&text).is_some());

    let dir = TempDir::new("keygen");
    let path = dir.path().join("k");
    let p = path.to_str().unwrap();
    let o = ferry(&["keygen", "--out", p]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        o.stdout.is_empty(),
        "the key never goes to stdout with --out"
    );
    let first = std::fs::read_to_string(&path).unwrap();
    assert_eq!(first.len(), 65);
    assert!(ferry_engine::Key::from_file(&path).is_ok());
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let o = ferry(&["keygen", "--out", p]);
    assert_eq!(o.status.code(), Some(2));
    assert!(one_line_error(&o).contains("--force"));
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        first,
        "not overwritten"
    );

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = ferry(&["keygen", "--out", p, "--force"]);
    assert!(o.status.success());
    assert_ne!(std::fs::read_to_string(&path).unwrap(), first);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temp file left"
    );
}
