"""``python -m ttcsim``: the same command line as ``ttcsim``."""

from ttcsim.cli import main

if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess in the tests
    main(prog_name="ttcsim")
