"""`loop feedback export` and `loop feedback stats`: the feedback history from a running loop, over HTTP.

    loop feedback export --format preference --out pairs.jsonl            TRL preference JSONL (DPO)
    loop feedback export --format unpaired --out thumbs.jsonl --standard  TRL unpaired JSONL, plain strings
    loop feedback export --format preference --out - --since 2026-11-01 --untrained-only
    loop feedback stats [--json]

The export streams `GET /api/export/<format>.jsonl` to the file line by line (constant memory) behind a tqdm
progress bar whose total comes from `/api/stats` (with filters the total is an upper bound). The file is
written to a temporary name beside the target and renamed at the end, so an interrupted export never leaves a
half file under the real name. `--url` defaults to $LOOP_URL or http://127.0.0.1:8000.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    p = sub.add_parser("feedback", help="export or summarise feedback (ratings, comparisons)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fsub = p.add_subparsers(dest="feedback_command", metavar="ACTION")
    fsub.required = True

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--url", default=os.environ.get("LOOP_URL", "http://127.0.0.1:8000"),
                       help="the running loop (default: $LOOP_URL or http://127.0.0.1:8000)")
        q.add_argument("--timeout", type=float, default=60.0)

    e = fsub.add_parser("export", help="write TRL JSONL (preference or unpaired)")
    common(e)
    e.add_argument("--format", required=True, choices=["preference", "unpaired"],
                   help="preference: prompt/chosen/rejected; unpaired: prompt/completion/label")
    e.add_argument("--out", required=True, help="output file, or - for stdout")
    e.add_argument("--standard", action="store_true",
                   help="plain-text prompt/answers instead of conversational message lists")
    e.add_argument("--since", help="ISO-8601 time: feedback given at or after")
    e.add_argument("--until", help="ISO-8601 time: feedback given before")
    e.add_argument("--model")
    e.add_argument("--weight-version", type=int)
    e.add_argument("--rater")
    e.add_argument("--untrained-only", action="store_true", help="leave out feedback a training run consumed")
    e.add_argument("--include-held-out", action="store_true")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=export)

    s = fsub.add_parser("stats", help="counts by day, rating distribution, training data available")
    common(s)
    s.add_argument("--days", type=int, default=14)
    s.add_argument("--json", action="store_true", help="print the raw JSON")
    s.set_defaults(func=stats)


def _fail(message: str) -> int:
    print(f"loop: {message}", file=sys.stderr)
    return 1


def _error_text(r: httpx.Response) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return r.text[:500]


def _get_stats(url: str, timeout: float, days: int = 1) -> dict[str, Any]:
    r = httpx.get(f"{url}/api/stats", params={"days": days}, timeout=timeout)
    if r.status_code != 200:
        raise httpx.HTTPStatusError(f"GET /api/stats: {r.status_code} {_error_text(r)}", request=r.request,
                                    response=r)
    return r.json()


def export(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/")
    params: dict[str, Any] = {"format": "standard" if args.standard else "conversational"}
    for name in ("since", "until", "model", "weight_version", "rater"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    if args.untrained_only:
        params["untrained_only"] = "true"
    if args.include_held_out:
        params["include_held_out"] = "true"
    try:
        st = _get_stats(url, args.timeout)
    except httpx.HTTPError as exc:
        return _fail(f"cannot read stats from {url}: {exc} (is `loop serve` running? --url?)")
    key = ("untrained_" if args.untrained_only else "") + ("pairs" if args.format == "preference" else "unpaired")
    if not args.untrained_only:
        key += "_available"
    total = st.get(key)
    to_stdout = args.out == "-"
    target = None if to_stdout else Path(args.out)
    if target is not None and not target.parent.is_dir():
        return _fail(f"--out {args.out}: folder {target.parent} does not exist")
    tmp_path: str | None = None
    out: Any = None
    written = 0
    try:
        if to_stdout:
            out = sys.stdout.buffer
        else:
            fd, tmp_path = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            out = os.fdopen(fd, "wb")
        with httpx.stream("GET", f"{url}/api/export/{args.format}.jsonl", params=params,
                          timeout=httpx.Timeout(args.timeout, read=None)) as r:
            if r.status_code != 200:
                r.read()
                return _fail(f"export failed: {r.status_code} {_error_text(r)}")
            with tqdm(total=total, unit=" rows", desc=f"{args.format}", disable=args.quiet or to_stdout,
                      file=sys.stderr) as bar:
                for line in r.iter_lines():
                    if not line:
                        continue
                    out.write(line.encode() + b"\n")
                    written += 1
                    bar.update(1)
        if not to_stdout:
            out.close()
            os.replace(tmp_path, target)
            tmp_path = None
    except httpx.HTTPError as exc:
        return _fail(f"export from {url} failed: {exc}")
    finally:
        if tmp_path is not None:
            if out is not None and not out.closed:
                out.close()
            os.unlink(tmp_path)
    if not to_stdout:
        print(f"wrote {written} {args.format} rows to {target}", file=sys.stderr)
    return 0


def stats(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/")
    try:
        st = _get_stats(url, args.timeout, args.days)
    except httpx.HTTPError as exc:
        return _fail(f"cannot read stats from {url}: {exc} (is `loop serve` running? --url?)")
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"responses {st['responses_total']}   ratings {st['ratings_total']}   "
          f"comparisons {st['comparisons_total']}")
    print(f"thumbs    up {st['thumbs']['up']}   down {st['thumbs']['down']}")
    scores = st["scores"]
    peak = max(scores.values()) or 1
    for score in map(str, range(1, 11)):
        print(f"score {score:>2}  {scores[score]:6d}  {'#' * round(30 * scores[score] / peak)}")
    print(f"training data: {st['pairs_available']} preference pairs ({st['untrained_pairs']} untrained), "
          f"{st['unpaired_available']} unpaired examples ({st['untrained_unpaired']} untrained)")
    if st["by_day"]:
        print(f"{'day':12}{'responses':>10}{'ratings':>10}{'comparisons':>12}")
        for d in st["by_day"]:
            print(f"{d['day']:12}{d['responses']:10d}{d['ratings']:10d}{d['comparisons']:12d}")
    return 0
