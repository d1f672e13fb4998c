r"""Regenerate the README's printed examples and the figures in docs/img (``make docs``).

The README holds each generated example between two markers::

    <!-- begin: NAME -->
    ```
    $ ttcsim COMMAND ... \
        MORE OPTIONS
    OUTPUT
    ```
    <!-- end: NAME -->

The command written in the block is the source of truth. This script reruns it
through click's ``CliRunner`` in a scratch directory (so a command that writes
files writes them there, never into the repository) and puts the tool's exact
output below it. Blocks named ``NAME-notes`` are prose whose numbers are read
from the run of block ``NAME`` (its ``--json`` twin); each note states a claim
and the script stops with an error when the tool's numbers no longer support it.

Figures: a block listed in :data:`FIGURES` writes a PNG through its ``--plot``
option; the script copies that file from the scratch directory to
``docs/img/<name>``. Only this script writes docs/img.

``tests/test_readme_examples.py`` reruns the same blocks and fails when the
README differs from the tool's output. Only timings are normalised
(:func:`normalise`); everything else must match exactly.

Usage: ``python tools/make_docs.py`` (rewrite README.md and docs/img) or
``python tools/make_docs.py --check`` (exit 1 when the README has drifted).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # import this checkout's ttcsim, not an installed one
    sys.path.insert(0, str(ROOT))

README = ROOT / "README.md"
IMG_DIR = ROOT / "docs" / "img"

#: block name -> file in docs/img that the block's ``--plot`` output becomes.
FIGURES: dict[str, str] = {
    "predict-plot": "predict-power-vote5.png",
    "metrics-histogram": "metrics-histogram.png",
    "pareto": "pareto-deepseek-r1-distill.png",
    "route": "route-deepseek-r1-distill.png",
    "depth": "depth-qwen-7b-aime.png",
    "sweep": "sweep.png",
}

#: Non-deterministic parts of the output (wall-clock timings) -> placeholder.
TIMING_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # sweep summary: "... [csv] in 4.40 s (32,758 scenarios/s)"
    (re.compile(r" in [0-9][0-9.,]* s \([0-9][0-9.,]* scenarios/s\)"),
     " in <seconds> s (<rate> scenarios/s)"),
)

_BLOCK_RE = re.compile(
    r"(<!-- begin: (?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- end: (?P=name) -->)",
    re.DOTALL,
)


@dataclass(frozen=True)
class Block:
    """One marked region of the README: its name and the text between the markers."""

    name: str
    body: str


def read_blocks(text: str) -> list[Block]:
    """Every ``<!-- begin: NAME -->`` ... ``<!-- end: NAME -->`` region, in order."""
    blocks = [Block(m.group("name"), m.group("body")) for m in _BLOCK_RE.finditer(text)]
    names = [b.name for b in blocks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"README: marker name used twice: {', '.join(dup)}")
    opened = re.findall(r"<!-- begin: ([a-z0-9-]+) -->", text)
    if len(opened) != len(blocks):
        unclosed = sorted(set(opened) - set(names))
        raise ValueError(f"README: begin marker without its end marker: {', '.join(unclosed)}")
    return blocks


def example_blocks(text: str) -> list[Block]:
    """The blocks that hold a command and its output (all but the ``-notes`` prose)."""
    return [b for b in read_blocks(text) if not b.name.endswith("-notes")]


def split_example(block: Block) -> tuple[str, str]:
    r"""(command text as written, with ``\`` continuations; the output below it)."""
    lines = block.body.split("\n")
    if len(lines) < 3 or lines[0] != "```" or lines[-2] != "```" or lines[-1] != "":
        raise ValueError(f"README block {block.name!r}: expected a ``` fenced block only")
    inner = lines[1:-2]
    if not inner or not inner[0].startswith("$ ttcsim "):
        raise ValueError(f"README block {block.name!r}: first line must be '$ ttcsim ...'")
    n = 1
    while inner[n - 1].endswith("\\"):
        n += 1
    command = "\n".join(inner[:n])
    output = "\n".join(inner[n:])
    return command, (output + "\n" if inner[n:] else "")


def command_argv(command: str) -> list[str]:
    """The arguments after ``ttcsim`` of a ``$ ttcsim ...`` command (shell quoting)."""
    words = shlex.split(command[2:].replace("\\\n", " "))
    if words[:1] != ["ttcsim"]:
        raise ValueError(f"not a ttcsim command: {command!r}")
    return words[1:]


def normalise(output: str) -> str:
    """Replace wall-clock timings (the only non-deterministic output) by placeholders."""
    for pattern, repl in TIMING_PATTERNS:
        output = pattern.sub(repl, output)
    return output


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary working directory holding a copy of ``examples/`` (README paths)."""
    old = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="ttcsim-docs-") as tmp:
        shutil.copytree(ROOT / "examples", Path(tmp) / "examples")
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(old)


def run_cli(argv: list[str]) -> str:
    """Run ``ttcsim ARGV`` through click's CliRunner in the current directory.

    Returns what a user sees (stdout and stderr as click's runner mixes them);
    raises RuntimeError when the command does not exit 0.
    """
    from click.testing import CliRunner

    from ttcsim.cli import main

    result = CliRunner().invoke(main, argv, catch_exceptions=True)
    if result.exit_code != 0:
        detail = result.output.strip().splitlines()[-1:] or [repr(result.exception)]
        raise RuntimeError(f"ttcsim {shlex.join(argv)} exited {result.exit_code}: {detail[0]}")
    return result.output


def plot_path(argv: list[str]) -> str | None:
    """The value of ``--plot`` in ARGV (None when absent)."""
    for i, word in enumerate(argv):
        if word == "--plot" and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith("--plot="):
            return word.split("=", 1)[1]
    return None


def render_example(command: str, output: str) -> str:
    """The block body: the fenced command and its output."""
    return f"```\n{command}\n{output}```\n"


# --------------------------------------------------------------------------- notes


def _fmt_kj(j: float) -> str:
    return f"{j / 1000:.1f} kJ"


def metrics_notes(rows: list[dict]) -> str:
    """Prose under the metrics example, every number taken from its ``--json`` rows."""
    by = {r["strategy"]: r for r in rows}
    single, vote8 = by["single"], by["vote8"]
    budget, spec, refine = by["budget:max=1024"], by["spec:draft=1b,k=4,accept=0.7"], by["refine2"]
    ratio_tokens = vote8["output_tokens"] / single["output_tokens"]
    ratio_energy = vote8["energy_j"] / single["energy_j"]
    useful = {s: r["j_per_useful_token"] for s, r in by.items()}
    cheapest_useful = min(useful, key=useful.get)
    costliest_useful = max(useful, key=useful.get)
    spec_saving = 1.0 - spec["energy_j"] / single["energy_j"]
    if ratio_energy >= ratio_tokens / 2:
        raise RuntimeError("metrics-notes: vote8 is no longer much cheaper per token; reword")
    if budget["energy_j_p90"] >= single["energy_j_p90"]:
        raise RuntimeError("metrics-notes: the budget cap no longer cuts p90; reword")
    if spec_saving <= 0:
        raise RuntimeError("metrics-notes: speculative decoding no longer saves energy; reword")
    if not 0.8 <= refine["j_per_output_token"] / single["j_per_output_token"] <= 1.25:
        raise RuntimeError("metrics-notes: refine2's tokens are no longer as dear as one answer's")
    cheap = {"single": "one answer", "budget:max=1024": "one capped answer",
             "spec:draft=1b,k=4,accept=0.7": "speculative decoding"}.get(
                 cheapest_useful, f"`{cheapest_useful}`")
    return (
        f"* Parallel sampling is cheap per token: `vote8` generates {ratio_tokens:.0f}× the "
        f"tokens for\n  {ratio_energy:.1f}× the energy of one answer, because batch-1 decode "
        "is memory-bound (the\n  samples share the weight reads and, with prefix caching, "
        "the prompt's KV).\n"
        f"* Per *useful* token (the answer the user gets) {cheap} is cheapest\n"
        f"  ({useful[cheapest_useful]:.2f} J); `budget:max=1024` cuts the heavy tail "
        f"(p90 from {_fmt_kj(single['energy_j_p90'])}\n"
        f"  to {_fmt_kj(budget['energy_j_p90'])}).\n"
        "* Sequential revision (`refine2`) loses batching: each of its output tokens costs\n"
        f"  about what one answer's does ({refine['j_per_output_token']:.2f} and "
        f"{single['j_per_output_token']:.2f} J), while `vote8`'s cost "
        f"{vote8['j_per_output_token']:.2f} J.\n"
        f"  The dearest per useful token here is `{costliest_useful}` "
        f"({useful[costliest_useful]:.2f} J).\n"
        f"* Speculative decoding with a 1B draft saves {100 * spec_saving:.0f} % of one "
        "answer's energy.\n"
    )


def pareto_notes(result: dict) -> str:
    """Prose under the pareto example, read from its ``--json`` frontier."""
    (bench,) = result["benchmarks"]
    labels = set(bench["frontier"])
    frontier = [o for o in bench["options"] if o["label"] in labels]
    singles = [o for o in frontier if o["samples"] == 1]
    top_single = max(o["accuracy_pct"] for o in singles)
    above = [o for o in frontier if o["accuracy_pct"] > top_single]
    if not above or any(o["samples"] == 1 for o in above):
        raise RuntimeError("pareto-notes: the frontier above one sample is no longer all voting")
    votes = sorted({o["strategy"] for o in above})
    return (
        f"Up to {top_single:.1f} % a bigger model is the cheaper way up; beyond it only "
        f"test-time\ncompute ({', '.join(f'`{v}`' for v in votes)}) gets further, "
        f"to {max(o['accuracy_pct'] for o in above):.1f} %.\n"
    )


#: notes block name -> (example block whose command it reads, renderer of the --json output)
NOTES: dict[str, tuple[str, Callable[[object], str]]] = {
    "metrics-notes": ("metrics", metrics_notes),
    "pareto-notes": ("pareto", pareto_notes),
}


def json_argv(argv: list[str]) -> list[str]:
    """ARGV with ``--json`` added and any ``--plot FILE`` removed."""
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
            continue
        if word == "--plot":
            skip = True
            continue
        if word.startswith("--plot="):
            continue
        out.append(word)
    return out + ["--json"]


def render_notes(name: str, text: str) -> str:
    """The body of notes block NAME, computed from its example's ``--json`` run."""
    source, renderer = NOTES[name]
    blocks = {b.name: b for b in example_blocks(text)}
    command, _ = split_example(blocks[source])
    with scratch_dir():
        data = json.loads(run_cli(json_argv(command_argv(command))))
    return renderer(data)


# --------------------------------------------------------------------------- main


def regenerate(text: str, write_figures: bool) -> str:
    """README text with every example's output and every notes block recomputed."""
    new = {}
    for block in read_blocks(text):
        if block.name.endswith("-notes"):
            if block.name not in NOTES:
                raise ValueError(f"README: no renderer for notes block {block.name!r}")
            new[block.name] = render_notes(block.name, text)
            continue
        command, _ = split_example(block)
        argv = command_argv(command)
        with scratch_dir() as tmp:
            output = run_cli(argv)
            if block.name in FIGURES:
                png = plot_path(argv)
                if png is None:
                    raise ValueError(f"README block {block.name!r}: a figure block needs --plot")
                if Path(png).is_absolute() or png.startswith(("docs", "..")):
                    raise ValueError(f"README block {block.name!r}: --plot must be a cwd path")
                if write_figures:
                    IMG_DIR.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(tmp / png, IMG_DIR / FIGURES[block.name])
        new[block.name] = render_example(command, output)
        print(f"  {block.name}: {len(output.splitlines())} lines", file=sys.stderr)
    missing = sorted(set(FIGURES) - set(new))
    if missing:
        raise ValueError(f"README: figure blocks missing: {', '.join(missing)}")

    def repl(m: re.Match[str]) -> str:
        return m.group(1) + new[m.group("name")] + m.group(4)

    return _BLOCK_RE.sub(repl, text)


def main(argv: list[str] | None = None) -> int:
    """Rewrite README.md and docs/img, or with ``--check`` report drift (exit 1)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare only (timings normalised); write nothing")
    args = parser.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    new = regenerate(text, write_figures=not args.check)
    if args.check:
        if normalise(new) != normalise(text):
            print("README.md examples differ from the tool's output: run `make docs`",
                  file=sys.stderr)
            return 1
        print("README.md examples match the tool's output", file=sys.stderr)
        return 0
    README.write_text(new, encoding="utf-8")
    print(f"wrote {README.relative_to(ROOT)} and {len(FIGURES)} figures in "
          f"{IMG_DIR.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
