#!/usr/bin/env bash
# Installs what disklet and its tests need on Debian/Ubuntu: libudev, libblkid
# and libclang (bindgen reads blkid.h) for the build, the real tools the agent
# drives and the root tests exercise, the makers of the signature fixtures
# tests/probe_parity.rs compares (dosfstools, ntfs-3g, bcache-tools, lvm2,
# squashfs-tools), and runc, the CNI plugins and busybox for the kubelet node
# of tests/kubelet_node.rs.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
  pkg-config libudev-dev libblkid-dev libclang-dev \
  util-linux fdisk e2fsprogs xfsprogs btrfs-progs cryptsetup-bin \
  udev perl openssl fio \
  dosfstools ntfs-3g bcache-tools lvm2 squashfs-tools \
  runc containernetworking-plugins busybox-static iproute2 >/dev/null
echo "setup-debian: packages installed"
