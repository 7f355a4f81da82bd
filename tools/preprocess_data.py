#!/usr/bin/env python
"""Tokenize JSONL/text into a Megatron .bin/.idx dataset: `python tools/preprocess_data.py --input corpus/
--output-prefix data/corpus --append-eod` (installed as `megaeff-preprocess-data`)."""

import sys

from megaeff.cli.preprocess_data import main

if __name__ == "__main__":
    sys.exit(main())
