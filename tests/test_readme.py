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


def test_module_map_names_every_module() -> None:
    """The README's module map (under Internals) lists every module of the
    package, so a newcomer can trust it to find each step."""
    section = README.split("\n### The module map\n", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    named = set(re.findall(r"`([\w/]+(?:\.py|/))`", "\n".join(rows)))
    package = ROOT / "forkserver"
    missing = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if rel.name in ("__init__.py", "__main__.py") or rel.parts[0] in ("stubs", "examples"):
            continue
        # Each module by its own name: a package's row names its modules too.
        if rel.as_posix() not in named and rel.name not in named:
            missing.append(rel.as_posix())
    assert not missing, f"modules missing from the README's module map: {missing}"


def _headings() -> list[str]:
    body = re.sub(r"```.*?```", "", README, flags=re.S)  # "# comments" in code are not headings
    return re.findall(r"^#{2,3} (.+)$", body, re.M)


def test_sections_come_in_a_new_users_order() -> None:
    """Install before use, use before configuration, operations, then internals;
    the headings other documents link to keep their names."""
    order = [
        "Install", "Quickstart", "Writing a service", "Migrating from socketserver",
        "Configuration", "Sandboxing each connection", "Operations", "Internals",
    ]  # fmt: skip
    top = [h for h in re.findall(r"^## (.+)$", README, re.M) if h in order]
    assert top == order
    for name in ("migrating", "sandbox"):
        assert f"(docs/{name}.md)" in README


def test_table_of_contents_links_to_headings_that_exist() -> None:
    """GitHub's anchors: lower case, punctuation dropped, spaces to dashes."""
    anchors = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in _headings()}
    links = re.findall(r"\]\(#([^)]+)\)", README)
    assert links and not [link for link in links if link not in anchors]


def test_install_names_the_distribution_pyproject_builds() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    name = re.search(r'^name = "([^"]+)"', pyproject, re.M)
    assert name is not None and name.group(1) == "pyforkserver"
    install = README.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    assert f'"{name.group(1)} @ git+https://' in install and "pipx install" in install


def test_linked_files_exist() -> None:
    targets = re.findall(r"\]\(((?:docs|conf|bench)/[^)#]+)\)", README)
    assert "docs/performance.md" in targets
    assert {"docs/migrating.md", "docs/sandbox.md"} <= set(targets)
    assert [t for t in targets if not (ROOT / t).exists()] == []
