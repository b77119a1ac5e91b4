#!/usr/bin/env bash
# Install every system package and Python dependency vstore needs, idempotently.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  # FUSE front end (pyfuse3 compiles against libfuse3; patch applies vstore's patch to it)
  fuse3 libfuse3-dev pkg-config gcc python3-dev patch
  # iSCSI target for tests and libiscsi tools as an independent initiator
  tgt libiscsi-bin
  # NFS server for tests and libnfs tools as an independent client
  nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils
  # ISA-L as an independent parity oracle
  libisal2
  # etcd for the host-failover lease tests (vstore create --lease)
  etcd-server
  # filesystems, loop devices, benchmarks, QEMU peers
  e2fsprogs util-linux fio qemu-utils qemu-block-extra qemu-system-common
  # Ceph RBD members (librbd's Python bindings) and a single-node test cluster (mon, osd, CLI tools)
  librbd1 python3-rados python3-rbd ceph-mon ceph-osd ceph-common
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

# rbd:// members use librbd's Python bindings, which exist only as Debian packages
# (python3-rados, python3-rbd). Link just those two extension modules into the venv:
# all of dist-packages on the path would bring Debian's numpy & co. to clash with ours.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
suffix=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
for mod in rados rbd; do
  so=/usr/lib/python3/dist-packages/$mod$suffix
  if [ -e "$so" ]; then
    ln -sf "$so" "$site/$mod$suffix"
  else
    echo "setup: $so missing (python3-$mod for this Python?): rbd:// members will not work" >&2
  fi
done
.venv/bin/python -c 'import rados, rbd' 2>/dev/null || echo "setup: the venv cannot import rados/rbd" >&2

# pyfuse3 copies every request in from /dev/fuse and every reply out while holding
# the GIL, so vstore's I/O threads stall behind those copies, and it has no fallocate
# handler, so TRIM/discard never reach vstore. Rebuild it from its sdist with
# scripts/pyfuse3-nogil.patch (the copies in `with nogil` blocks; a fallocate op calling
# Operations.fallocate); the marker pyfuse3._pyfuse3.VSTORE_NOGIL_PATCH (2 since the
# fallocate op) says it is in place, and an older patched build is rebuilt.
PATCH_LEVEL=2
if ! .venv/bin/python -c "import pyfuse3._pyfuse3 as p, sys; sys.exit(0 if getattr(p, 'VSTORE_NOGIL_PATCH', 0) >= $PATCH_LEVEL else 1)" 2>/dev/null; then
  version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('pyfuse3'))")
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  .venv/bin/python -m pip download -q --no-deps --no-binary :all: "pyfuse3==$version" -d "$work" >/dev/null
  tar xzf "$work"/pyfuse3-"$version".tar.gz -C "$work"
  patch -s -p1 -d "$work/pyfuse3-$version" < scripts/pyfuse3-nogil.patch
  .venv/bin/python -m pip install -q --no-deps --force-reinstall "$work/pyfuse3-$version" >/dev/null
  .venv/bin/python -c "import pyfuse3._pyfuse3 as p; assert p.VSTORE_NOGIL_PATCH >= $PATCH_LEVEL"
  echo "setup: pyfuse3 $version rebuilt with scripts/pyfuse3-nogil.patch"
fi
