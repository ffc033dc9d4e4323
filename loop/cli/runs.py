"""`loop runs`, `loop versions`, `loop rollback`, `loop scheduler`: history and control over the HTTP API.

    loop runs [--status rolled_back] [--limit 20]      training runs, newest first
    loop runs show 12                                   one run: batch, metrics per step, eval, rollback reason
    loop versions                                       weight versions with their eval figures
    loop rollback 3 [--yes]                             write version 3's checkpoint back into the live weights
    loop scheduler status|pause|resume|run              the scheduler (run = train on what waits, now)
    loop scheduler config --min-pairs 4 --interval-s 60 change thresholds at runtime (persisted; every tunable of
                                                        loop/scheduler/tunables.py is a flag)
    loop quarantine [list|show ID|requeue ID|drop ID]   feedback the screen held back (requeue/drop: admin)
    loop raters signal                                  per rater: does their feedback pull against what was learned?

Every command talks to a running `loop serve` (`--url`, default $LOOP_URL or http://127.0.0.1:8000). Admin
commands send the token from `--token`, $LOOP_ADMIN_TOKEN, or the file `admin_token` in the data dir
(`--data-dir`, default $LOOP_DATA_DIR or ~/.local/share/loop). `--json` prints the raw answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from loop.cli.flags import add_model_flags, given
from loop.paths import default_data_dir
from loop.scheduler.tunables import TunableChanges


def _token(args: argparse.Namespace) -> str | None:
    if args.token:
        return args.token
    if os.environ.get("LOOP_ADMIN_TOKEN"):
        return os.environ["LOOP_ADMIN_TOKEN"]
    if args.data_dir:
        data_dir = Path(args.data_dir)
    else:
        data_dir = Path(os.environ["LOOP_DATA_DIR"]) if os.environ.get("LOOP_DATA_DIR") else default_data_dir()
    path = data_dir / "admin_token"
    return path.read_text().strip() if path.is_file() else None


class ApiError(Exception):
    pass


def _call(args: argparse.Namespace, method: str, path: str, *, admin: bool = False, **kw: Any) -> Any:
    headers = {}
    if admin:
        token = _token(args)
        if token is None:
            raise ApiError("this command needs the admin token: pass --token, set LOOP_ADMIN_TOKEN, or point "
                           "--data-dir at the server's data dir (it holds the file admin_token)")
        headers["authorization"] = f"Bearer {token}"
    try:
        response = httpx.request(method, args.url.rstrip("/") + path, headers=headers, timeout=args.timeout, **kw)
    except httpx.HTTPError as exc:
        raise ApiError(f"cannot reach loop at {args.url}: {exc} (is `loop serve` running? --url?)") from exc
    try:
        data = response.json()
    except ValueError:
        data = {"error": {"message": response.text[:500]}}
    if response.status_code >= 400:
        err = data.get("error", {}) if isinstance(data, dict) else {}
        raise ApiError(f"{response.status_code}: {err.get('message', data)}")
    return data


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _print_table(rows: list[list[Any]], header: list[str]) -> None:
    cells = [header] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


# ------------------------------------------------------------------------------------------- commands


def cmd_runs(args: argparse.Namespace) -> int:
    if args.action == "show":
        if args.run_id is None:
            raise ApiError("`loop runs show` needs a run id, e.g. `loop runs show 3`")
        run = _call(args, "GET", f"/api/runs/{args.run_id}")
        if args.json:
            print(json.dumps(run, indent=2))
            return 0
        print(f"run {run['id']}: {run['status']} ({run['trigger']}, {run['objective']}), "
              f"version {run['version_before']} -> {run['version_after']}")
        if run.get("reason"):
            print(f"  why: {run['reason']}")
        print(f"  created {run['created_at']}, finished {run['finished_at']}")
        print(f"  batch: {json.dumps({k: v for k, v in run['batch'].items() if k != 'scheduler'})}")
        for when in ("eval_before", "eval_after"):
            e = run.get(when)
            if e:
                print(f"  {when}: accuracy {_fmt(e.get('accuracy'))} on {e.get('n_pairs')} pairs, "
                      f"canary perplexity {_fmt(e.get('canary_perplexity'))}")
        screen = (run.get("metrics") or {}).get("screen")
        if screen:
            print(f"  screen: p {_fmt(screen.get('p_value'), 4)} (level {screen.get('alpha')}) over {screen.get('n')} "
                  f"items, {screen.get('quarantined')} quarantined{'; ' + screen['note'] if screen.get('note') else ''}")
            by = screen.get("p_by_direction") or {}
            if screen.get("direction"):
                print(f"  screen direction: {screen['direction']} ({screen.get('n_anchors') or 0} anchor pairs); p by "
                      "direction: " + ", ".join(f"{d} {_fmt(p, 4)}" for d, p in by.items()))
        if run.get("rollback_reason"):
            print(f"  ROLLED BACK: {run['rollback_reason']}")
        elif run.get("error"):
            print(f"  error: {run['error']}")
        if run["history"]:
            keys = sorted({k for h in run["history"] for k in h})
            _print_table([[h.get(k) for k in keys] for h in run["history"]], keys)
        return 0
    params: dict[str, Any] = {"limit": args.limit}
    if args.status:
        params["status"] = args.status
    data = _call(args, "GET", "/api/runs", params=params)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    _print_table([[r["id"], r["created_at"][:19], r["status"], r["trigger"], r["objective"], r["size"], r["loss"],
                   f"{_fmt(r['version_before'])}->{_fmt(r['version_after'])}", r["accuracy_before"],
                   r["accuracy_after"], r["perplexity_before"], r["perplexity_after"]] for r in data["items"]],
                 ["id", "created", "status", "trigger", "obj", "size", "loss", "versions", "acc_before", "acc_after",
                  "ppl_before", "ppl_after"])
    print(f"{len(data['items'])} of {data['total']} runs")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    data = _call(args, "GET", "/api/versions")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = []
    for v in data["items"]:
        e = v.get("eval") or {}
        rows.append([("* " if v["version"] == data["live"] else "  ") + str(v["version"]), v["kind"], v["status"],
                     v["parent_version"], v["run_id"], "yes" if v["checkpoint_path"] else "no",
                     e.get("accuracy"), e.get("canary_perplexity"), (v.get("note") or "")[:60]])
    _print_table(rows, ["version", "kind", "status", "parent", "run", "ckpt", "accuracy", "perplexity", "note"])
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            raise ApiError("rollback changes the live weights: pass --yes to confirm")
        answer = input(f"write version {args.version}'s checkpoint back into the live weights? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("cancelled")
            return 1
    data = _call(args, "POST", f"/api/versions/{args.version}/restore", admin=True)
    print(json.dumps(data) if args.json else f"restored version {data['restored_from']}: live version is now "
                                             f"{data['version']}")
    return 0


def cmd_scheduler(args: argparse.Namespace) -> int:
    if args.action == "status":
        data = _call(args, "GET", "/api/scheduler")
    elif args.action == "config":
        body = given(args, TunableChanges.model_fields)
        if not body:
            raise ApiError("`loop scheduler config` needs at least one setting, e.g. --min-pairs 4")
        data = _call(args, "POST", "/api/scheduler/config", admin=True, json=body)
    else:
        data = _call(args, "POST", f"/api/scheduler/{args.action}", admin=True)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"scheduler: {data['state']}{' (paused)' if data['paused'] else ''}; untrained {data['untrained']}")
    print(f"  thresholds: {json.dumps(data['thresholds'])}")
    print(f"  next trigger: {data['next_trigger_estimate']}; last run {data['last_run_id']} "
          f"({data['last_trigger']}: {data['last_reason']})")
    if data.get("last_error"):
        print(f"  last error: {data['last_error']}")
    return 0


def cmd_quarantine(args: argparse.Namespace) -> int:
    if args.action in ("show", "requeue", "drop") and args.id is None:
        raise ApiError(f"`loop quarantine {args.action}` needs an id from `loop quarantine list`")
    if args.action == "list":
        data = _call(args, "GET", "/api/quarantine", params={"state": args.state} if args.state else {})
    elif args.action == "show":
        data = _call(args, "GET", f"/api/quarantine/{args.id}")
    else:
        body = {k: v for k, v in (("by", args.by), ("note", args.note)) if v is not None}
        data = _call(args, "POST", f"/api/quarantine/{args.id}/{args.action}", admin=True, json=body)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    if args.action == "list":
        _print_table([[q["id"], str(q["created_at"])[:19], q["run_id"], q["state"], q["scope"], q["n_items"],
                       (q["evidence"] or {}).get("p_value"), q["reason"][:70]] for q in data["items"]],
                     ["id", "created", "run", "state", "scope", "items", "p", "reason"])
        print(f"{data['held']} held")
        return 0
    print(f"quarantine {data['id']} (run {data['run_id']}): {data['state']}, {data['scope']}")
    print(f"  why: {data['reason']}")
    print(f"  ratings {data['rating_ids']}, comparisons {data['comparison_ids']}")
    if data.get("decided_at"):
        print(f"  decided {data['decided_at']}{' by ' + data['decided_by'] if data.get('decided_by') else ''}"
              f"{': ' + data['note'] if data.get('note') else ''}")
    return 0


def cmd_raters(args: argparse.Namespace) -> int:
    data = _call(args, "GET", "/api/raters/signal", params={"runs": args.runs})
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    _print_table([[r["rater"], r["items"], r["down"], r["mean_contribution"], r["p_value"], r["quarantined"],
                   "FLAGGED" if r["flagged"] else ""] for r in data["raters"]],
                 ["rater", "items", "pulled back", "mean", "p", "quarantined", ""])
    print(f"over the screens of {data['runs']} scheduled runs; flagged: p < {data['alpha']}")
    return 0


# ------------------------------------------------------------------------------------------- wiring


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("LOOP_URL", "http://127.0.0.1:8000"), help="loop's address")
    p.add_argument("--token", help="admin token (default $LOOP_ADMIN_TOKEN or <data dir>/admin_token)")
    p.add_argument("--data-dir", help="where to find admin_token (default $LOOP_DATA_DIR or ~/.local/share/loop)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for an answer")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")


def _wrap(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except ApiError as exc:
            print(f"loop: {exc}", file=sys.stderr)
            return 2
    return run


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    p = sub.add_parser("runs", help="training runs: list, or `show ID`")
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    p.add_argument("run_id", nargs="?", type=int)
    p.add_argument("--status", help="only runs with this status (succeeded, rolled_back, failed, refused, ...)")
    p.add_argument("--limit", type=int, default=20)
    _common(p)
    p.set_defaults(func=_wrap(cmd_runs))

    p = sub.add_parser("versions", help="weight versions with their eval figures")
    _common(p)
    p.set_defaults(func=_wrap(cmd_versions))

    p = sub.add_parser("rollback", help="write an earlier version's checkpoint back into the live weights")
    p.add_argument("version", type=int)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    _common(p)
    p.set_defaults(func=_wrap(cmd_rollback))

    p = sub.add_parser("scheduler", help="the automatic trainer: status, pause, resume, run now, config")
    p.add_argument("action", choices=["status", "pause", "resume", "run", "config"])
    add_model_flags(p.add_argument_group("config: new values (loop/scheduler/tunables.py; the server's settings "
                                         "apply to those left out)"), TunableChanges, show_default=False)
    _common(p)
    p.set_defaults(func=_wrap(cmd_scheduler))

    p = sub.add_parser("quarantine", help="feedback the screen held back: list, show, requeue, drop")
    p.add_argument("action", nargs="?", choices=["list", "show", "requeue", "drop"], default="list")
    p.add_argument("id", nargs="?", type=int)
    p.add_argument("--state", choices=["held", "requeued", "dropped"], help="list only these")
    p.add_argument("--by", help="who decides (recorded)")
    p.add_argument("--note", help="why (recorded)")
    _common(p)
    p.set_defaults(func=_wrap(cmd_quarantine))

