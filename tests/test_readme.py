"""The README's promises that code can check: its settings table and Quickstart."""

from __future__ import annotations

import re

from forkserver.config import reference_table
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_settings_table_is_generated_from_config() -> None:
    block = README.split("<!-- settings:begin -->\n", 1)[1].split("<!-- settings:end -->", 1)[0]
    assert block == reference_table() + "\n", "README is stale: run `make readme`"


def test_quickstart_is_exactly_make_run_and_make_test() -> None:
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```sh\n(.*?)```", section, re.S)
    assert code is not None
    commands = [line.split("#")[0].strip() for line in code.group(1).splitlines()]
    assert [c for c in commands if c] == ["make run", "make test"]
