"""Tokenize JSONL / text files into a Megatron-format indexed dataset (`<prefix>.bin` + `<prefix>.idx`).

    megaeff-preprocess-data --input corpus/ --output-prefix data/corpus --append-eod --workers 4
    megaeff-preprocess-data --input a.jsonl b.jsonl --output-prefix data/ab --tokenizer hf \\
        --tokenizer-path tokenizer.json --append-eod --num-shards 4 --merge
    megaeff-preprocess-data --merge-shards data/x_shard0of2 data/x_shard1of2 --output-prefix data/x

Inputs: *.jsonl / *.json (one JSON object per line, text under --json-key), other files as plain text (one
document per file, or per non-empty line with --text-mode lines), directories (searched recursively for *.jsonl,
*.json, *.txt in sorted order). The output is identical for any --workers. Contiguous shards (the default) hold
consecutive documents, split by input bytes, so merging them reproduces the unsharded dataset byte for byte;
round-robin shards deal document j to shard j % K. A run that fails leaves no output files.
"""

from __future__ import annotations

import argparse
import json
import sys

from megaeff.data.preprocess import SHARD_MODES, TEXT_MODES, merge_shards, preprocess, summary
from megaeff.data.tokenizer import TOKENIZERS, build_tokenizer
from megaeff.errors import EXIT_USAGE, MegaeffError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's one error prefix (`megaeff: error:`, as megaeff-train prints it)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"megaeff: error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    ap = ArgumentParser(
        prog="megaeff-preprocess-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = ap.add_argument_group("input")
    src.add_argument("--input", nargs="+", metavar="PATH", help="JSONL/text files or directories")
    src.add_argument("--json-key", default="text", help="JSON field holding the text (default: text)")
    src.add_argument(
        "--text-mode",
        choices=TEXT_MODES,
        default="document",
        help="plain text files: one document per file (default) or per non-empty line",
    )
    src.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed JSONL lines")
    src.add_argument("--allow-empty", action="store_true", help="accept input files without documents")
    tok = ap.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer", choices=list(TOKENIZERS), default="byte")
    tok.add_argument("--tokenizer-path", help="tokenizer.json or transformers directory (hf), .model (sentencepiece)")
    tok.add_argument("--append-eod", action="store_true", help="end each document with the tokenizer's EOS id")
    out = ap.add_argument_group("output")
    out.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx")
    out.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    out.add_argument("--num-shards", type=int, default=1, help="write <prefix>_shard{i}of{K} instead")
    out.add_argument("--shard-mode", choices=SHARD_MODES, default="contiguous")
    out.add_argument("--merge", action="store_true", help="merge the shards into <prefix> and remove them")
    out.add_argument("--merge-shards", nargs="+", metavar="PREFIX", help="only merge these datasets, in order")
    log = ap.add_argument_group("reporting")
    log.add_argument("--log-interval", type=float, default=1.0, help="seconds between progress lines")
    log.add_argument("--quiet", action="store_true", help="no progress lines")
    log.add_argument("--stats-json", help="also write the final statistics to this JSON file")
    args = ap.parse_args(argv)
    if bool(args.input) == bool(args.merge_shards):
        ap.error("give either --input or --merge-shards")
    if args.workers < 1 or args.num_shards < 1:
        ap.error("--workers and --num-shards must be at least 1")
    if args.merge and args.num_shards < 2:
        ap.error("--merge needs --num-shards of 2 or more")
    return args


def run(args: argparse.Namespace) -> dict:
    if args.merge_shards:
        stats = merge_shards(args.merge_shards, args.output_prefix)
        print(
            f"preprocess: merged {stats['shards']} shard(s): {stats['docs']:,} docs, {stats['tokens']:,} tokens "
            f"-> {args.output_prefix} (.bin/.idx)"
        )
        return stats
    tokenizer = build_tokenizer(args.tokenizer, args.tokenizer_path)
    stats = preprocess(
        args.input,
        args.output_prefix,
        tokenizer,
        workers=args.workers,
        json_key=args.json_key,
        text_mode=args.text_mode,
        append_eod=args.append_eod,
        num_shards=args.num_shards,
        shard_mode=args.shard_mode,
        merge=args.merge,
        skip_bad_lines=args.skip_bad_lines,
        allow_empty=args.allow_empty,
        progress=None if args.quiet else sys.stderr,
        log_interval=args.log_interval,
    )
    print(summary(stats))
    return stats


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        stats = run(args)
    except MegaeffError as exc:
        print(f"megaeff: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # unreadable input, full disk, unwritable output directory
        print(f"megaeff: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("preprocess: interrupted; no output written", file=sys.stderr)
        return 130
    if args.stats_json:
        with open(args.stats_json, "w") as f:
            json.dump(stats, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
