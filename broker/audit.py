"""The audit log: hash-chained, append-only JSON lines, one file per chain, indexed in SQL.

Each line is the canonical JSON (sorted keys, compact, UTF-8) of one record::

    {"actor":…,"chain":"main","data":{…},"event":…,"hash":…,"outcome":…,"prev":…,"seq":7,"ts":…}

where `hash` is the SHA-256 (hex) of the canonical JSON of the record without `hash`, and `prev`
is the previous record's `hash` (64 zeros for record 1). Editing, removing or reordering a line
breaks the chain; rewriting the whole chain disagrees with the SQL index, which `verify` also
compares; cutting records off the end leaves the index longer than the file.

The file is the record of truth and is written first (under an exclusive `flock`, fsync'd);
the SQL row follows. If that insert fails, `append` raises but the record stands in the file,
`verify` reports it as unindexed, and `reindex` adds the missing rows once the database is back.

Records hold ids and hashes, never secrets: `append` refuses JWT-shaped strings and field names
that suggest a token, secret, password or key (see `check_no_secrets`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Executable, Table, func, insert, select
from sqlalchemy.exc import IntegrityError

from broker.errors import ServerError, UpstreamFailed
from broker.storage import AuditIndex, Database

GENESIS_HASH = "0" * 64

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_SECRET_WORDS = ("token", "secret", "password", "key")
_SAFE_SUFFIXES = ("_id", "_hash", "jti", "kid")
_FIELDS = frozenset({"seq", "ts", "event", "outcome", "actor", "chain", "prev", "data", "hash"})
_HEX64 = re.compile(r"[0-9a-f]{64}")
_READ_CHUNK = 1 << 16
_BATCH = 256  # records per fsync and SQL transaction
# event, outcome, actor, data, and data as canonical JSON
_Entry = tuple[str, str, str | None, dict[str, Any], str]
# SQL rows that belong with one record (e.g. the lease of an issued credential): written in
# the same transaction as the record's index row, so one group commit covers both.
_Rows = Sequence[tuple[Table, Mapping[str, Any]]]
_INSERT_BATCH = 500
# Built once: SQLAlchemy memoises a statement's cache key on the object, so reusing it skips
# constructing the statement and walking it for the compiled-statement cache on every batch.
_INSERT = insert(AuditIndex)


def _index_row(record: AuditRecord) -> dict[str, Any]:
    return {
        "chain": record.chain, "seq": record.seq, "ts": record.ts, "event": record.event,
        "actor": record.actor, "outcome": record.outcome, "record_hash": record.hash,
        "prev_hash": record.prev, "data": record.data,
    }  # fmt: skip


def _inserts(
    records: list[AuditRecord], extra: _Rows
) -> list[tuple[Executable, list[Mapping[str, Any]]]]:
    """The statements (executemany) that index `records` and add `extra`, in order."""
    by_table: dict[Table, list[Mapping[str, Any]]] = {}
    for table, row in extra:
        by_table.setdefault(table, []).append(row)
    index_rows: list[Mapping[str, Any]] = [_index_row(record) for record in records]
    return [(_INSERT, index_rows)] + [(insert(t), rows) for t, rows in by_table.items()]


def _json_default(value: object) -> str:
    if isinstance(value, datetime) and value.tzinfo is not None:
        return format_ts(value)
    raise TypeError(
        f"{type(value).__name__} is not JSON (audit fields: JSON values, aware datetimes)"
    )


def canonical_json(value: Any) -> str:
    """The one serialisation that is hashed and written: sorted keys, no spaces, no NaN.
    Timezone-aware datetimes become RFC 3339 UTC strings; other non-JSON values raise
    `TypeError`."""
    return json.dumps(
        value,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
        default=_json_default,
    )


_dumps_str = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode
"""`canonical_json` of a string or None (no containers, so no key order to care about)."""


def record_hash(body: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of a record without its `hash` field."""
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def format_ts(ts: datetime) -> str:
    """RFC 3339 in UTC with microseconds, e.g. `2025-11-27T21:08:00.123456Z`."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(w in lowered for w in _SECRET_WORDS) and not lowered.endswith(_SAFE_SUFFIXES)


def _looks_like_jwt(text: str) -> bool:
    # Every match of _JWT contains "eyJ": the substring test rules out most values in C.
    return "eyJ" in text and _JWT.search(text) is not None


# Field names repeat from record to record: remember each name's verdict (bounded).
_NAME_OK, _NAME_JWT, _NAME_SECRET = 0, 1, 2
_name_verdicts: dict[str, int] = {}


def _name_verdict(name: str) -> int:
    verdict = _name_verdicts.get(name)
    if verdict is None:
        if _looks_like_jwt(name):
            verdict = _NAME_JWT
        elif _is_secret_name(name):
            verdict = _NAME_SECRET
        else:
            verdict = _NAME_OK
        if len(_name_verdicts) < 4096:
            _name_verdicts[name] = verdict
    return verdict


def check_no_secrets(value: Any, path: str = "") -> None:
    """Raise `ValueError` if `value` (recursively) holds a JWT-shaped string or a key whose name
    suggests a secret (`access_token`, `client_secret`; but `token_jti`, `key_id`,
    `secret_hash` are fine). The message names the field, never the value."""
    _check(value, path)


_SCALARS = (int, float, bool, type(None))


def _check(value: Any, path: str) -> bool:
    """`check_no_secrets`; returns False if some mapping in `value` has a key that is not a
    string (JSON turns such keys into strings, which can change their sorted order)."""
    plain = True
    if isinstance(value, str):
        if _looks_like_jwt(value):
            raise ValueError(
                f"{path or 'a value'} looks like a JWT; record its jti or a hash instead"
            )
    elif isinstance(value, Mapping):
        for name, item in value.items():
            if type(name) is str or isinstance(name, str):
                verdict = _name_verdict(name)
                if verdict == _NAME_JWT:
                    raise ValueError(f"a field name in {path or 'the record'} looks like a JWT")
                if verdict == _NAME_SECRET:
                    sub = f"{path}.{name}" if path else name
                    raise ValueError(
                        f"field {sub!r} names a secret; audit records hold ids and hashes only"
                    )
            else:
                plain = False
            kind = type(item)
            if kind in _SCALARS:
                continue  # cannot hold a secret; skips the slower ABC checks below
            if kind is str or isinstance(item, str):
                if _looks_like_jwt(item):
                    sub = f"{path}.{name}" if path else str(name)
                    raise ValueError(
                        f"{sub or 'a value'} looks like a JWT; record its jti or a hash instead"
                    )
            elif kind is dict or kind is list or isinstance(item, Mapping | list | tuple):
                plain = _check(item, f"{path}.{name}" if path else str(name)) and plain
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            if type(item) not in _SCALARS and isinstance(item, str | Mapping | list | tuple):
                plain = _check(item, f"{path}[{i}]") and plain
    return plain


@dataclass(frozen=True)
class AuditRecord:
    """One audit record as written to the file (`hash` covers every other field)."""

    seq: int
    ts: datetime
    event: str
    outcome: str
    actor: str | None
    chain: str
    prev: str
    data: dict[str, Any]
    hash: str

    def body(self) -> dict[str, Any]:
        """The record without `hash`: what `hash` is computed over."""
        return {
            "seq": self.seq,
            "ts": format_ts(self.ts),
            "event": self.event,
            "outcome": self.outcome,
            "actor": self.actor,
            "chain": self.chain,
            "prev": self.prev,
            "data": self.data,
        }

    def to_line(self) -> str:
        """The canonical JSON line, without the trailing newline."""
        return canonical_json({**self.body(), "hash": self.hash})

    @classmethod
    def from_json(cls, obj: Any) -> AuditRecord:
        """Build a record from a parsed line; `ValueError` says what is malformed. The hash is
        not checked here."""
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        if set(obj) != _FIELDS:
            raise ValueError(f"fields are {sorted(obj)}, expected {sorted(_FIELDS)}")
        seq, ts, actor = obj["seq"], obj["ts"], obj["actor"]
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise ValueError("seq is not a positive integer")
        for name in ("event", "outcome", "chain"):
            if not isinstance(obj[name], str):
                raise ValueError(f"{name} is not a string")
        if not (actor is None or isinstance(actor, str)):
            raise ValueError("actor is not a string or null")
        for name in ("prev", "hash"):
            if not (isinstance(obj[name], str) and _HEX64.fullmatch(obj[name])):
                raise ValueError(f"{name} is not a SHA-256 hex digest")
        if not isinstance(obj["data"], dict):
            raise ValueError("data is not an object")
        if not isinstance(ts, str):
            raise ValueError("ts is not a string")
        parsed = datetime.fromisoformat(ts)  # raises ValueError itself
        if parsed.tzinfo is None:
            raise ValueError("ts has no timezone")
        return cls(
            seq=seq,
            ts=parsed,
            event=obj["event"],
            outcome=obj["outcome"],
            actor=actor,
            chain=obj["chain"],
            prev=obj["prev"],
            data=obj["data"],
            hash=obj["hash"],
        )


@dataclass(frozen=True)
class AuditReport:
    """The outcome of `AuditLog.verify`: `problem` describes the first fault found, in file
    order, and `first_bad_seq` is the earliest record it concerns."""

    ok: bool
    records: int
    first_bad_seq: int | None = None
    problem: str = ""


@dataclass(frozen=True)
class _Line:
    """One parsed line; verify drops `record.data` to keep memory small, reindex keeps it."""

    number: int
    record: AuditRecord | None
    error: str = ""  # why `record` is None
    hash_ok: bool = False
    canonical: bool = False


class AuditLog:
    """Appends to, verifies and re-indexes one chain: the JSON-lines file at `path` plus its
    rows in `audit_records`. Several instances, in one process or many, may share a file."""

    def __init__(self, path: Path, db: Database, *, chain: str = "main") -> None:
        if not chain:
            raise ValueError("chain must be a non-empty name")
        self.path = Path(path)
        self.db = db
        self.chain = chain
        self._chain_json = _dumps_str(chain)
        # Group commit: appends queue here and one writer task writes them in batches, with
        # one fsync and one SQL transaction per batch instead of one per record.
        self._queue: list[tuple[_Entry, asyncio.Future[AuditRecord], _Rows]] = []
        self._writer: asyncio.Task[None] | None = None
        # The last line this instance wrote (bytes, with its newline), the file's size right
        # after, and that line's record: see `_write`.
        self._tail: tuple[bytes, int, AuditRecord] | None = None

    async def append_with_rows(
        self, rows: _Rows, event: str, *, outcome: str, actor: str | None = None, **fields: Any
    ) -> AuditRecord:
        """`append`, and insert `rows` in the same SQL transaction as the record's index row
        (all or none of them): e.g. the lease of the credential the record says was issued."""
        return await self._append(event, outcome, actor, fields, rows)

    async def append(
        self, event: str, *, outcome: str, actor: str | None = None, **fields: Any
    ) -> AuditRecord:
        """Append one record and index it; return it.

        Raises `ValueError` (nothing written) if the record would hold a secret, `TypeError` if
        a field is not JSON; `ServerError` if the file's last line is damaged or the index
        already holds this seq (both need an operator: run `verify`); `UpstreamFailed` if the
        index insert fails, in which case the record is already in the file (see module doc).
        """
        return await self._append(event, outcome, actor, fields, ())

    async def _append(
        self,
        event: str,
        outcome: str,
        actor: str | None,
        fields: dict[str, Any],
        rows: _Rows,
    ) -> AuditRecord:
        if not isinstance(event, str) or not isinstance(outcome, str):
            raise ValueError("event and outcome must be strings")
        if not (actor is None or isinstance(actor, str)):
            raise ValueError("actor is not a string or null")
        for name, value in (("event", event), ("outcome", outcome), ("actor", actor)):
            if value is not None and _looks_like_jwt(value):
                raise ValueError(f"{name} looks like a JWT; record its jti or a hash instead")
        plain = _check(fields, "")
        # Serialised once, here: the writer splices this text into the line it hashes, and the
        # round trip makes the returned record hold exactly what verify will read back.
        data_json = canonical_json(fields)
        data: dict[str, Any] = json.loads(data_json)
        if not plain:  # e.g. {10: x, 9: y}: sorted as numbers before, as strings after
            data_json = canonical_json(data)
        done: asyncio.Future[AuditRecord] = asyncio.get_running_loop().create_future()
        # Queued before the first await: from here on the record is written even if the caller
        # is cancelled (a client hanging up), because the writer task, not the caller, owns it;
        # a cancelled caller only stops waiting for the result. `flush` waits for the writer.
        self._queue.append(((event, outcome, actor, data, data_json), done, rows))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain(), name="audit-writer")
        return await done

    async def flush(self) -> None:
        """Wait until every append in flight is written and indexed, including appends whose
        caller was cancelled; call before closing the database at shutdown."""
        while self._writer is not None and not self._writer.done():
            await asyncio.wait([self._writer])

    async def _drain(self) -> None:
        """Write queued records in batches until the queue is empty."""
        while self._queue:
            batch, self._queue = self._queue[:_BATCH], self._queue[_BATCH:]
            entries = [entry for entry, _, _ in batch]
            extra = [row for _, _, rows in batch for row in rows]
            blocking = self.db.blocking_engine()
            try:
                if blocking is not None:
                    # SQLite: file and index in one trip to a worker thread, with the stdlib
                    # driver directly, instead of a hop back to the loop and one to aiosqlite's
                    # thread per statement.
                    records = await asyncio.to_thread(
                        self._write_and_index, blocking, entries, extra
                    )
                else:
                    records = await asyncio.to_thread(self._write, entries)
                    await self._index(records, extra)
            except Exception as exc:  # every caller of the batch learns what failed
                for _, done, _ in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for record, (_, done, _) in zip(records, batch, strict=True):
                if not done.done():
                    done.set_result(record)

    def _write(self, entries: list[_Entry]) -> list[AuditRecord]:
        created = not self.path.exists()
        if created:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            # Held across read-last-line and write: another process appending to the same file
            # must see our record before choosing its seq and prev.
            fcntl.flock(fd, fcntl.LOCK_EX)
            last = self._own_tail(fd)
            if last is None:
                last = self._last_record(fd)
            records: list[AuditRecord] = []
            lines: list[str] = []
            chain = self.chain
            chain_json = self._chain_json
            for event, outcome, actor, data, data_json in entries:
                seq = 1 if last is None else last.seq + 1
                prev = GENESIS_HASH if last is None else last.hash
                now = datetime.now(UTC)
                # The canonical JSON of the record, built from its parts: keys in sorted order
                # (actor, chain, data, event, [hash,] outcome, prev, seq, ts), each value
                # serialised as `canonical_json` would. `hash` sorts between event and outcome.
                head = (
                    f'{{"actor":{_dumps_str(actor)},"chain":{chain_json},"data":{data_json},'
                    f'"event":{_dumps_str(event)}'
                )
                rest = (
                    f',"outcome":{_dumps_str(outcome)},"prev":"{prev}","seq":{seq},'
                    f'"ts":"{format_ts(now)}"}}'
                )
                digest = hashlib.sha256((head + rest).encode()).hexdigest()
                lines.append(f'{head},"hash":"{digest}"{rest}\n')
                last = AuditRecord(seq, now, event, outcome, actor, chain, prev, data, digest)
                records.append(last)
            line = "".join(lines).encode()
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
            self._tail = None if last is None else (lines[-1].encode(), os.fstat(fd).st_size, last)
            os.fsync(fd)
        except BaseException:
            self._tail = None
            raise
        finally:
            os.close(fd)  # also releases the flock
        if created:
            # Make the new file's directory entry durable too, or a crash could lose the file.
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return records

    def _own_tail(self, fd: int) -> AuditRecord | None:
        """The file's last record if the file still ends, byte for byte, with the last line this
        instance wrote (after a newline or at the start), else None. Reading those bytes back
        is what `_last_record` would do too, short of parsing and validating the line again;
        another writer (a replica, an editor, a truncation) makes this return None."""
        if self._tail is None:
            return None
        line, size, record = self._tail
        if os.fstat(fd).st_size != size:
            return None
        start = size - len(line)
        if start < 0:
            return None
        if start == 0:
            return record if os.pread(fd, len(line), 0) == line else None
        return record if os.pread(fd, len(line) + 1, start - 1) == b"\n" + line else None

    def _last_record(self, fd: int) -> AuditRecord | None:
        size = os.fstat(fd).st_size
        if size == 0:
            return None
        if os.pread(fd, 1, size - 1) != b"\n":
            raise ServerError(
                "the audit log cannot be written",
                log_detail=f"{self.path} ends with an incomplete line; run verify, then repair",
            )
        # Read backwards from the final newline until the one before it.
        pos = size - 1
        line = b""
        while pos > 0:
            step = min(_READ_CHUNK, pos)
            pos -= step
            line = os.pread(fd, step, pos) + line
            cut = line.rfind(b"\n")
            if cut >= 0:
                line = line[cut + 1 :]
                break
        try:
            record = AuditRecord.from_json(json.loads(line))
        except ValueError as exc:
            raise ServerError(
                "the audit log cannot be written",
                log_detail=f"the last line of {self.path} is not a valid record ({exc})",
            ) from None
        if record.chain != self.chain:
            raise ServerError(
                "the audit log cannot be written",
                log_detail=f"{self.path} holds chain {record.chain!r}, not {self.chain!r}",
            )
        return record

    async def _index(self, records: list[AuditRecord], extra: _Rows = ()) -> None:
        try:
            async with self.db.engine.begin() as conn:  # Core executemany: no ORM overhead
                for statement, rows in _inserts(records, extra):
                    await conn.execute(statement, rows)
        except Exception as exc:
            raise self._index_failed(records, exc) from None

    def _write_and_index(
        self, engine: Engine, entries: list[_Entry], extra: _Rows
    ) -> list[AuditRecord]:
        """`_write`, then the index rows through `engine` (synchronous, in this thread)."""
        records = self._write(entries)
        try:
            with engine.begin() as conn:
                for statement, rows in _inserts(records, extra):
                    conn.execute(statement, rows)
        except Exception as exc:
            raise self._index_failed(records, exc) from None
        return records

    def _index_failed(self, records: list[AuditRecord], exc: Exception) -> Exception:
        """The error an append reports when its records are in the file but not indexed."""
        first, last = records[0], records[-1]
        where = (
            f"audit records {first.chain}/{first.seq}-{last.seq} are in {self.path} but not indexed"
        )
        if isinstance(exc, IntegrityError):
            return ServerError(
                "the audit log cannot be written",
                log_detail=f"{where}: the SQL index already has this seq (file truncated or "
                f"replaced? run verify): {type(exc).__name__}",
            )
        return UpstreamFailed(
            "the SQL database is unreachable",
            log_detail=f"{where} (run reindex): {type(exc).__name__}: {exc}",
        )

    # --- reading back -------------------------------------------------------------------

    def _scan(self, keep_data: bool = False) -> list[_Line]:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return []
        try:
            # A shared lock only to learn how far the file reaches between two appends; reading
            # up to there needs no lock, since appends only add after that point.
            fcntl.flock(fd, fcntl.LOCK_SH)
            size = os.fstat(fd).st_size
            fcntl.flock(fd, fcntl.LOCK_UN)
            with os.fdopen(os.dup(fd), "rb") as f:
                lines: list[_Line] = []
                remaining = size
                for number, raw in enumerate(f, start=1):
                    raw = raw[:remaining]
                    remaining -= len(raw)
                    lines.append(self._parse(number, raw, keep_data))
                    if remaining <= 0:
                        break
                return lines
        finally:
            os.close(fd)

    @staticmethod
    def _parse(number: int, raw: bytes, keep_data: bool) -> _Line:
        if not raw.endswith(b"\n"):
            return _Line(number, None, "incomplete (torn write)")
        text = raw[:-1].decode("utf-8", errors="replace")
        try:
            obj = json.loads(text)
            record = AuditRecord.from_json(obj)
        except ValueError as exc:
            return _Line(number, None, f"not a valid audit record ({exc})")
        body = {k: v for k, v in obj.items() if k != "hash"}
        return _Line(
            number,
            record if keep_data else dataclasses.replace(record, data={}),
            hash_ok=record_hash(body) == record.hash,
            canonical=canonical_json(obj) == text,
        )

    async def _index_hashes(self, seqs: Iterable[int] | None = None) -> dict[int, str]:
        query = select(AuditIndex.seq, AuditIndex.record_hash).where(AuditIndex.chain == self.chain)
        if seqs is not None:
            query = query.where(AuditIndex.seq.in_(list(seqs)))
        try:
            async with self.db.sessions() as session:
                return {seq: h for seq, h in (await session.execute(query)).all()}
        except Exception as exc:
            raise UpstreamFailed(
                "the SQL database is unreachable", log_detail=f"{type(exc).__name__}: {exc}"
            ) from None

    async def verify(self) -> AuditReport:
        """Check the file's chain and compare it with the SQL index; report the first fault.

        Detects edited records (hash mismatch or non-canonical line), missing, duplicated and
        reordered records, broken prev-hash links, records the index disagrees with, records
        cut off the end (the index reaches further than the file) and records the index lacks
        (after a database outage, or added to the file by hand). Safe to run while appending.
        Holds a small entry per record in memory (not the data): rotate to a new chain (file)
        periodically if the log grows very large.
        """
        # Index first: every row it holds then has its line in the file (written first), so a
        # concurrent append cannot look like truncation.
        index = await self._index_hashes()
        lines = await asyncio.to_thread(self._scan)
        report = self._judge(lines, index)
        if report is not None:
            return report
        file_last = lines[-1].record.seq if lines and lines[-1].record else 0
        index_last = max(index, default=0)
        if index_last > file_last:
            where = f"the file ends at record {file_last}" if file_last else "the file is empty"
            return AuditReport(
                False,
                len(lines),
                file_last + 1,
                f"{where} but the SQL index has {index_last} (records removed from the end)",
            )
        unindexed = [ln.record.seq for ln in lines if ln.record and ln.record.seq not in index]
        if unindexed:
            # Second look: a concurrent append may have been between its file write and its row.
            late = await self._index_hashes(unindexed)
            for ln in lines:
                rec = ln.record
                if rec is None or rec.seq not in unindexed:
                    continue
                if rec.seq not in late:
                    return AuditReport(
                        False,
                        len(lines),
                        rec.seq,
                        f"record {rec.seq} is in the file but not in the SQL index (run reindex "
                        "if the database was down; otherwise it was added to the file by hand)",
                    )
                if late[rec.seq] != rec.hash:
                    return _differs(len(lines), rec.seq)
        return AuditReport(True, len(lines))

    def _judge(self, lines: list[_Line], index: Mapping[int, str]) -> AuditReport | None:
        present = {ln.record.seq for ln in lines if ln.record}
        count = len(lines)
        prev: AuditRecord | None = None
        for ln in lines:
            expected = 1 if prev is None else prev.seq + 1
            rec = ln.record
            if rec is None:
                return AuditReport(False, count, expected, f"line {ln.number} is {ln.error}")
            if rec.chain != self.chain:
                return AuditReport(
                    False,
                    count,
                    rec.seq,
                    f"line {ln.number} belongs to chain {rec.chain!r}, not {self.chain!r}",
                )
            if not ln.hash_ok:
                return AuditReport(
                    False, count, rec.seq, f"record {rec.seq} was changed (hash mismatch)"
                )
            if not ln.canonical:
                return AuditReport(
                    False, count, rec.seq, f"record {rec.seq} was edited (line not canonical)"
                )
            if rec.seq in index and index[rec.seq] != rec.hash:
                return _differs(count, rec.seq)
            if rec.seq != expected:
                after = f"record {prev.seq}" if prev else "the start"
                if rec.seq < expected or expected in present:
                    return AuditReport(
                        False,
                        count,
                        min(rec.seq, expected),
                        f"records out of order at line {ln.number} "
                        f"(record {rec.seq} follows {after})",
                    )
                gap = (
                    f"record {expected} is missing"
                    if rec.seq == expected + 1
                    else f"records {expected} to {rec.seq - 1} are missing"
                )
                jump = (
                    f"seq jumps from {prev.seq} to {rec.seq}"
                    if prev
                    else (f"the file starts at record {rec.seq}")
                )
                return AuditReport(False, count, expected, f"{gap} ({jump})")
            wanted = GENESIS_HASH if prev is None else prev.hash
            if rec.prev != wanted:
                what = f"record {prev.seq}" if prev else "the genesis value"
                return AuditReport(
                    False, count, rec.seq, f"record {rec.seq} prev-hash does not match {what}"
                )
            prev = rec
        return None

    async def reindex(self) -> int:
        """Add index rows for file records the index lacks; return how many were added.

        Walks the file from the start and stops at the first record that does not extend a
        valid chain (`verify` describes it). Rows already in the index are never changed or
        removed, even where they disagree with the file: they are the evidence `verify` uses.
        It trusts the file, so run it after a database outage, once `verify` reports only
        unindexed records.
        """
        index = await self._index_hashes()
        lines = await asyncio.to_thread(self._scan, True)
        valid: list[AuditRecord] = []
        prev: AuditRecord | None = None
        for ln in lines:
            rec = ln.record
            if (
                rec is None
                or not (ln.hash_ok and ln.canonical)
                or rec.chain != self.chain
                or rec.seq != (1 if prev is None else prev.seq + 1)
                or rec.prev != (GENESIS_HASH if prev is None else prev.hash)
            ):
                break
            valid.append(rec)
            prev = rec
        missing = [_index_row(r) for r in valid if r.seq not in index]
        added = 0
        # Only reindex needs the dialects' upsert constructs: imported here, not at start-up.
        from sqlalchemy.dialects import postgresql, sqlite

        upsert = postgresql.insert if self.db.dialect == "postgresql" else sqlite.insert
        try:
            for start in range(0, len(missing), _INSERT_BATCH):
                batch = missing[start : start + _INSERT_BATCH]
                # A concurrent append may index the same seq meanwhile; that row wins.
                stmt = upsert(AuditIndex).values(batch).on_conflict_do_nothing()
                async with self.db.sessions() as session, session.begin():
                    await session.execute(stmt)
                added += len(batch)
        except Exception as exc:
            raise UpstreamFailed(
                "the SQL database is unreachable",
                log_detail=f"reindex of {self.path}: {type(exc).__name__}: {exc}",
            ) from None
        return added

    async def count_indexed(self) -> int:
        """How many rows the SQL index holds for this chain."""
        async with self.db.sessions() as session:
            result = await session.execute(
                select(func.count()).select_from(AuditIndex).where(AuditIndex.chain == self.chain)
            )
            return int(result.scalar_one())


def _differs(count: int, seq: int) -> AuditReport:
    return AuditReport(
        False, count, seq, f"record {seq} differs from the SQL index (file or index rewritten)"
    )
