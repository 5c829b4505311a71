"""Prepare a run's data ahead of time: fit its tokenizer and tokenize its corpus into the cache, then report sizes.

    python recipes/prepare_data.py model=moe_small                       # the recipe's corpus and 32k BPE
    python recipes/prepare_data.py data.scope=site-packages data.tokenizer=bpe model.vocab_size=32000 --json out.json

Takes the same overrides as train.py (composed with Hydra from conf/), runs exactly what a run does before its
first step (`build_tokenizer`, `build_datasets`), and prints what the corpus holds (documents, characters, tokens,
bytes per token, per split) and how long the preparation took. A second call finds everything in the cache
(docs/data.md) and reports the warm time. Run it once before a sweep so that no job waits on the first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare(overrides: list) -> dict:
    """Prepare the data of the run `overrides` describe; return its sizes and the seconds it took."""
    from muon_recipes.data import build_datasets, build_tokenizer
    from muon_recipes.data.token_cache import cache_directory, cache_key, load

    from muon_recipes.config import compose, validate

    rc = compose(overrides, ROOT / "conf")
    validate(rc, world_size=1)
    start = time.perf_counter()
    tokenizer = build_tokenizer(rc.data, rc.model.vocab_size)
    tokenizer_s = time.perf_counter() - start
    build_datasets(rc.data, tokenizer, rc.train.seq_len, rc.seed)
    total_s = time.perf_counter() - start
    # The cache directory just written or checked: its manifest records the sizes.
    manifest = load(cache_directory(rc.data, cache_key(rc.data, tokenizer), tokenizer)).manifest
    return {"corpus": manifest["description"], "tokenizer": manifest["tokenizer"], "splits": manifest["splits"],
            "tokenizer_s": round(tokenizer_s, 2), "total_s": round(total_s, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="train.py overrides, e.g. model=moe_small data.scope=site-packages")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args(argv)
    from muon_recipes.config import ConfigError

    try:
        report = prepare(args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{report['corpus']}; tokenizer {report['tokenizer']}")
    print("| split | documents | text bytes | tokens | bytes/token |")
    print("|---|---:|---:|---:|---:|")
    for split, s in report["splits"].items():
        print(f"| {split} | {s['documents']:,} | {s['text_bytes']:,} | {s['tokens']:,} | "
              f"{s['text_bytes'] / max(s['tokens'], 1):.2f} |")
    print(f"prepared in {report['total_s']:.1f} s (tokenizer {report['tokenizer_s']:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
