"""The README's printed examples are the tool's output (issue 16, item 9).

Every block of README.md between ``<!-- begin: NAME -->`` and
``<!-- end: NAME -->`` holds a ``$ ttcsim ...`` command and its output. Each
test reruns one command through click's CliRunner in a scratch directory and
compares the output exactly; only wall-clock timings are normalised
(``tools/make_docs.py``: ``TIMING_PATTERNS``). On a failure run ``make docs``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_docs", ROOT / "tools" / "make_docs.py")
make_docs = importlib.util.module_from_spec(_spec)
sys.modules["make_docs"] = make_docs
_spec.loader.exec_module(make_docs)

README_TEXT = (ROOT / "README.md").read_text(encoding="utf-8")
EXAMPLES = {b.name: b for b in make_docs.example_blocks(README_TEXT)}
NOTES = {b.name: b for b in make_docs.read_blocks(README_TEXT) if b.name.endswith("-notes")}
FIX = "README.md differs from the tool's output: run `make docs` and commit the result"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_readme_example_matches_the_tool(name):
    command, written = make_docs.split_example(EXAMPLES[name])
    with make_docs.scratch_dir():
        printed = make_docs.run_cli(make_docs.command_argv(command))
    assert make_docs.normalise(written) == make_docs.normalise(printed), f"{name}: {FIX}"


@pytest.mark.parametrize("name", sorted(NOTES))
def test_readme_notes_match_the_tool(name):
    assert NOTES[name].body == make_docs.render_notes(name, README_TEXT), f"{name}: {FIX}"


def test_readme_has_the_examples_and_figures_the_script_makes():
    assert {"predict", "metrics", "pareto", "plan", "sweep"} <= set(EXAMPLES)
    assert set(make_docs.FIGURES) <= set(EXAMPLES)
    assert set(make_docs.NOTES) == set(NOTES)
    for name, png in make_docs.FIGURES.items():
        assert f"](docs/img/{png})" in README_TEXT, name
        assert (ROOT / "docs" / "img" / png).stat().st_size > 10_000, png


def test_readme_commands_write_only_to_the_working_directory():
    """No example writes into the repository's docs/img (the figures are the script's)."""
    for name, block in EXAMPLES.items():
        argv = make_docs.command_argv(make_docs.split_example(block)[0])
        for opt in ("--plot", "--out", "--csv"):
            if opt in argv:
                path = argv[argv.index(opt) + 1]
                assert "/" not in path and not path.startswith("."), (name, opt, path)
    assert "--plot docs/" not in README_TEXT


def test_readme_starts_with_install_and_predict_then_the_tests():
    fences = [part.split("\n", 1) for part in README_TEXT.split("```")[1::2]]
    assert fences[0] == ["bash", "pip install -e . && ttcsim predict --hw h100 --model 8b "
                         "--strategy vote5\n"]
    assert fences[1] == ["bash", "pip install -e '.[test]' && python -m pytest -q\n"]
    first = make_docs.command_argv("$ " + fences[0][1].split("&& ", 1)[1].strip())
    assert first == make_docs.command_argv(make_docs.split_example(EXAMPLES["predict"])[0])


def test_timing_normalisation_touches_only_timings():
    line = "wrote 144,000 rows (93,852 fit) to results.csv [csv] in 4.40 s (32,758 scenarios/s)"
    assert make_docs.normalise(line) == ("wrote 144,000 rows (93,852 fit) to results.csv [csv]"
                                         " in <seconds> s (<rate> scenarios/s)")
    assert make_docs.normalise("energy per query  3261.7 J in 8.123 s") == (
        "energy per query  3261.7 J in 8.123 s")


def test_drift_is_detected():
    """A README whose printed number differs from the tool's in one digit fails the check."""
    command, written = make_docs.split_example(EXAMPLES["predict"])
    with make_docs.scratch_dir():
        printed = make_docs.run_cli(make_docs.command_argv(command))
    stale = written.replace("energy per query         ", "energy per query         1", 1)
    assert stale != written
    assert make_docs.normalise(stale) != make_docs.normalise(printed)
