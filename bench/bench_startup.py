"""Start-up cost: `ttcsim --help` against bare Python, and YAML profile parsing.

Usage: ``python bench/bench_startup.py [TREE]`` (TREE: a checkout whose ``ttcsim``
to measure; default this one).  Each figure is a median: the wall times over
3 interleaved rounds of N fresh interpreters each (``python -c pass`` and
``from ttcsim.cli import main; main(['--help'])``, run with TREE as the working
directory so its ``ttcsim`` is imported), and the parse time over 21 passes of
``ttcsim.io.parse_yaml`` over every shipped hardware profile.  Bytecode caching
follows the environment (set ``PYTHONPYCACHEPREFIX`` and unset
``PYTHONDONTWRITEBYTECODE`` to measure an installed package, which has its
``.pyc`` files).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

HELP = "from ttcsim.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
PARSE = (
    "import statistics, sys, time\nfrom pathlib import Path\nfrom ttcsim import io\n"
    "texts = [f.read_text() for f in sorted(Path('ttcsim/hardware_profiles').glob('*.yaml'))]\n"
    "ts = []\nfor _ in range(21):\n    t = time.perf_counter()\n"
    "    for s in texts:\n        io.parse_yaml(s, 'x')\n    ts.append(time.perf_counter() - t)\n"
    "print(len(texts), statistics.median(ts))"
)


def median_wall_ms(cmd: list[str], cwd: Path, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, capture_output=True, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tree", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("-n", type=int, default=7, help="interpreters per round")
    args = ap.parse_args()
    tree = Path(args.tree)
    py = sys.executable
    bare, helps = [], []
    for _ in range(3):
        bare.append(median_wall_ms([py, "-c", "pass"], tree, args.n))
        helps.append(median_wall_ms([py, "-c", HELP], tree, args.n))
    b, h = statistics.median(bare), statistics.median(helps)
    out = subprocess.run([py, "-c", PARSE], cwd=tree, capture_output=True, text=True, check=True)
    count, seconds = out.stdout.split()
    per = float(seconds) / int(count) * 1e3
    print(f"{tree}: python -c pass {b:.0f} ms; ttcsim --help {h:.0f} ms ({h - b:.0f} ms over "
          f"bare python); parse {count} profiles {float(seconds) * 1e3:.1f} ms "
          f"({per:.2f} ms each)")


if __name__ == "__main__":
    main()
