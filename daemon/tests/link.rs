//! VMMs on the link socket: registration, uniqueness, hang-up, and garbage.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{spec, FakeVmm, Ferryd};
use ferry_daemon::api::VmInfo;
use ferry_engine::link::{Link, LinkMsg, Role};

fn names(d: &Ferryd) -> Vec<String> {
    let vms: Vec<VmInfo> = d.client().get("/api/v1/vms").unwrap();
    vms.into_iter().map(|v| v.name).collect()
}

#[test]
fn register_list_duplicate_and_hang_up() {
    let d = Ferryd::start();
    let a = FakeVmm::register(&d.link_socket, &spec("vm-a", 4)).expect("registered");
    assert!(matches!(&a.reply, LinkMsg::Registered { vm_id, spec: None } if !vm_id.is_empty()));
    let o = d.ferry(&["vm", "list"]);
    let out = common::stdout(&o);
    assert!(out.contains("vm-a  running  4 MiB  0      42"), "{out}");

    let dup = FakeVmm::register(&d.link_socket, &spec("vm-a", 4))
        .err()
        .expect("duplicate refused");
    assert!(dup.contains("already exists"), "{dup}");
    let b = FakeVmm::register(&d.link_socket, &spec("vm-b", 1)).expect("registered");
    assert_eq!(names(&d), ["vm-a", "vm-b"]);

    a.hang_up();
    let deadline = Instant::now() + common::DEADLINE;
    while names(&d) != ["vm-b"] {
        assert!(Instant::now() < deadline, "vm-a not removed after its EOF");
        std::thread::sleep(Duration::from_millis(50));
    }
    d.wait_log(&["vm-a", "closed the link"]);
    // The name is free again.
    let a2 = FakeVmm::register(&d.link_socket, &spec("vm-a", 1)).expect("re-registered");
    assert_eq!(names(&d), ["vm-a", "vm-b"]);
    drop((a2, b));
}

#[test]
fn bad_registrations_are_refused() {
    let d = Ferryd::start();
    for bad in ["../x", "", "a b"] {
        let e = FakeVmm::register(&d.link_socket, &spec(bad, 1))
            .err()
            .expect("bad name refused");
        assert!(e.contains("VM name"), "{e}");
    }
    let mut zero_cpus = spec("nocpu", 1);
    zero_cpus.vcpus = 0;
    assert!(FakeVmm::register(&d.link_socket, &zero_cpus).is_err());

    let reply = |msg: LinkMsg| {
        let mut l = Link::connect(&d.link_socket).unwrap();
        l.set_timeout(Some(common::DEADLINE)).unwrap();
        l.send(&msg, &[], &[]).unwrap();
        l.recv().map(|r| r.msg)
    };
    // No memfd with a source registration.
    let r = reply(LinkMsg::Register {
        role: Role::Source,
        spec: Some(spec("nofd", 1)),
    });
    assert!(matches!(r, Ok(LinkMsg::Error { message }) if message.contains("memfd")));
    // A target registration nobody waits for.
    let r = reply(LinkMsg::Register {
        role: Role::Target { token: "00".into() },
        spec: None,
    });
    assert!(matches!(r, Ok(LinkMsg::Error { message }) if message.contains("token")));
    // Not a registration at all.
    assert!(matches!(
        reply(LinkMsg::GetStats),
        Ok(LinkMsg::Error { .. })
    ));
    // Garbage bytes, and a client that says nothing: neither blocks others.
    let mut g = UnixStream::connect(&d.link_socket).unwrap();
    g.write_all(b"this is not the link protocol at all")
        .unwrap();
    let _silent = UnixStream::connect(&d.link_socket).unwrap();
    let ok =
        FakeVmm::register(&d.link_socket, &spec("good", 1)).expect("registered despite the others");
    assert_eq!(names(&d), ["good"]);
    d.wait_log(&["WARN", "did not register", "magic"]);
    drop(ok);
}
