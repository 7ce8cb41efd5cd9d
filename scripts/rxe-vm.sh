#!/bin/bash
# Run a command inside a throwaway QEMU guest that has a soft-RoCE (rdma_rxe) device.
#
# Why: the kernel on our CI machines has no RDMA support at all, but Debian's
# stock kernel ships rdma_rxe as a module. We boot that kernel under QEMU
# (software emulation, no KVM), mount this machine's whole root file system
# read-only inside the guest over 9p, and run the command there with an rxe
# device "rxe0" bound to a dummy netdev at 10.77.0.1/24. Test binaries built on
# the host run unchanged inside the guest because they see the same files.
# The emulated CPU has SVM, so KVM loads in the guest (nested, emulated) and
# ferry-bench can migrate real VMs there, slowly.
#
# Soft-RoCE is a software emulation: the CPU moves every byte through the
# kernel's network stack. Use it to test that the rdma transport works, never
# to measure how fast it is.
#
# Usage:  scripts/rxe-vm.sh [--mem MiB] [--smp N] [--timeout S] -- COMMAND [ARGS...]
#   --mem      guest memory (default 2048)
#   --smp      guest CPUs (default 2)
#   --timeout  seconds before QEMU is killed, however far the guest got (default 600)
# Exit status: the command's own exit status; 124 if the timeout struck; 99 if
# the guest never ran the command; 98 / 97 if rdma_rxe or rxe0 failed.
# Needs (Debian): qemu-system-x86 linux-image-amd64 busybox-static rdma-core
#                 ibverbs-providers (cargo xtask installs them), kmod, iproute2
# Writable scratch inside the guest: /tmp (tmpfs) only; the host root is read-only.
# `cargo xtask rdma` runs the rdma tests and an rdma migration through this.
# Origin: the team's recipe (verified to bring up rxe0 and run ib_write_bw in ~25 s).
set -euo pipefail
MEM=2048; SMP=2; TIMEOUT_S=600
while [ $# -gt 0 ]; do
  case "$1" in
    --mem) MEM=$2; shift 2;; --smp) SMP=$2; shift 2;; --timeout) TIMEOUT_S=$2; shift 2;;
    --) shift; break;; *) break;;
  esac
done
[ $# -gt 0 ] || { echo "usage: $0 [--mem MiB] [--smp N] [--timeout S] -- COMMAND..." >&2; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { echo "no qemu-system-x86_64: apt-get install qemu-system-x86" >&2; exit 2; }
[ -x /bin/busybox ] || { echo "no /bin/busybox: apt-get install busybox-static" >&2; exit 2; }
KVER=$(ls /lib/modules | grep -- '-amd64$' | sort -V | tail -1 || true)
[ -n "$KVER" ] && [ -f "/boot/vmlinuz-$KVER" ] || { echo "no Debian kernel: apt-get install linux-image-amd64" >&2; exit 2; }
WORK=$(mktemp -d /var/tmp/rxevm.XXXXXX)   # /var/tmp: visible to the guest (its /tmp is a tmpfs)
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$WORK/initrd/bin" "$WORK/initrd/mods" "$WORK/initrd/"{proc,sys,dev,mnt}
cp /bin/busybox "$WORK/initrd/bin/busybox"
for a in sh mount insmod switch_root echo poweroff; do ln -s busybox "$WORK/initrd/bin/$a"; done
MODS="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci netfs fscache 9pnet 9pnet_virtio 9p"
for m in $MODS; do
  f=$(modinfo -k "$KVER" -n "$m")
  case "$f" in *.xz) xz -dc "$f" >"$WORK/initrd/mods/$m.ko";; *) cp "$f" "$WORK/initrd/mods/$m.ko";; esac
done
# The command, quoted, in a script the guest runs after switch_root into the host root.
{ echo '#!/bin/sh'; echo 'export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp'
  echo "cd $(printf %q "$PWD") 2>/dev/null || cd /"
  echo 'ip link set lo up; modprobe rdma_rxe || { echo RXEVM-RC=98; echo o >/proc/sysrq-trigger; sleep 10; }'
  echo 'ip link add d0 type dummy && ip addr add 10.77.0.1/24 dev d0 && ip link set d0 up'
  echo 'rdma link add rxe0 type rxe netdev d0 || { echo RXEVM-RC=97; echo o >/proc/sysrq-trigger; sleep 10; }'
  # Nested KVM for ferry-vmm: the emulated CPU has SVM (or VMX, for -cpu max on Intel hosts).
  echo 'modprobe kvm_amd 2>/dev/null || modprobe kvm_intel 2>/dev/null || true'
  printf '%q ' "$@"; echo
  echo 'echo RXEVM-RC=$?'
  # Power off from a busybox in the tmpfs: this shell is PID 1 and runs from
  # 9p, which the power-off tears down under it (a SIGBUS, "Kernel panic -
  # not syncing: Attempted to kill init!" on the console: harmless, but loud).
  echo 'cp /bin/busybox /tmp/busybox 2>/dev/null && exec /tmp/busybox sh -c "echo o >/proc/sysrq-trigger; exec /tmp/busybox sleep 10"'
  echo 'echo o >/proc/sysrq-trigger; sleep 10'; } >"$WORK/cmd.sh"
cat >"$WORK/initrd/init" <<INIT
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $MODS; do insmod /mods/\$m.ko || echo "insmod \$m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /mnt || { echo RXEVM-RC=99; poweroff -f; }
mount -t proc proc /mnt/proc; mount -t sysfs sys /mnt/sys; mount -t devtmpfs dev /mnt/dev; mount -t tmpfs tmp /mnt/tmp
exec switch_root /mnt /bin/sh $WORK/cmd.sh
INIT
chmod +x "$WORK/initrd/init" "$WORK/cmd.sh"
(cd "$WORK/initrd" && find . | cpio -o -H newc 2>/dev/null | gzip >"$WORK/initrd.gz")
# -nic none: no network card (the guest's network is the dummy d0), so no
# iPXE boot ROM either. grep --line-buffered: whoever reads us sees the
# console as it happens, and keeps what was printed when the timeout strikes.
set +e
timeout --kill-after=10 "$TIMEOUT_S" \
  qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m "$MEM" -smp "$SMP" -nographic -no-reboot -nic none \
  -kernel "/boot/vmlinuz-$KVER" -initrd "$WORK/initrd.gz" -append "console=ttyS0 quiet panic=-1" \
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap </dev/null 2>&1 \
  | tee "$WORK/console.log" | grep -av --line-buffered '^RXEVM-RC='
QEMU_RC=${PIPESTATUS[0]}
set -e
RC=$(grep -a -o 'RXEVM-RC=[0-9]*' "$WORK/console.log" | tail -1 | cut -d= -f2 || true)
if [ -z "$RC" ] && { [ "$QEMU_RC" = 124 ] || [ "$QEMU_RC" = 137 ]; }; then
  echo "rxe-vm.sh: the guest did not finish within $TIMEOUT_S s; QEMU killed" >&2
  exit 124
fi
exit "${RC:-99}"
