"""Where a rating or a comparison is stored: validation against the database, idempotency, supersession.

Ratings are written in batches (`write_ratings`, called by `writer.RatingWriter`, one transaction per batch:
group commit) because they are the hot path; comparisons are rarer and written one at a time
(`write_comparison`). Both follow the same rules:
- unknown response id → `not_found`, naming it;
- an idempotency key seen before: the same body → `replayed` with the stored row, a different body → `conflict`;
- a rater's new rating of a response (new comparison of a pair) marks their older ones `is_current = False`;
  history is kept, the latest counts.
Outcomes are plain values of a `kind` (no HTTP here: loop/api/routes/feedback.py maps kinds to statuses), not
exceptions, so one bad item in a batch never fails its neighbours. A `created` / `replayed` outcome exists only
once the transaction that holds (or read) its row has committed; a transaction that fails (the commit refused,
the disk full, the database gone) gives `unavailable` (`storage_unavailable`): nothing of it was stored, and a
retry with the same idempotency key is safe. `write_ratings` returns exactly one outcome per item, in order.

Tests: tests/unit/api/test_outcomes.py, tests/unit/feedback/test_feedback.py, tests/unit/feedback/test_feedback_writer.py,
tests/faults/test_acknowledged.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from sqlalchemy import insert, or_, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from loop.db.models import Comparison, Rating, Response

log = logging.getLogger("loop.feedback")

THUMB_TO_INT = {"up": 1, "down": -1}
INT_TO_THUMB = {1: "up", -1: "down"}


def iso(dt: datetime | None) -> str | None:
    """ISO-8601 UTC. SQLite hands datetimes back naive; loop only ever stores UTC, so naive means UTC."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


RATING_FIELDS = ("thumb", "score", "comment", "tags")


@dataclass(frozen=True)
class RatingInput:
    """One rater's rating of a response. `given` names the fields the rater set (a field left out keeps the value
    of their current rating: edits merge); with none left set, the rating is withdrawn. `expected_current_id`, when
    `expects` is true, is the current rating the rater's screen showed (None: none): another one makes the write
    stale, so it is refused instead of silently replacing what the rater never saw."""

    response_id: str
    rater: str = "anonymous"
    thumb: int | None = None  # +1 / -1
    score: int | None = None
    comment: str | None = None
    tags: tuple[str, ...] = ()
    idempotency_key: str | None = None
    given: frozenset[str] = frozenset(RATING_FIELDS)
    expects: bool = False
    expected_current_id: int | None = None

    def _fields(self) -> tuple[Any, ...]:
        return (self.thumb, self.score, self.comment or None, tuple(self.tags))

    def same_as(self, other: "RatingInput") -> bool:
        """The same submission (a retry in the same batch)."""
        return (self.response_id, self.rater, self._fields(), self.given, self.expects, self.expected_current_id) == \
               (other.response_id, other.rater, other._fields(), other.given, other.expects, other.expected_current_id)

    def stored_as(self, row: "RatingInput") -> bool:
        """`row` (a stored rating) is what this submission stored: the fields it set have its values."""
        return (self.response_id, self.rater) == (row.response_id, row.rater) and all(
            a == b for f, a, b in zip(RATING_FIELDS, self._fields(), row._fields()) if f in self.given)

    @classmethod
    def of_row(cls, r: Rating) -> "RatingInput":
        return cls(r.response_id, r.rater, r.thumb, r.score, r.comment, tuple(r.tags or ()), r.idempotency_key)


OutcomeKind = Literal["created", "replayed", "not_found", "conflict", "invalid", "unavailable", "unknown"]


@dataclass(frozen=True)
class Outcome:
    """What happened to one submitted item: its kind, the stored object (as JSON), or a message that says what to
    do. Kinds: `created` (stored now), `replayed` (stored before under this idempotency key), `not_found` (a response
    id that does not exist), `conflict` (the key was used for another body), `invalid` (a comparison of answers to
    different prompts), `unavailable` (the transaction failed: nothing stored, retry), `unknown` (whether it was
    stored is not known: see writer.RatingWriter)."""

    kind: OutcomeKind
    body: dict[str, Any] | None = None
    message: str | None = None
    code: str | None = None


def rating_json(r: Rating) -> dict[str, Any]:
    return {"id": r.id, "response_id": r.response_id, "rater": r.rater, "thumb": INT_TO_THUMB.get(r.thumb or 0),
            "score": r.score, "comment": r.comment, "tags": list(r.tags or []), "is_current": bool(r.is_current),
            "withdrawn": is_withdrawal(r.thumb, r.score, r.comment, r.tags), "created_at": iso(r.created_at)}


def is_withdrawal(thumb: int | None, score: int | None, comment: str | None, tags: Any) -> bool:
    """A rating that says nothing: a withdrawal (kept in the history, trains nothing)."""
    return thumb is None and score is None and not comment and not tags


def comparison_json(c: Comparison) -> dict[str, Any]:
    return {"id": c.id, "response_a_id": c.response_a_id, "response_b_id": c.response_b_id, "winner": c.winner,
            "rater": c.rater, "comment": c.comment, "is_current": bool(c.is_current), "created_at": iso(c.created_at)}


def _unknown(response_id: str) -> Outcome:
    return Outcome("not_found", message=f"response {response_id!r} not found; use an id from a loop reply "
                                        "(the `id` / `loop_response_id` field or the X-Loop-Response-Id header)",
                   code="response_not_found")


def _key_reused(key: str, kind: str) -> Outcome:
    return Outcome("conflict", message=f"idempotency key {key!r} was already used for a different {kind}; "
                                       "send a new key for a new submission", code="idempotency_key_reused")


def storage_unavailable(kind: str, exc: BaseException) -> Outcome:
    """The transaction holding this item failed, so nothing of it is stored: the client may retry."""
    return not_stored(kind, f"the database did not commit it ({type(exc).__name__})")


def not_stored(kind: str, why: str) -> Outcome:
    """An `unavailable` outcome: nothing of the item was stored (`why`), so a retry with the same key is safe."""
    return Outcome("unavailable", message=f"the {kind} was not stored: {why}; retry in a moment with the same "
                                          "idempotency key (a retry of a submission that turns out stored answers "
                                          "200 with it)", code="storage_unavailable")


def write_ratings(sessions: sessionmaker[Session], items: list[RatingInput]) -> list[Outcome]:
    """Store a batch of ratings in one transaction; if that fails, retry item by item (one transaction each).

    Never raises: returns exactly one outcome per item, in order, and an outcome that says stored (`created` /
    `replayed`) only after its transaction committed."""
    try:
        with sessions() as s, s.begin():
            outcomes = _write_batch(s, items)
        return outcomes  # reached only when the commit succeeded
    except Exception as exc:  # noqa: BLE001 - e.g. a commit refused, or one item's row breaks a constraint
        if len(items) == 1:
            log.warning("storing a rating failed", exc_info=True)
            return [storage_unavailable("rating", exc)]
        log.warning("rating batch of %d failed; retrying one by one", len(items), exc_info=True)
    return [_write_one(sessions, item) for item in items]


def _write_one(sessions: sessionmaker[Session], item: RatingInput) -> Outcome:
    try:
        with sessions() as s, s.begin():
            (outcome,) = _write_batch(s, [item])
        return outcome  # reached only when the commit succeeded
    except Exception as exc:  # noqa: BLE001 - reported for this item alone
        log.warning("storing a rating failed", exc_info=True)
        return storage_unavailable("rating", exc)


def _write_batch(s: Session, items: list[RatingInput]) -> list[Outcome]:
    ids = {it.response_id for it in items}
    existing = set(s.scalars(select(Response.id).where(Response.id.in_(ids))))
    keys = {it.idempotency_key for it in items if it.idempotency_key}
    stored = {r.idempotency_key: r for r in s.scalars(select(Rating).where(Rating.idempotency_key.in_(keys)))} \
        if keys else {}
    outcomes: list[Outcome | None] = [None] * len(items)
    new: list[int] = []  # indexes of items to insert
    first_with_key: dict[str, int] = {}
    replays: list[tuple[int, int]] = []  # (index, index of the new item it replays)
    for i, it in enumerate(items):
        key = it.idempotency_key
        if key and key in stored:
            same = it.stored_as(RatingInput.of_row(stored[key]))
            outcomes[i] = Outcome("replayed", rating_json(stored[key])) if same else _key_reused(key, "rating")
        elif key and key in first_with_key:  # a retry that arrived in the same batch as the original
            j = first_with_key[key]
            if items[j].same_as(it):
                replays.append((i, j))
            else:
                outcomes[i] = _key_reused(key, "rating")
        elif it.response_id not in existing:
            outcomes[i] = _unknown(it.response_id)
        else:
            if key:
                first_with_key[key] = i
            new.append(i)
    new, merged = _merge(s, items, new, outcomes)
    if new:
        pairs = {(items[i].response_id, items[i].rater) for i in new}
        s.execute(update(Rating).where(Rating.is_current.is_(True),
                                       tuple_(Rating.response_id, Rating.rater).in_(list(pairs)))
                  .values(is_current=False), execution_options={"synchronize_session": False})
        # Within the batch, the last rating of a (response, rater) is the current one.
        last: dict[tuple[str, str], int] = {}
        for i in new:
            last[(items[i].response_id, items[i].rater)] = i
        now = datetime.now(timezone.utc)
        rows = [{"response_id": items[i].response_id, "rater": items[i].rater, **merged[i],
                 "idempotency_key": items[i].idempotency_key, "held_out": False, "created_at": now,
                 "is_current": last[(items[i].response_id, items[i].rater)] == i} for i in new]
        result = s.execute(insert(Rating).returning(Rating.id, sort_by_parameter_order=True), rows)
        for i, row, (new_id,) in zip(new, rows, result.all(), strict=True):
            body = {"id": new_id, "response_id": row["response_id"], "rater": row["rater"],
                    "thumb": INT_TO_THUMB.get(row["thumb"] or 0), "score": row["score"], "comment": row["comment"],
                    "tags": row["tags"], "is_current": row["is_current"],
                    "withdrawn": is_withdrawal(row["thumb"], row["score"], row["comment"], row["tags"]),
                    "created_at": iso(now)}
            outcomes[i] = Outcome("created", body)
    for i, j in replays:
        first = outcomes[j]
        outcomes[i] = Outcome("replayed", first.body) if first and first.kind == "created" else first
    return [o if o is not None else Outcome("unknown", message="internal: no outcome") for o in outcomes]


def _merge(s: Session, items: list[RatingInput], new: list[int], outcomes: list[Outcome | None]
           ) -> tuple[list[int], dict[int, dict[str, Any]]]:
    """Each new rating merged over the rater's current one (the stored one, or an earlier one of this batch): the
    fields it sets, the others kept. A stale one (its expected current rating is not the current one) and one that
    would withdraw nothing get their outcome here and are left out. Returns the items to insert and their values."""
    pairs = list({(items[i].response_id, items[i].rater) for i in new})
    current: dict[tuple[str, str], tuple[int | None, dict[str, Any]]] = {}
    if pairs:
        for r in s.scalars(select(Rating).where(Rating.is_current.is_(True),
                                                tuple_(Rating.response_id, Rating.rater).in_(pairs))):
            current[(r.response_id, r.rater)] = (r.id, {"thumb": r.thumb, "score": r.score, "comment": r.comment,
                                                        "tags": list(r.tags or [])})
    kept: list[int] = []
    merged: dict[int, dict[str, Any]] = {}
    for i in new:
        it = items[i]
        cur_id, cur = current.get((it.response_id, it.rater), (None, {}))
        if it.expects and it.expected_current_id != cur_id:
            outcomes[i] = _stale(it, cur_id)
            continue
        mine = {"thumb": it.thumb, "score": it.score, "comment": it.comment, "tags": list(it.tags)}
        values = {f: mine[f] if f in it.given or f not in cur else cur[f] for f in RATING_FIELDS}
        if is_withdrawal(**values) and (cur_id is None or is_withdrawal(**cur)):
            outcomes[i] = Outcome("invalid", message="a rating needs at least one of thumb ('up'/'down'), score "
                                  "(1..10), comment or tags; setting them all empty withdraws a rating, and "
                                  f"{it.rater!r} has none of {it.response_id!r} to withdraw", code="nothing_to_rate")
            continue
        current[(it.response_id, it.rater)] = (PENDING, values)  # what a later item of this batch merges over
        kept.append(i)
        merged[i] = values
    return kept, merged


PENDING = -1  # the id of a rating this batch inserts: no screen can have shown it yet


def _stale(it: RatingInput, cur_id: int | None) -> Outcome:
    now = ("a newer one, not yet stored" if cur_id == PENDING
           else f"rating {cur_id}" if cur_id is not None else "none")
    return Outcome("conflict", message=f"{it.rater!r}'s current rating of {it.response_id!r} is {now}, not "
                                       f"{it.expected_current_id!r} as expected_current_id says: the screen was "
                                       "stale; load the current rating and apply the change to it",
                   code="stale_rating")


@dataclass(frozen=True)
class ComparisonInput:
    response_a_id: str
    response_b_id: str
    winner: str
    rater: str = "anonymous"
    comment: str | None = None
    idempotency_key: str | None = None

    def same_as(self, c: Comparison) -> bool:
        return (self.response_a_id, self.response_b_id, self.winner, self.rater, self.comment or None) == \
               (c.response_a_id, c.response_b_id, c.winner, c.rater, c.comment or None)


def write_comparison(sessions: sessionmaker[Session], item: ComparisonInput) -> Outcome:
    """Store one comparison in its own transaction. Never raises: a failed transaction is `unavailable`."""
    try:
        try:
            return _write_comparison(sessions, item)
        except IntegrityError:
            if not item.idempotency_key:
                raise
            # Two retries raced on the same key and the other one committed first: now it reads as a replay.
            return _write_comparison(sessions, item)
    except Exception as exc:  # noqa: BLE001 - the commit (or the database) failed: nothing stored
        log.warning("storing a comparison failed", exc_info=True)
        return storage_unavailable("comparison", exc)


def _write_comparison(sessions: sessionmaker[Session], item: ComparisonInput) -> Outcome:
    # A `return` inside the block hands its outcome back only once the block's commit has succeeded.
    with sessions() as s, s.begin():
        if item.idempotency_key:
            prior = s.scalar(select(Comparison).where(Comparison.idempotency_key == item.idempotency_key))
            if prior is not None:
                return Outcome("replayed", comparison_json(prior)) if item.same_as(prior) \
                    else _key_reused(item.idempotency_key, "comparison")
        found = {r.id: r for r in s.scalars(select(Response).where(
            Response.id.in_([item.response_a_id, item.response_b_id])))}
        for rid in (item.response_a_id, item.response_b_id):
            if rid not in found:
                return _unknown(rid)
        a, b = found[item.response_a_id], found[item.response_b_id]
        if a.prompt_hash != b.prompt_hash:
            return Outcome("invalid", message=f"responses {a.id!r} and {b.id!r} answer different prompts; compare "
                                              "two answers to the same prompt (POST /api/candidates gives such a "
                                              "pair)", code="different_prompts")
        # The rater's earlier verdicts on the same pair (either order) no longer count.
        s.execute(update(Comparison).where(
            Comparison.is_current.is_(True), Comparison.rater == item.rater,
            or_((Comparison.response_a_id == a.id) & (Comparison.response_b_id == b.id),
                (Comparison.response_a_id == b.id) & (Comparison.response_b_id == a.id)))
            .values(is_current=False), execution_options={"synchronize_session": False})
        row = Comparison(response_a_id=a.id, response_b_id=b.id, winner=item.winner, rater=item.rater,
                         comment=item.comment, idempotency_key=item.idempotency_key, is_current=True,
                         held_out=False, created_at=datetime.now(timezone.utc))
        s.add(row)
        s.flush()
        return Outcome("created", comparison_json(row))
