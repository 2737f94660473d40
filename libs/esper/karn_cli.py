"""`esper tui`, `esper dashboard`, `esper runs index|list|show|compare` and `esper report`: the command
line of karn's consumers. Kept beside cli.py (as stack_cli.py is) because `esper tui` and `esper
dashboard` wire karn's views to the bus follower of esper.transport, and karn itself never imports
the wire code.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
from pathlib import Path

from esper.karn.dashboard.launch import add_dashboard_flags, dashboard_config, serve_forever

COMMANDS = ("tui", "dashboard", "runs", "report")
DEFAULT_DB = "runs/karn.db"


def add_commands(commands: argparse._SubParsersAction) -> None:
    from esper.transport.config import add_token_flag, endpoint  # ports only: no zmq

    tui = commands.add_parser("tui", help="watch runs: replay a telemetry file, or attach to a running stack's bus")
    dashboard = commands.add_parser("dashboard", help="serve the web dashboard of a telemetry file or a running stack")
    for p in (tui, dashboard):
        p.add_argument("--file", type=Path, default=None, help="a telemetry JSONL file to replay (default: attach to the bus)")
        p.add_argument("--hub-sub", type=endpoint, default=None,
                       help="the hub's subscribe endpoint (default: $ESPER_HOST, $ESPER_HUB_SUB_PORT)")
        p.add_argument("--hub-snapshot", type=endpoint, default=None,
                       help="the hub's late-join snapshot endpoint (default: $ESPER_HOST, $ESPER_HUB_SNAPSHOT_PORT)")
        p.add_argument("--run-id", default="", help="follow only this run (default: every run on the bus)")
        add_token_flag(p)
    add_dashboard_flags(dashboard, switch=False)

    runs = commands.add_parser("runs", help="the analytics store of recorded runs (SQLite)")
    sub = runs.add_subparsers(dest="runs_command", required=True)
    index = sub.add_parser("index", help="record runs from run directories, folders of them, or telemetry JSONL files")
    index.add_argument("paths", nargs="+", type=Path)
    sub.add_parser("list", help="every recorded run, with accuracy and parameters")
    show = sub.add_parser("show", help="one run: its numbers and every seed")
    show.add_argument("run_id")
    compare = sub.add_parser("compare", help="runs side by side, and their seeds per blueprint and slot")
    compare.add_argument("run_ids", nargs="*", help="runs to compare (default: every recorded run)")
    report = commands.add_parser("report", help="write a Markdown report with PNG plots")
    report.add_argument("runs", nargs="+", help="run ids in the store, or run directories / JSONL files (indexed first)")
    report.add_argument("--out", type=Path, default=None, help="output folder (default: report/<first run>)")
    for p in (*sub.choices.values(), report):
        p.add_argument("--db", default=DEFAULT_DB, help="the SQLite store")


def run_command(args: argparse.Namespace) -> int:
    if args.command == "tui":
        return cmd_tui(args)
    if args.command == "dashboard":
        return cmd_dashboard(args)
    from esper.karn.runs_db import RunsDB, StoreError

    reads_only = args.command == "runs" and args.runs_command != "index"
    if reads_only and not Path(args.db).is_file():  # a mistyped --db would be a new, empty store
        print(f"esper: error: --db {args.db}: no such store (esper runs index RUN_DIR records runs in one)",
              file=sys.stderr)
        return 2
    why = folder_refusal(args.out, "--out") if args.command == "report" and args.out else None
    existed = Path(args.db).exists()
    try:
        db = RunsDB(args.db)
    except StoreError as exc:
        why = f"--db {exc}"
    if why:
        print(f"esper: error: {why}", file=sys.stderr)
        return 2
    try:
        status = cmd_report(db, args) if args.command == "report" else RUNS[args.runs_command](db, args)
    except sqlite3.DatabaseError as exc:  # a store damaged past its first page opens, and fails when read
        print(f"esper: error: --db {args.db} cannot be read: {exc}", file=sys.stderr)
        return 2
    else:
        if status and not existed and args.db != ":memory:" and not db.runs():  # made for an index that failed
            db.close()
            Path(args.db).unlink(missing_ok=True)
        return status
    finally:
        db.close()


def watched_source(args: argparse.Namespace):
    """(events, title) for `esper tui` and `esper dashboard`: a replayed file, or the bus (late join);
    None (after a line on stderr) when the file is missing or does not begin with a whole event (any file had
    been shown as an empty run)."""
    if args.file is not None:
        if given := [flag for flag, value in (("--hub-sub", args.hub_sub), ("--hub-snapshot", args.hub_snapshot))
                     if value is not None]:
            print(f"esper: error: {' and '.join(given)}: for the bus; --file replays a file", file=sys.stderr)
            return None
        if not args.file.is_file():
            print(f"esper: error: --file {args.file}: no such file", file=sys.stderr)
            return None
        import itertools

        from esper.nissa import read_jsonl

        events = read_jsonl(args.file)
        if args.run_id:  # it had been ignored: every run of the file was shown
            from esper.transport.bus import follows

            events = (e for e in events if follows(args.run_id, e.run_id))
        try:
            first = list(itertools.islice(events, 1))
        except ValueError as exc:  # read_jsonl's, naming the file (and line)
            print(f"esper: error: --file {str(exc).splitlines()[0]}", file=sys.stderr)
            return None
        if not first:  # empty, blank, one line cut short, or none of the run asked for
            what = f"event of run {args.run_id}" if args.run_id else "telemetry event"
            print(f"esper: error: --file {args.file}: no {what} in it", file=sys.stderr)
            return None
        return itertools.chain(first, events), f"{args.file} (run {args.run_id})" if args.run_id else str(args.file)
    from esper.transport.config import fill_stack_defaults
    from esper.transport.follow import BusFollower

    fill_stack_defaults(args)
    return BusFollower(args.hub_sub, args.hub_snapshot, args.run_id, token=args.token), args.hub_sub


def cmd_tui(args: argparse.Namespace) -> int:
    from esper.karn.tui import make_app

    source = watched_source(args)
    if source is None:
        return 2
    make_app(*source).run()
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    try:
        cfg = dashboard_config(args)
    except ValueError as exc:
        print(f"esper: error: {exc}", file=sys.stderr)
        return 2
    source = watched_source(args)
    return 2 if source is None else serve_forever(cfg, *source)


def cmd_index(db, args: argparse.Namespace) -> int:
    for path in args.paths:
        try:
            run_ids = db.index_path(path)
        except (FileNotFoundError, ValueError) as exc:  # no telemetry there, or a line that is not an event
            print(f"esper: error: {exc}", file=sys.stderr)
            return 2
        print(f"{path}: {len(run_ids)} run{'s' if len(run_ids) != 1 else ''} recorded in {args.db}")
    return 0


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def cmd_list(db, args: argparse.Namespace) -> int:
    from esper.karn.report import runs_table

    _print_table(*runs_table(db, [r["run_id"] for r in db.runs()]))
    return 0


def cmd_show(db, args: argparse.Namespace) -> int:
    from esper.karn.report import runs_table

    if not db.runs([args.run_id]):
        print(f"esper: error: no run {args.run_id!r} in {args.db} (esper runs index RUN_DIR first)", file=sys.stderr)
        return 1
    _print_table(*runs_table(db, [args.run_id]))
    print()
    seeds = db.seeds(args.run_id)
    _print_table(["seed", "slot", "blueprint", "germinated", "fate", "at epoch", "contribution (pts)"],
                 [[str(s["seed_id"]), s["slot"], s["blueprint"], str(s["germinated_epoch"]), s["fate"],
                   str(s["end_epoch"]), "-" if s["contribution"] is None else
                   f"{s['contribution']:+.2f} ± {s['contribution_se']:.2f}"] for s in seeds])
    return 0


def cmd_compare(db, args: argparse.Namespace) -> int:
    from esper.karn.report import blueprint_table, runs_table

    run_ids = args.run_ids or [r["run_id"] for r in db.runs()]
    missing = sorted(set(run_ids) - {r["run_id"] for r in db.runs(run_ids)})
    if missing:
        print(f"esper: error: not in {args.db}: {' '.join(missing)}", file=sys.stderr)
        return 1
    _print_table(*runs_table(db, run_ids))
    print()
    _print_table(*blueprint_table(db, run_ids))
    return 0


def cmd_report(db, args: argparse.Namespace) -> int:
    from esper.karn.report import write_report

    run_ids: list[str] = []
    for run in args.runs:
        if Path(run).exists():
            try:
                run_ids += db.index_path(Path(run))
            except (FileNotFoundError, ValueError) as exc:
                print(f"esper: error: {exc}", file=sys.stderr)
                return 2
        elif db.runs([run]):
            run_ids.append(run)
        else:
            print(f"esper: error: {run}: neither a path nor a run in {args.db}", file=sys.stderr)
            return 1
    if not run_ids:
        print("esper: error: the paths hold no telemetry events", file=sys.stderr)
        return 1
    run_ids = list(dict.fromkeys(run_ids))  # a run named twice is one run
    out = args.out or Path("report") / run_ids[0]
    print(write_report(db, run_ids, out))
    return 0


RUNS = {"index": cmd_index, "list": cmd_list, "show": cmd_show, "compare": cmd_compare}


def add_db_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=None,
                   help="record the runs in this SQLite store when they end (default: karn.db in --runs-dir, "
                        "above any {seed} folder)")


def folder_refusal(path: Path, flag: str, given: Path | None = None) -> str | None:
    """Why `path` cannot be an output folder (it, or a folder on the way to it, is a file, or the nearest
    folder of it that exists takes no new entry), else None: checked before anything runs, so a mistyped
    path costs no training. The last is tried, not deduced from permission bits (root passes those, and
    /proc takes no folder even from root): a probe folder is made there and removed. `given`: the flag's
    value, when `path` is the folder of that file."""
    for p in (path, *path.parents):
        try:
            exists = p.exists()
        except OSError as exc:  # a name too long to be one
            return f"{flag} {given or path}: no folder can be there ({exc.strerror})"
        if exists:
            if not p.is_dir():
                return f"{flag} {given or path}: {p} is a file, not a folder"
            try:
                Path(tempfile.mkdtemp(prefix=".esper-probe-", dir=p)).rmdir()
            except OSError as exc:
                return f"{flag} {given or path}: nothing can be written in {p} ({exc.strerror})"
            return None
    return None


def file_refusal(path: Path, flag: str, what: str = "a file", appends: bool = False) -> str | None:
    """Why no file can be written at `path` (a folder there, a file on the way to it, or a folder that takes no
    new entry), else None. A file only ever appended to (a telemetry file) that exists already needs no new
    entry in its folder: it need only open for appending."""
    if appends and path.is_file():
        try:
            path.open("a").close()
        except OSError as exc:
            return f"{flag} {path} cannot be appended to ({exc.strerror})"
        return None
    if why := folder_refusal(path.parent, flag, path):
        return why
    return f"{flag} {path} is a folder: name {what}" if path.is_dir() else None


def check_store(db: Path) -> None:
    """StoreError now, before a run trains, for a store its end could not record in: a file that SQLite
    cannot open for writing or read, or a file where its folder goes. Nothing is created here (mode=rw); a
    store whose writer was killed mid-transaction (a comparison's run, SIGKILLed) has a hot journal, which
    this first reader rolls back, as any would: read-only it could not, and refused a sound store. Whatever
    is only found when the store is written (a folder that cannot be made) is a warning then (`recording`)."""
    import contextlib

    from esper.karn.runs_db import StoreError, foreign

    if db.exists():
        try:
            with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=rw", uri=True)) as conn:
                problems = [row[0] for row in conn.execute("PRAGMA quick_check(3)")]  # every page, not the first
                if problems == ["ok"] and (why := foreign(conn, db)):
                    raise StoreError(why)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{db} cannot be a run store: {exc}") from None
        if problems != ["ok"]:
            raise StoreError(f"{db} cannot be a run store: it is damaged ({'; '.join(problems)})")
    elif why := folder_refusal(db.parent, "its folder"):
        raise StoreError(f"{db} cannot be a run store: {why}")


def store_path(db: str | None, runs_dir: str) -> Path:
    """The store a run records itself in: --db, else karn.db in --runs-dir above its first {seed} folder
    (the episodes of every seed in one store)."""
    parts = Path(runs_dir).parts
    return Path(db) if db else Path(*parts[:next((i for i, p in enumerate(parts) if "{seed}" in p), len(parts))],
                                     "karn.db")


def recording(run, db: Path):
    """`run(cfg, ...)` that records each run directory in the store `db` as the run ends (run's
    `on_finished`: an episode's directory and summary, or a PPO run's), so `esper runs list` shows the episodes that
    finished before a later one failed or was interrupted. The store is checked here, before anything
    trains (check_store); one that fails later is a warning: the runs are whole on disk."""
    import functools

    from esper.karn.runs_db import RunsDB, StoreError

    check_store(db)

    @functools.wraps(run)
    def recorded(cfg, *args, **kwargs):
        def record(run_dir: Path, summary: dict) -> None:
            try:
                store = RunsDB(db)
                try:
                    store.index_path(run_dir)
                finally:
                    store.close()
            except (StoreError, sqlite3.Error, OSError, ValueError) as exc:  # not the run's: the rest trains on
                why = exc if isinstance(exc, StoreError) else f"{db} could not record {run_dir.name}: {exc}"
                print(f"esper: warning: --db {why}; `esper runs index DIR --db STORE` records the runs later",
                      file=sys.stderr)

        return run(cfg, *args, on_finished=record, **kwargs)

    return recorded


def add_tui_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tui", action="store_true", help="watch the run in the terminal UI while it trains")


def train_with_tui(cfg, run) -> None:
    """`run(cfg, console, sinks=...)` in a background thread, feeding the TUI in the main thread (Textual
    needs it for the terminal and signals). The run's own console stays quiet while the app owns the
    screen; quitting the app does not stop the run: its progress shows in the terminal until it ends
    (ctrl-c stops it). An error of the run is raised here, after the app has closed."""
    import threading

    from rich.console import Console

    from esper.karn.tui import QueueSource, make_app

    source = QueueSource()
    console = Console(stderr=True, quiet=True)
    failure: list[BaseException] = []

    def train() -> None:
        try:
            run(cfg, console, sinks=(source,))
        except BaseException as exc:  # re-raised in the main thread, where the CLI reports it
            failure.append(exc)
        finally:
            source.finish()

    thread = threading.Thread(target=train, name="esper-train", daemon=True)
    thread.start()
    make_app(source, title=f"train {cfg.mode} · {cfg.env.task}").run()
    console.quiet = False
    if thread.is_alive():
        print("esper: the TUI closed; the run goes on (ctrl-c stops it)", file=sys.stderr)
        thread.join()
    if failure:
        raise failure[0]
