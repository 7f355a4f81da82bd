#!/usr/bin/env python
"""Plot loss / perplexity curves of runs: `python tools/plot_runs.py runs/a runs/b -o compare.png`
(installed as `megaeff-plot-runs`)."""

import sys

from megaeff.cli.plot_runs import main

if __name__ == "__main__":
    sys.exit(main())
