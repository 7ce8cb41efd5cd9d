//! System packages the build and the tests need, installed when missing.

use std::process::Command;

use anyhow::{bail, Result};

use crate::sh;

/// Debian packages the build and the tests need, with why. Extend here.
pub const SYSTEM_PACKAGES: &[(&str, &str)] = &[
    (
        "build-essential",
        "a C compiler and make, for crates that build C",
    ),
    (
        "binutils",
        "as and objcopy, which assemble ferry-vmm's guest code",
    ),
    ("pkg-config", "finding system libraries for -sys crates"),
    (
        "iproute2",
        "ip netns, veth and tc, for --netns runs and their tests",
    ),
    (
        "nftables",
        "nft, for tests that cut links between namespaces",
    ),
    (
        "e2fsprogs",
        "mkfs.ext4, debugfs, e2fsck and dumpe2fs, for disk images with a file system",
    ),
    // Building the rdma transport (rdma-sys generates its bindings with
    // bindgen and builds against rdma-core).
    (
        "libibverbs-dev",
        "verbs headers and library, for the rdma transport",
    ),
    (
        "librdmacm-dev",
        "RDMA connection manager headers and library, for rdma-sys",
    ),
    ("libclang-dev", "libclang, for rdma-sys's bindgen"),
    ("cmake", "for rdma-sys's build script"),
    (
        "libnl-3-dev",
        "netlink library rdma-core links against, for rdma-sys",
    ),
    (
        "libnl-route-3-dev",
        "netlink route library rdma-core links against, for rdma-sys",
    ),
    // Running it: the user-space drivers (rxe's among them) and tools.
    (
        "rdma-core",
        "RDMA user-space core and the `rdma` tool, for rdma hosts and the soft-RoCE VM",
    ),
    (
        "ibverbs-providers",
        "user-space verbs drivers (rxe, mlx5, ...), without which no device opens",
    ),
    // `cargo xtask rdma`: scripts/rxe-vm.sh boots Debian's kernel (which
    // has rdma_rxe) under QEMU, from a busybox initrd.
    (
        "qemu-system-x86",
        "QEMU, for the soft-RoCE VM of `cargo xtask rdma`",
    ),
    (
        "linux-image-amd64",
        "a kernel with the rdma_rxe module, booted by the soft-RoCE VM",
    ),
    (
        "busybox-static",
        "the soft-RoCE VM's initrd (a static busybox)",
    ),
    (
        "kmod",
        "modinfo, which finds the soft-RoCE VM's virtio and 9p modules",
    ),
    ("cpio", "packing the soft-RoCE VM's initrd"),
    (
        "xz-utils",
        "unpacking the kernel's .ko.xz modules for that initrd",
    ),
];

/// Whether dpkg says `pkg` is installed.
fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("install ok installed")
        })
}

/// Installs whatever of [`SYSTEM_PACKAGES`] is missing (needs root).
/// Returns a note for the stage line.
pub fn ensure() -> Result<String> {
    if !sh::succeeds(Command::new("dpkg-query").arg("--version")) {
        return Ok(format!(
            "skipped: no dpkg-query, so not Debian or Ubuntu; make sure these are installed: {}",
            names(SYSTEM_PACKAGES.iter().map(|p| p.0))
        ));
    }
    let missing: Vec<&str> = SYSTEM_PACKAGES
        .iter()
        .map(|p| p.0)
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(format!("all {} present", SYSTEM_PACKAGES.len()));
    }
    for (p, why) in SYSTEM_PACKAGES.iter().filter(|p| missing.contains(&p.0)) {
        println!("missing system package {p}: {why}");
    }
    let list = names(missing.iter().copied());
    // SAFETY: geteuid(2) has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "system packages missing; as root, run:\n    apt-get update && apt-get install -y --no-install-recommends {list}"
        );
    }
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        if sh::is_ci() {
            c.arg("-q");
        }
        c
    };
    sh::run(&mut apt(&["update"]))?;
    let mut install = apt(&["install", "-y", "--no-install-recommends"]);
    install.args(&missing);
    sh::run(&mut install)?;
    let still: Vec<&str> = missing.iter().copied().filter(|p| !installed(p)).collect();
    if !still.is_empty() {
        bail!("apt-get did not install {}", names(still.into_iter()));
    }
    Ok(format!("installed {list}"))
}

fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    it.collect::<Vec<_>>().join(" ")
}
