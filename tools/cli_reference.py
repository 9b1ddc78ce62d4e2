"""Regenerate (or check) the CLI reference (docs/cli.md) from the commands' own --help output.

    python tools/cli_reference.py --write docs/cli.md   # after changing an option or its help
    python tools/cli_reference.py --check docs/cli.md   # what tests/test_readme.py runs
"""

import argparse
import re
import sys
from pathlib import Path

from typer.testing import CliRunner

from lstmopt.cli import app

COMMANDS = ["optimize", "inspect", "verify", "bench", "batch", "merge-reports", "demo"]
BLOCK = re.compile(r"(<!-- cli-reference:start -->\n).*?(<!-- cli-reference:end -->)", re.S)


def render() -> str:
    runner = CliRunner(env={"COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"})
    parts = []
    for command in [None, *COMMANDS]:
        args = [command, "--help"] if command else ["--help"]
        result = runner.invoke(app, args)
        if result.exit_code != 0:
            raise SystemExit(f"lstmopt {' '.join(args)} failed: {result.output}")
        text = "\n".join(line.rstrip() for line in result.stdout.strip("\n").splitlines()).strip("\n")
        title = f"lstmopt {command}" if command else "lstmopt"
        parts.append(f"### `{title}`\n\n```text\n{text}\n```\n")
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", type=Path, metavar="FILE")
    action.add_argument("--check", type=Path, metavar="FILE")
    args = parser.parse_args(argv)
    path = args.write or args.check
    readme = path.read_text()
    if not BLOCK.search(readme):
        raise SystemExit(f"{path} has no <!-- cli-reference:start --> ... <!-- cli-reference:end --> block")
    updated = BLOCK.sub(lambda m: m.group(1) + render() + m.group(2), readme)
    if args.write:
        path.write_text(updated)
        return 0
    if updated != readme:
        print(f"{path}: the CLI reference is out of date; run python tools/cli_reference.py --write {path}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
