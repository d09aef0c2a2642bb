"""The downloads sensor's settled state, kept in a small SQLite file under the dataset root
(``scratch/state/downloads-<id>.sqlite``) so that a tick costs what changed, not what exists.

One tick (:meth:`DownloadsState.tick`):

1. **Session folders**: a folder of ``downloads/`` is listed again only when its own mtime
   (or inode) changed, when it changed less than ``settle_window`` seconds ago (a file
   created in the same clock tick as the listing would not move the mtime again), when the
   manifest, ``dicom_dir_map.tsv`` or the config changed (every name is then classified
   again), or every ``relist_every`` ticks as a safety net (NFS attribute caches). A listing
   costs no ``stat``: names, inodes and entry types come from ``readdir``. New names (or a
   known name with a new inode: a dump replaced by a rename) are classified and signed;
   names gone from the listing are dropped (a pending dump that vanished is forgotten; a
   taken one is remembered with its token, so an identical copy put back is not run twice).
   At most ``max_new`` new names are examined per tick; the rest wait for the next tick.
2. **Unsettled dumps** (seen, not yet stable) are signed again: a signature (size, mtime,
   file count) unchanged since the last tick, or a ``<dump>.done`` marker, makes a dump
   *ready*; ready dumps wait in order (the tick they became ready, then path).
3. **Audit**: up to ``audit`` taken dumps (and at most ``audit_seconds``) are signed again,
   round-robin, so a dump re-delivered in place (same name and inode, new mtime or size)
   is taken again within ``taken / audit`` ticks.
4. **Batch**: at most ``batch`` ready dumps are taken (each checked once more: a dump that
   vanished is dropped, one that changed waits to settle again).

The Dagster cursor holds only the state's id and the tick number (``gen``): the cursor is
the commit point. Every change a tick makes is journaled; when the next tick arrives with
the previous cursor (the daemon did not keep the last result), that tick's changes are
rolled back first, so no dump is lost between the sensor and the instance. A cursor that
names no state file (a new sensor, a cursor reset, scratch/ cleaned) starts a new state;
Dagster's run keys (path + signature) keep an unchanged dump from running twice.

No Dagster import here (core/ is Dagster-free); ``defs/ingest.py`` turns the outcome into
run requests and partition adds.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .downloads import (
    DONE_SUFFIX,
    classify_entry,
    entry_is_dir,
    names_by_download,
    participant_index,
    passed_over,
    signature,
)
from .errors import DicomAssetsError
from .fsutil import file_token
from .layout import DatasetLayout

STATE_VERSION = 2
CLASSIFY_VERSION = "1"  # bump when classify_entry changes what it decides: every name is classified again

NEW, READY, TAKEN, PROBLEM, UNREADABLE, GONE = "new", "ready", "taken", "problem", "unreadable", "gone"
COLS = ("rel", "session", "name", "inode", "kind", "visit", "problem", "done", "token", "state", "ready_gen",
        "taken_token")


def _b(s: str) -> bytes:
    """Names as the OS gives them (lone surrogates for bytes that are no UTF-8) -> BLOB."""
    return s.encode("utf-8", "surrogateescape")


def _s(b: bytes | str | None) -> str | None:
    return b.decode("utf-8", "surrogateescape") if isinstance(b, bytes) else b


class StateDamaged(DicomAssetsError):
    """The sensor's state file cannot be used (not a database, a malformed page, a garbled
    row, read-only): :meth:`DownloadsState.healed` replaces it."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"sensor state {path} is damaged: {reason}")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class SensorLimits:
    """How much one tick of the downloads sensor does (the site sets them through
    ``DICOM_ASSETS_SENSOR_*``, read by ``dicom_assets.settings``)."""

    batch: int = 200          # run requests (and partition adds) per tick
    audit: int = 2000         # taken dumps signed again per tick (round-robin)
    audit_seconds: float = 0.15
    max_new: int = 20000      # new names examined per tick
    settle_window: float = 2.0  # a session folder changed this recently is listed again next tick
    relist_every: int = 60    # list every session folder at least every N ticks


@dataclass(frozen=True)
class Taken:
    rel: str      # <session>/<name>
    visit: str    # visit key
    token: str    # signature token: the run key is rel:token


@dataclass
class TickOutcome:
    gen: int
    state_id: str
    taken: list[Taken] = field(default_factory=list)
    waiting: int = 0                      # seen, not yet stable
    waiting_first: list[str] = field(default_factory=list)
    queued: int = 0                       # ready, left for later ticks
    problems: int = 0                     # entries not taken, with a reason
    first_problem: str | None = None
    new_problems: list[str] = field(default_factory=list)  # to log once
    dropped: list[str] = field(default_factory=list)       # pending dumps that vanished
    notes: list[str] = field(default_factory=list)         # state resets and the like
    listed: list[str] = field(default_factory=list)        # session folders listed this tick
    audited: int = 0
    # the taken dumps of each visit taken this tick (what DownloadsState.taken_tokens answers),
    # read in the tick's own transaction, after its writes
    observed: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def cursor(self) -> str:
        return json.dumps({"v": STATE_VERSION, "state": self.state_id, "gen": self.gen, "queued": self.queued,
                           "waiting": self.waiting}, sort_keys=True, separators=(",", ":"))


def parse_cursor(raw: str | None) -> dict:
    try:
        data = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        data = {}
    return data if isinstance(data, dict) else {}


def context_token(config_path: Path, manifest_path: Path, dir_map_path: Path, sessions) -> str:
    """What classification depends on: config (sessions), manifest, dicom_dir_map.tsv (each
    file by its :func:`~.fsutil.file_token`)."""
    return "|".join([CLASSIFY_VERSION, ",".join(sessions)] + [file_token(p) for p in
                                                              (config_path, manifest_path, dir_map_path)])


def _sign(path, kind: str) -> str:
    return signature(path).token() if kind != "none" else ""


class DownloadsState:
    """The state file of one sensor (one id): ``layout.downloads_state_path(id)``, of the
    downloads under ``layout.downloads_root``."""

    def __init__(self, layout: DatasetLayout, state_id: str):
        self.layout, self.state_id = layout, state_id
        self.path = layout.downloads_state_path(state_id)
        self._observed: dict[str, list[tuple[str, str]]] = {}  # the last tick's TickOutcome.observed

    # ----------------------------------------------------------------- opening
    @classmethod
    def for_cursor(cls, layout: DatasetLayout, raw_cursor: str | None) -> tuple["DownloadsState", int, list[str], dict]:
        """The state a cursor names (created when it names none), the cursor's tick number,
        notes for the log, and what an old (v1, JSON maps) cursor had taken, to carry over."""
        data = parse_cursor(raw_cursor)
        notes: list[str] = []
        legacy: dict = {}
        if data.get("v") == STATE_VERSION and isinstance(data.get("state"), str) and data["state"].isalnum():
            st = cls(layout, data["state"])
            if st.path.exists():
                return st, int(data.get("gen", 0)), notes, legacy
            notes.append(f"sensor state {st.path} is missing (scratch/ cleaned?): starting a new state; "
                         "run keys keep unchanged downloads from running twice")
        elif data.get("submitted"):
            legacy = {k: v for k, v in data["submitted"].items() if isinstance(k, str) and isinstance(v, str)}
            notes.append(f"cursor of the previous format: {len(legacy)} taken download(s) carried over into the "
                         "sensor's state file")
        st = cls(layout, uuid.uuid4().hex[:16])
        return st, 0, notes, legacy

    def connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript("""
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
            CREATE TABLE IF NOT EXISTS items (
                rel BLOB PRIMARY KEY, session TEXT NOT NULL, name BLOB NOT NULL, inode INTEGER,
                kind TEXT, visit TEXT, problem BLOB, done INTEGER NOT NULL DEFAULT 0, token TEXT,
                state TEXT NOT NULL, ready_gen INTEGER, taken_token TEXT);
            CREATE INDEX IF NOT EXISTS items_state ON items (state, ready_gen, rel);
            CREATE INDEX IF NOT EXISTS items_session ON items (session);
            CREATE INDEX IF NOT EXISTS items_visit ON items (visit);
            CREATE TABLE IF NOT EXISTS participants (low TEXT NOT NULL, p TEXT NOT NULL);
            CREATE INDEX IF NOT EXISTS participants_low ON participants (low);
            CREATE TABLE IF NOT EXISTS undo (gen INTEGER NOT NULL, kind TEXT NOT NULL, key BLOB NOT NULL, row TEXT);
            CREATE INDEX IF NOT EXISTS undo_gen ON undo (gen);
        """)
        return db

    # ----------------------------------------------------------------- one tick
    def tick(self, cursor_gen: int, *, sessions: tuple[str, ...], ctx_token: str,
             classifier: Callable[[], tuple[set[str], dict]], settings: SensorLimits = SensorLimits(),
             legacy: dict | None = None, notes: list[str] | None = None) -> TickOutcome:
        try:
            return self._tick(cursor_gen, sessions=sessions, ctx_token=ctx_token, classifier=classifier,
                              settings=settings, legacy=legacy, notes=notes)
        except sqlite3.DatabaseError as exc:  # zeroed bytes, a malformed page, a read-only file
            raise StateDamaged(self.path, f"{type(exc).__name__}: {exc}") from None

    def healed(self, damage: "StateDamaged") -> tuple["DownloadsState", str]:
        """A new, empty state in place of this damaged one, and the note that says so. The damaged
        file (with its -wal and -shm) is set aside as ``<name>.damaged-<UTC time>``, never
        deleted; the new state lists every download again, and the run keys (``<dump>:<signature>``)
        keep the dumps already taken from running twice."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        moved = True
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            try:
                if src.exists():
                    os.replace(src, Path(f"{aside}{suffix}"))
            except OSError:  # a folder we cannot write: the new state gets a new name anyway
                moved = False
        fresh = DownloadsState(self.layout, uuid.uuid4().hex[:16])
        where = f"set aside as {aside}" if moved else f"left where it is ({self.path} cannot be moved)"
        return fresh, (f"sensor state {damage.path} is damaged ({damage.reason}): {where}; starting a new state "
                       f"{fresh.path}: every download is signed again, run keys keep those already taken from "
                       "running twice")

    def _tick(self, cursor_gen: int, *, sessions: tuple[str, ...], ctx_token: str,
              classifier: Callable[[], tuple[set[str], dict]], settings: SensorLimits = SensorLimits(),
              legacy: dict | None = None, notes: list[str] | None = None) -> TickOutcome:
        db = self.connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            out = _Tick(db, self.state_id, cursor_gen, self.layout, sessions, ctx_token, classifier, settings,
                        legacy or {}, list(notes or [])).run()
            out.observed = _taken_tokens(db, sorted({t.visit for t in out.taken}))
            db.execute("COMMIT")
            self._observed = out.observed
            return out
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def taken_tokens(self, visits) -> dict[str, list[tuple[str, str]]]:
        """The taken dumps of each visit: ``(<session>/<name>, signature token)`` pairs, what
        the sensor reports as the visit's ``downloads`` data version (a dump split in parts
        gives several; one still arriving or gone is not among them).

        The visits taken by the last :meth:`tick` are answered from what that tick read on its
        own connection (nothing else writes the state in between: the sensor asks right after
        its tick); other visits open the state file."""
        visits = list(dict.fromkeys(visits))
        if all(v in self._observed for v in visits):
            return {v: list(self._observed[v]) for v in visits}
        db = self.connect()
        try:
            return _taken_tokens(db, visits)
        finally:
            db.close()


def _taken_tokens(db: sqlite3.Connection, visits) -> dict[str, list[tuple[str, str]]]:
    """:meth:`DownloadsState.taken_tokens` on an open connection."""
    return {v: sorted((_s(rel), tok) for rel, tok in db.execute(
        "SELECT rel, taken_token FROM items WHERE visit=? AND state='taken'", (v,))) for v in visits}


def _row(r) -> dict:
    d = dict(zip(COLS, r))
    d["rel"], d["name"], d["problem"] = _s(d["rel"]), _s(d["name"]), _s(d["problem"])
    return d


def _enc(d: dict) -> tuple:
    return tuple(_b(d[c]) if c in ("rel", "name", "problem") and d[c] is not None else d[c] for c in COLS)


class _Tick:
    def __init__(self, db, state_id, cursor_gen, layout: DatasetLayout, sessions, ctx_token, classifier, settings,
                 legacy, notes):
        self.db, self.layout, self.sessions, self.ctx_token = db, layout, tuple(sessions), ctx_token
        self.classifier, self.s, self.legacy = classifier, settings, legacy
        self.rows: dict[str, dict | None] = {}   # rel -> new row (None: deleted), written at the end
        self.old: dict[str, dict | None] = {}    # rel -> row before this tick (journal)
        self.meta_new: dict[str, str | None] = {}
        self._cls = None
        self.now_ns = time.time_ns()
        self.out = TickOutcome(gen=0, state_id=state_id, notes=notes)
        self.cursor_gen = cursor_gen
        self.new_budget = settings.max_new

    # --------------------------------------------------------------- helpers
    def meta(self, key: str) -> str | None:
        if key in self.meta_new:
            return self.meta_new[key]
        r = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return r[0] if r else None

    def set_meta(self, key: str, value: str | None) -> None:
        self.meta_new[key] = value

    def classify(self):
        """What names are classified against: read from the manifest when it changed (and kept
        in the state's ``participants`` table), else from that table, one look-up per name
        prefix: 10 new dumps do not read a manifest of 100,000 rows."""
        if self._cls is None:
            if self.meta("participants_for") == self.ctx_token:
                by_name = {(ses, name): p for ses, name, p in json.loads(self.meta("by_name") or "[]")}
                self._cls = ((), _SqlIndex(self.db), by_name)
            else:
                participants, dir_map = self.classifier()
                index = participant_index(participants)
                by_name = names_by_download(dir_map)
                self.db.execute("DELETE FROM participants")
                self.db.executemany("INSERT INTO participants VALUES (?, ?)",
                                    [(low, p) for low, ps in index.items() for p in ps])
                self.set_meta("participants_for", self.ctx_token)
                self.set_meta("by_name", json.dumps([[ses, name, p] for (ses, name), p in by_name.items()]))
                self._cls = (participants, index, by_name)
        return self._cls

    def put(self, rel: str, old: dict | None, new: dict | None) -> None:
        if rel not in self.old:
            self.old[rel] = old
        self.rows[rel] = new

    def current(self, rel: str, loaded: dict | None) -> dict | None:
        return self.rows[rel] if rel in self.rows else loaded

    # --------------------------------------------------------------- rollback
    def rollback_to(self, gen: int) -> None:
        try:
            self._rollback_to(gen)
        except (ValueError, TypeError, KeyError, IndexError) as exc:  # a garbled undo row
            raise sqlite3.DatabaseError(f"an undo row cannot be read ({type(exc).__name__}: {exc})") from None

    def _rollback_to(self, gen: int) -> None:
        db = self.db
        for kind, key, row in db.execute("SELECT kind, key, row FROM undo WHERE gen > ? ORDER BY rowid DESC",
                                         (gen,)).fetchall():
            if kind == "item":
                if row is None:
                    db.execute("DELETE FROM items WHERE rel=?", (key,))
                else:
                    db.execute(f"INSERT OR REPLACE INTO items VALUES ({','.join('?' * len(COLS))})",
                               _enc(json.loads(row)))
            else:
                if row is None:
                    db.execute("DELETE FROM meta WHERE key=?", (_s(key),))
                else:
                    db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (_s(key), json.loads(row)))
        db.execute("DELETE FROM undo WHERE gen > ?", (gen,))
        db.execute("DELETE FROM meta WHERE key='participants_for'")  # not journaled: read again

    # --------------------------------------------------------------- the tick
    def run(self) -> TickOutcome:
        db, out = self.db, self.out
        stored = self.meta("gen")
        stored_gen = int(stored) if stored is not None else 0
        if stored_gen > self.cursor_gen:
            have = db.execute("SELECT min(gen) FROM undo").fetchone()[0]
            if have is not None and have <= self.cursor_gen + 1:
                self.rollback_to(self.cursor_gen)
                out.notes.append(f"the last {stored_gen - self.cursor_gen} tick(s) were not kept by the instance: "
                                 "their changes to the sensor state were rolled back")
            else:
                out.notes.append(f"sensor state is at tick {stored_gen}, the cursor at {self.cursor_gen}: "
                                 "continuing from the state (run keys keep unchanged dumps from running twice)")
        db.execute("DELETE FROM undo")  # the cursor accepted everything up to here
        stored = self.meta("gen")
        gen = max(int(stored) if stored is not None else 0, self.cursor_gen) + 1
        out.gen = gen
        self.set_meta("gen", str(gen))

        self.list_sessions(gen)
        self.check_unsettled(gen)
        self.audit_taken(gen)
        self.take_batch(gen)
        self.write(gen)
        self.summarize()
        return out

    # 1. session folders
    def list_sessions(self, gen: int) -> None:
        reclassify = self.meta("context") != self.ctx_token
        if reclassify:
            self.set_meta("context", self.ctx_token)
            self.drop_other_sessions()
        every = max(self.s.relist_every, 1)
        for i, ses in enumerate(self.sessions):
            # each folder listed in full every `relist_every` ticks, the folders in turn
            full = reclassify or (gen + i * every // len(self.sessions)) % every == 0
            folder = self.layout.downloads_dir(ses)
            try:
                st = os.stat(folder)
                dir_token = f"{st.st_ino}:{st.st_mtime_ns}"
            except FileNotFoundError:
                st, dir_token = None, "-"
            if not full and self.meta(f"dir:{ses}") == dir_token:
                continue
            self.out.listed.append(ses)
            complete = self.list_session(ses, folder, gen, reclassify)
            recent = st is not None and self.now_ns - st.st_mtime_ns < self.s.settle_window * 1e9
            self.set_meta(f"dir:{ses}", dir_token if complete and not recent else None)

    def drop_other_sessions(self) -> None:
        """Sessions no longer in the config: their pending dumps are forgotten."""
        marks = ",".join("?" * len(self.sessions)) or "''"
        for r in self.db.execute(f"SELECT {','.join(COLS)} FROM items WHERE session NOT IN ({marks}) "
                                 "AND state NOT IN ('taken', 'gone')", self.sessions).fetchall():
            row = _row(r)
            self.put(row["rel"], row, None)

    def list_session(self, ses: str, folder: Path, gen: int, reclassify: bool) -> bool:
        """Reconcile one folder's listing with the state: True when every name was examined."""
        # (rel, inode, state, done) only: full rows are read for the few names that changed
        known = {r[0]: r for r in self.db.execute("SELECT rel, inode, state, done FROM items WHERE session=?",
                                                  (ses,))}  # keyed by the BLOB: no decoding of 50,000 names
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except FileNotFoundError:
            entries = []
        names = {e.name for e in entries}
        seen: set[str] = set()
        complete = True
        for e in sorted(entries, key=lambda e: e.name):
            if passed_over(e.name):
                continue
            rel = f"{ses}/{e.name}"
            key = _b(rel)
            seen.add(key)
            done = int((e.name + DONE_SUFFIX) in names)
            k = known.get(key)
            same = k is not None and k[2] != GONE and k[1] == e.inode()
            if same and not reclassify:
                if k[3] != done:
                    row = self.full_row(rel)
                    self.put(rel, row, {**row, "done": done})
                continue
            if same:
                self.reclassify(ses, e, self.full_row(rel), done, gen)
                continue
            if self.new_budget <= 0:
                complete = False
                continue
            self.new_budget -= 1
            self.first_sight(ses, e, self.full_row(rel) if k is not None else None, done, gen)
        for key, k in known.items():
            if key not in seen and k[2] != GONE:
                rel = _s(key)
                self.vanish(rel, self.current(rel, self.full_row(rel)))
        return complete

    def full_row(self, rel: str) -> dict:
        return _row(self.db.execute(f"SELECT {','.join(COLS)} FROM items WHERE rel=?", (_b(rel),)).fetchone())

    def vanish(self, rel: str, row: dict) -> None:
        """A name gone from its folder: a pending dump is dropped; a taken one is remembered
        with its token (an identical copy put back is not run twice)."""
        if row["state"] in (NEW, READY):
            self.out.dropped.append(rel)
        if row["taken_token"] is not None:
            self.put(rel, row, {**row, "state": GONE, "inode": None, "ready_gen": None})
        else:
            self.put(rel, row, None)

    def _classified(self, ses: str, e: os.DirEntry, done: int):
        participants, index, by_name = self.classify()
        return classify_entry(ses, e.name, Path(e.path), entry_is_dir(e), e.is_symlink(), bool(done), participants,
                              index, by_name)

    def first_sight(self, ses: str, e: os.DirEntry, row: dict | None, done: int, gen: int) -> None:
        """A new name, a name back after it was gone, or a known name with a new inode."""
        rel = f"{ses}/{e.name}"
        s = self._classified(ses, e, done)
        taken_token = row["taken_token"] if row else self.legacy.get(rel)
        new = {"rel": rel, "session": ses, "name": e.name, "inode": e.inode(), "kind": s.item.kind,
               "visit": s.visit.key if s.visit else None, "problem": s.problem, "done": done, "token": None,
               "state": NEW, "ready_gen": None, "taken_token": taken_token}
        if s.problem:
            new["state"] = PROBLEM
            if not (row and row.get("problem") == s.problem):
                self.out.new_problems.append(s.problem)
            self.put(rel, row, new)
            return
        self.sign_new(new, gen, previous=None)
        self.put(rel, row, new)

    def reclassify(self, ses: str, e: os.DirEntry, row: dict, done: int, gen: int) -> None:
        """The manifest or dicom_dir_map.tsv changed: a name may now belong to another visit."""
        s = self._classified(ses, e, done)
        visit = s.visit.key if s.visit else None
        if visit == row["visit"] and s.problem == row["problem"]:
            if row["done"] != done:
                self.put(row["rel"], row, {**row, "done": done})
            return
        new = {**row, "kind": s.item.kind, "visit": visit, "problem": s.problem, "done": done}
        if s.problem:
            new.update(state=PROBLEM, ready_gen=None)
            self.out.new_problems.append(s.problem)
        elif row["state"] in (PROBLEM, UNREADABLE) or (row["visit"] and visit != row["visit"]):
            new.update(state=NEW, ready_gen=None, token=None, taken_token=None)  # a visit of its own now
            self.sign_new(new, gen, previous=None)
        self.put(row["rel"], row, new)

    def sign_new(self, new: dict, gen: int, previous: str | None) -> None:
        """Sign a dump seen for the first time (or again after a change): ready at once with a
        .done marker, taken already when its token is the one taken (an identical copy back)."""
        rel = new["rel"]
        try:
            token = _sign(self.layout.download_path(new["session"], new["name"]), new["kind"])
        except FileNotFoundError:
            new.update(state=NEW, token=None)  # vanished between listing and stat: next tick
            return
        except OSError as exc:
            new.update(state=UNREADABLE, token=None, problem=f"'{rel}' cannot be read ({exc.strerror or exc})")
            self.out.new_problems.append(new["problem"])
            return
        new["problem"] = None
        if new["taken_token"] == token:
            new.update(state=TAKEN, token=token)
        elif new["done"] or (previous is not None and previous == token):
            new.update(state=READY, token=token, ready_gen=gen)
        else:
            new.update(state=NEW, token=token)

    # 2. unsettled dumps
    def check_unsettled(self, gen: int) -> None:
        for r in self.db.execute(f"SELECT {','.join(COLS)} FROM items WHERE state IN ('new', 'unreadable')").fetchall():
            row = _row(r)
            rel = row["rel"]
            if rel in self.rows:
                continue  # first seen (or changed) in this very tick
            if not os.path.lexists(self.layout.download_path(row["session"], row["name"])):  # vanished since the last tick
                self.vanish(rel, row)
                continue
            new = dict(row)
            self.sign_new(new, gen, previous=row["token"])
            if row["state"] == UNREADABLE and new["state"] == UNREADABLE and new["problem"] == row["problem"]:
                self.out.new_problems.remove(new["problem"])  # already reported
            if new != row:
                self.put(rel, row, new)

    # 3. audit of taken dumps
    def audit_taken(self, gen: int) -> None:
        if self.s.audit <= 0:
            return
        after = _b(self.meta("audit_after") or "")
        rows = self.db.execute(f"SELECT {','.join(COLS)} FROM items WHERE state='taken' AND rel > ? ORDER BY rel "
                               "LIMIT ?", (after, self.s.audit)).fetchall()
        if len(rows) < self.s.audit:
            rows += self.db.execute(f"SELECT {','.join(COLS)} FROM items WHERE state='taken' AND rel <= ? "
                                    "ORDER BY rel LIMIT ?", (after, self.s.audit - len(rows))).fetchall()
        t0 = time.perf_counter()
        last = None
        for r in rows:
            row = _row(r)
            rel = row["rel"]
            last = rel
            self.out.audited += 1
            if rel not in self.rows:
                try:
                    token = _sign(self.layout.download_path(row["session"], row["name"]), row["kind"])
                except FileNotFoundError:
                    token = None  # its folder's listing will say it is gone
                except OSError:
                    token = row["token"]
                if token is not None and token != row["taken_token"]:
                    self.put(rel, row, {**row, "state": NEW, "token": token, "ready_gen": None})  # re-delivered
            if time.perf_counter() - t0 > self.s.audit_seconds:
                break
        if last is not None:
            self.set_meta("audit_after", last)

    # 4. a batch of ready dumps
    def take_batch(self, gen: int) -> None:
        # rows changed in this tick are in self.rows, the others in the table: one queue, in order
        limit = self.s.batch
        changed = [r for r in self.rows.values() if r is not None and r["state"] == READY]
        stored = [_row(r) for r in self.db.execute(
            f"SELECT {','.join(COLS)} FROM items WHERE state='ready' ORDER BY ready_gen, rel LIMIT ?",
            (limit + len(self.rows),)).fetchall()]
        queue = sorted([r for r in stored if r["rel"] not in self.rows] + changed,
                       key=lambda r: (r["ready_gen"], _b(r["rel"])))
        taken = 0
        for row in queue:
            if taken >= limit:
                break
            rel = row["rel"]
            base = self.current(rel, row)
            if base is None or base["state"] != READY:
                continue
            if base["ready_gen"] != gen:  # settled in an earlier tick: still there, unchanged?
                try:
                    token = _sign(self.layout.download_path(base["session"], base["name"]), base["kind"])
                except FileNotFoundError:
                    self.vanish(rel, row)
                    continue
                except OSError:
                    token = base["token"]
                if token != base["token"]:
                    self.put(rel, row, {**base, "state": NEW, "token": token, "ready_gen": None})
                    continue
            self.out.taken.append(Taken(rel, base["visit"], base["token"]))
            self.put(rel, row, {**base, "state": TAKEN, "taken_token": base["token"], "ready_gen": None})
            taken += 1

    # --------------------------------------------------------------- writing
    def write(self, gen: int) -> None:
        db = self.db
        # json escapes lone surrogates (\udcff) and reads them back: names that are no UTF-8 survive
        undo = [(gen, "item", _b(rel), None if old is None else json.dumps(old)) for rel, old in self.old.items()]
        for key in self.meta_new:
            r = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
            undo.append((gen, "meta", _b(key), None if r is None else json.dumps(r[0])))
        db.executemany("INSERT INTO undo VALUES (?, ?, ?, ?)", undo)
        dels = [(_b(rel),) for rel, new in self.rows.items() if new is None]
        puts = [_enc(new) for new in self.rows.values() if new is not None]
        db.executemany("DELETE FROM items WHERE rel=?", dels)
        db.executemany(f"INSERT OR REPLACE INTO items VALUES ({','.join('?' * len(COLS))})", puts)
        for key, value in self.meta_new.items():
            if value is None:
                db.execute("DELETE FROM meta WHERE key=?", (key,))
            else:
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def summarize(self) -> None:
        db, out = self.db, self.out
        counts = dict(db.execute("SELECT state, count(*) FROM items WHERE state IN ('new', 'ready', 'problem', "
                                 "'unreadable') GROUP BY state").fetchall())
        out.waiting = counts.get(NEW, 0)
        out.queued = counts.get(READY, 0)
        out.problems = counts.get(PROBLEM, 0) + counts.get(UNREADABLE, 0)
        if out.waiting:
            out.waiting_first = [_s(r[0]) for r in db.execute(
                "SELECT rel FROM items WHERE state='new' ORDER BY rel LIMIT 5")]
        if out.problems:
            r = db.execute("SELECT problem FROM items WHERE state IN ('problem', 'unreadable') ORDER BY rel "
                           "LIMIT 1").fetchone()
            out.first_problem = _s(r[0])


class _SqlIndex:
    """``participant_index`` of the state's participants table, looked up key by key."""

    def __init__(self, db):
        self.db = db

    def get(self, key: str, default=()):
        return [r[0] for r in self.db.execute("SELECT p FROM participants WHERE low=?", (key,))] or default

