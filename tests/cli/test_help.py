"""Every command explains every option, runs as ``python -m pccfast.<command>`` and as its console script."""
import argparse
import importlib
import os
import subprocess
import sys
import tomllib

import pytest

COMMANDS = ["generate", "relabel", "merge", "prompts", "inspect", "evaluate", "native", "export", "train"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help_and_shows_in_help(name, capsys):
    cli = importlib.import_module(f"pccfast.cli.{name}")
    parser = cli.build_parser()
    assert parser.prog == f"python -m pccfast.{name}"
    assert parser.description and len(parser.description) > 40
    undocumented = [a.option_strings or a.dest for a in _options(parser) if not a.help or len(a.help) < 12]
    assert undocumented == [], f"options without a real help text: {undocumented}"
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    missing = [s for a in _options(parser) for s in a.option_strings if s not in text]
    assert missing == [], missing


@pytest.mark.parametrize("name", COMMANDS)
def test_entry_module_is_thin_and_runs(name):
    """``pccfast/<name>.py`` only hands over to ``pccfast.cli.<name>``, and ``python -m`` runs it."""
    with open(os.path.join(ROOT, "pccfast", f"{name}.py"), encoding="utf-8") as f:
        code = [x for x in f.read().splitlines() if x.strip() and not x.startswith(('"""', "#"))]
    assert f"from pccfast.cli.{name} import main" in code and len(code) <= 6, code
    res = subprocess.run([sys.executable, "-m", f"pccfast.{name}", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0 and f"python -m pccfast.{name}" in res.stdout, res.stderr[-2000:]


def test_console_scripts_point_at_the_commands():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts == {f"pccfast-{n}": f"pccfast.cli.{n}:main" for n in COMMANDS}
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))
