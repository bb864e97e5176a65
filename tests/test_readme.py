"""The README's promises that code can check: generated blocks and the Quickstart."""

from __future__ import annotations

import re

from forkserver.config import reference_table
from tests.helpers.servers import ROOT

README = (ROOT / "README.md").read_text()


def _block(name: str) -> str:
    return README.split(f"<!-- {name}:begin -->\n", 1)[1].split(f"<!-- {name}:end -->", 1)[0]


def test_settings_table_is_generated_from_config() -> None:
    assert _block("settings") == reference_table() + "\n", "README is stale: run `make readme`"


def test_haproxy_recipe_is_the_tested_config_file() -> None:
    config = (ROOT / "conf" / "haproxy.cfg").read_text()
    assert _block("haproxy") == f"```\n{config}```\n", "README is stale: run `make readme`"


def test_quickstart_is_exactly_make_run_and_make_test() -> None:
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```sh\n(.*?)```", section, re.S)
    assert code is not None
    commands = [line.split("#")[0].strip() for line in code.group(1).splitlines()]
    assert [c for c in commands if c] == ["make run", "make test"]
