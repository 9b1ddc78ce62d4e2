"""The README and docs/ cannot drift from the code: the CLI reference, commands, exit codes, keys, examples."""

import re
import subprocess
import sys

from conftest import ROOT
from lstmopt import errors
from lstmopt.job.config import _Job

README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"


def doc(name):
    return (DOCS / name).read_text()


def test_the_readme_is_short_and_every_doc_it_links_exists():
    assert len(README.splitlines()) <= 160  # a first read; the rest is in docs/
    for link in re.findall(r"\]\((docs/[\w.-]+)\)", README):
        assert (ROOT / link).is_file(), link
    for path in DOCS.glob("*.md"):
        for link in re.findall(r"\]\(([\w.-]+\.md)\)", path.read_text()):
            assert (DOCS / link).is_file(), f"{path.name} links {link}"


def test_cli_reference_matches_every_commands_help():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "cli_reference.py"), "--check", str(DOCS / "cli.md")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_setup_is_two_commands_and_ci_runs_the_second():
    assert "pip install torch==2.13.0 && pip install -e . && lstmopt demo" in README
    block = re.search(r"<!-- ci:test-command -->\n```bash\n(.+?)\n```\n<!-- /ci:test-command -->", README, re.S)
    assert block and block.group(1) == 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'
    assert "ci:test-command" in (ROOT / ".ci" / "run").read_text()


def test_every_test_file_the_ci_names_exists():
    named = re.findall(r"tests/test_\w+\.py", (ROOT / ".ci" / "run").read_text())
    assert named and [name for name in named if not (ROOT / name).is_file()] == []


def test_benchmark_table_was_generated():
    block = doc("performance.md").split("<!-- bench:start -->")[1].split("<!-- bench:end -->")[0]
    assert "| 40,128,1,uni,1,1 |" in block and "bfloat16" in block and "resident memory" in block


def test_every_exit_code_is_documented():
    codes = {cls.exit_code for cls in vars(errors).values() if isinstance(cls, type) and hasattr(cls, "exit_code")}
    table = doc("ci.md").split("| exit code | meaning |")[1].split("\n\n")[0]
    documented = {int(c) for c in re.findall(r"^\| ([\d /]+) \|", table, re.M) for c in c.split("/")}
    assert codes | {0, 130, 143} <= documented


def test_batch_job_keys_are_documented():
    listed = set(re.findall(r"`(\w+)`", doc("batch.md").split("Job keys:")[1].split(".")[0]))
    assert listed == set(_Job.model_fields)


def test_every_example_script_is_listed():
    scripts = {p.name for p in (ROOT / "examples").glob("*.py") if p.name != "common.py"}
    listed = set(re.findall(r"^\| `(\w+\.py)` \|", doc("usage.md"), re.M))
    assert scripts == listed


def test_the_kernel_table_in_the_design_doc_is_the_one_in_the_code():
    from lstmopt.kernels.table import markdown

    block = re.search(r"<!-- kernel-table:start[^\n]*-->\n(.*?)<!-- kernel-table:end -->", doc("design.md"), re.S)
    assert block and block.group(1) == markdown(), (
        "docs/design.md's kernel table is out of date: paste lstmopt.kernels.table.markdown() between its markers")
