#!/usr/bin/env bash
# Install every system package and Python dependency vstore needs, idempotently.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  # FUSE front end (pyfuse3 compiles against libfuse3)
  fuse3 libfuse3-dev pkg-config gcc python3-dev
  # iSCSI target for tests and libiscsi tools as an independent initiator
  tgt libiscsi-bin
  # NFS server for tests and libnfs tools as an independent client
  nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils
  # ISA-L as an independent parity oracle
  libisal2
  # filesystems, loop devices, benchmarks, QEMU peers
  e2fsprogs util-linux fio qemu-utils qemu-block-extra qemu-system-common
)

if [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
else
  echo "setup: not root, skipping apt-get (need: ${APT_PACKAGES[*]})" >&2
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
