# Everything a fresh clone needs: only python3 (>= 3.11, with venv) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The test matrix's runner (make test-all), beside the dev tools in the venv.
NOX_VERSION := 2026.10.20
NOX_STAMP   := $(VENV)/.nox-stamp
CONFIG ?= conf/echo.toml

.PHONY: run test test-all lint unit readme clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "forkserver needs Python >= 3.11; this is " + sys.version.split()[0])'
	@$(PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: on Debian/Ubuntu install python3-venv" >&2; exit 1; }
	@# The distribution was called "forkserver" before (a name PyPI gives another
	@# project): a venv made then would keep its editable finder beside the new one.
	@$(BIN)/python -m pip uninstall --quiet --yes forkserver 2>/dev/null || true
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --editable '.[dev]'
	@touch $(STAMP)

## Serve conf/echo.toml in the foreground (Ctrl-C or SIGTERM stops it).
run: $(STAMP)
	$(BIN)/python -m forkserver --config $(CONFIG)

## Lint, type-check, then the test suite.
test: lint unit

lint: $(STAMP)
	$(BIN)/ruff check forkserver tests bench noxfile.py
	$(BIN)/ruff format --check forkserver tests bench noxfile.py
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest

## The suite on every Python forkserver claims (noxfile.py: 3.11, 3.12, 3.13),
## each in its own venv under .nox/; a version not on the machine is skipped
## and named as such.  One version: $(BIN)/nox -s tests-3.13 -- tests/test_x.py
test-all: $(NOX_STAMP)
	$(BIN)/nox

$(NOX_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check 'nox==$(NOX_VERSION)'
	@touch $(NOX_STAMP)

## Regenerate the README's generated blocks: the configuration tables (from
## the fields in forkserver/config/) and the HAProxy recipe (conf/haproxy.cfg).
readme: $(STAMP)
	$(BIN)/python -c 'import pathlib; from forkserver.config import reference_table; \
	p = pathlib.Path("README.md"); s = p.read_text(); \
	cfg = pathlib.Path("conf/haproxy.cfg").read_text(); \
	put = lambda s, name, text: s[: s.index(f"<!-- {name}:begin -->\n") + len(name) + 16] \
	    + text + s[s.index(f"<!-- {name}:end -->") :]; \
	s = put(s, "settings", reference_table() + "\n"); \
	p.write_text(put(s, "haproxy", "```\n" + cfg + "```\n"))'

clean:
	rm -rf $(VENV) .nox build *.egg-info .mypy_cache .pytest_cache .ruff_cache
