//! Namespace pair setup and teardown as root, with a real blast between the
//! namespaces through the hidden subcommands. Skips with a reason when not
//! root or when `ip netns` is unavailable.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use ferry_bench::blast::{self, BlastResult};
use ferry_bench::netns::{NetnsPair, TGT_ADDR};

fn why_skip() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => None,
        _ => Some("`ip netns` is unavailable".into()),
    }
}

fn namespaces() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn blast_between_namespaces_then_teardown() {
    if let Some(why) = why_skip() {
        eprintln!("skipping blast_between_namespaces_then_teardown: {why}");
        return;
    }
    let tag = format!("ferry-bench-test-{}", std::process::id());
    let pair = NetnsPair::create(&tag).expect("create the namespace pair");
    assert!(namespaces().contains(&pair.src) && namespaces().contains(&pair.tgt));

    let exe = env!("CARGO_BIN_EXE_ferry-bench");
    let mut recv = Command::new("ip")
        .args(["netns", "exec", &pair.tgt, exe, "blast-recv", "--listen"])
        .arg(format!("{TGT_ADDR}:0"))
        .args(["--streams", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start blast-recv");
    let stdout = recv.stdout.take().expect("piped stdout");
    let mut stdout = BufReader::new(stdout);
    let addr = blast::parse_ready(&mut stdout).expect("receiver address");
    let out = Command::new("ip")
        .args(["netns", "exec", &pair.src, exe, "blast-send", "--to"])
        .arg(addr.to_string())
        .args(["--bytes", "8388608", "--streams", "2"])
        .output()
        .expect("run blast-send");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: BlastResult = serde_json::from_slice(&out.stdout).expect("blast-send JSON");
    assert_eq!((r.bytes, r.streams), (8 << 20, 2));
    let mut last = String::new();
    stdout.read_line(&mut last).expect("receiver's total");
    assert_eq!(last.trim(), r#"{"bytes":8388608}"#);
    assert!(recv.wait().expect("wait blast-recv").success());

    pair.limit_rate(100).expect("tc tbf on the veth pair");
    drop(pair);
    assert!(
        !namespaces().contains(&tag),
        "namespaces left behind: {}",
        namespaces()
    );
}

#[test]
fn failed_setup_leaves_nothing_behind() {
    if let Some(why) = why_skip() {
        eprintln!("skipping failed_setup_leaves_nothing_behind: {why}");
        return;
    }
    // The target namespace already exists, so setup fails after it made the
    // source namespace, which must then be gone.
    let tag = format!("ferry-bench-test2-{}", std::process::id());
    let tgt = format!("{tag}-tgt");
    let ok = Command::new("ip")
        .args(["netns", "add", &tgt])
        .status()
        .expect("ip netns add");
    assert!(ok.success());
    let err = NetnsPair::create(&tag).expect_err("setup must fail");
    let left = namespaces();
    let _ = Command::new("ip").args(["netns", "del", &tgt]).status();
    assert!(format!("{err:#}").contains(&tgt), "{err:#}");
    assert!(
        !left.contains(&format!("{tag}-src")),
        "source namespace left behind: {left}"
    );
}
