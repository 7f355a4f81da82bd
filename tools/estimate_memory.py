#!/usr/bin/env python
"""Parameters and training-state bytes of any model flavor per linear method, on the meta device:
`python tools/estimate_memory.py --model llama_60m` (installed as `megaeff-estimate-memory`)."""

import sys

from megaeff.cli.estimate_memory import main

if __name__ == "__main__":
    sys.exit(main())
