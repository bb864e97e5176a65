# Everything a fresh clone needs: only python3 (>= 3.11, with venv) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= conf/echo.toml

.PHONY: run test lint unit readme clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "forkserver needs Python >= 3.11; this is " + sys.version.split()[0])'
	@$(PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: on Debian/Ubuntu install python3-venv" >&2; exit 1; }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --editable '.[dev]'
	@touch $(STAMP)

## Serve conf/echo.toml in the foreground (Ctrl-C or SIGTERM stops it).
run: $(STAMP)
	$(BIN)/python -m forkserver --config $(CONFIG)

## Lint, type-check, then the test suite.
test: lint unit

lint: $(STAMP)
	$(BIN)/ruff check forkserver tests bench
	$(BIN)/ruff format --check forkserver tests bench
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest

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
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
