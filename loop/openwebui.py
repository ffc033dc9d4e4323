"""Open WebUI's thumbs as loop ratings: pull its feedback over its documented HTTP API, find the exact response
loop logged for each rated message, and store the rating under `openwebui:<user>`.

Why pull: an admin API key and Open WebUI's public API are all it takes, nothing is installed into Open WebUI and
loop's proxy stays unchanged, so it keeps working across Open WebUI upgrades as long as these routes do:
- `GET /api/v1/evaluations/feedbacks/list?page=N` (admin): feedback with its user (name, email);
- `GET /api/v1/chats/{id}`: the chat a feedback names (an admin reads any chat while Open WebUI's
  ENABLE_ADMIN_CHAT_ACCESS is on, its default).
How a rated message is matched: the rated assistant message's content is the completion; the messages before it
(its parentId chain, with the chat's system prompt first when it has one) are the prompt Open WebUI sent. loop's
`prompt_hash` of those messages (roles and text, as the proxy hashes them) picks the candidates; their completion
must equal the message's content (surrounding whitespace ignored: Open WebUI may trim what it stores). None: the
feedback is reported unmatched, never guessed. Several (the same answer logged twice): the one logged closest to the
message's timestamp, counted as `ambiguous`. A system prompt Open WebUI adds from the user's or the model's
settings is not stored in the chat: when the exact prompt finds nothing, a response logged within WINDOW_S of the
message whose messages after their leading system prompt are the chat's, with the same answer, is the match.
Each feedback is written with the idempotency key `openwebui:<feedback id>:<updated_at>`: a re-sync replays, an
edited feedback is a new rating that supersedes the older one of the same rater (loop/feedback/store.py). A
feedback Open WebUI no longer lists (deleted there) withdraws its rating, unless the rater changed that rating in
loop since (`deleted_feedback`); every sync lists all feedback ids, so an incremental one sees deletions too.
Everything is fetched before anything is written: Open WebUI unreachable or refusing the key raises `Unavailable`
/ `Invalid` and stores nothing.

`Poller` runs the same sync in the background of `loop serve` (LOOP_OPENWEBUI_URL + LOOP_OPENWEBUI_API_KEY),
every LOOP_OPENWEBUI_SYNC_INTERVAL_S, reading only what changed since the newest feedback it has seen.

Tests: tests/unit/test_openwebui.py (a fake Open WebUI), tests/e2e/test_openwebui_e2e.py (the real package).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from loop.db.models import Rating, Response
from loop.errors import Invalid, LoopError, Unavailable
from loop.feedback.store import RatingInput, is_withdrawal, write_ratings
from loop.vllm.capture import normalise_messages, prompt_hash

log = logging.getLogger("loop.openwebui")

RATER_PREFIX = "openwebui:"
FEEDBACK_LIST = "/api/v1/evaluations/feedbacks/list"
CHAT = "/api/v1/chats/{id}"
# How far apart Open WebUI's message timestamp and loop's log time may be for a match that ignores a system prompt
# Open WebUI added outside the chat: a long generation is stamped when it starts.
WINDOW_S = 600.0


@dataclass
class SyncReport:
    """What one sync did. `created` + `replayed` + `unmatched` + `skipped` + `failed` = `feedbacks` seen (those
    older than `since` are not counted)."""

    feedbacks: int = 0
    created: int = 0  # new ratings (a new feedback, or an edited one superseding its earlier rating)
    replayed: int = 0  # stored by an earlier sync
    ambiguous: int = 0  # matched, but several logged responses fitted: the closest in time was taken
    unmatched: list[str] = field(default_factory=list)  # feedback ids whose response loop has not logged
    skipped: list[str] = field(default_factory=list)  # feedback ids that carry no rating at all
    failed: list[tuple[str, str]] = field(default_factory=list)  # (feedback id, why) the store refused
    withdrawn: list[str] = field(default_factory=list)  # feedback ids deleted in Open WebUI: their ratings withdrawn
    latest: float | None = None  # the newest updated_at seen: the next incremental sync's `since`

    def to_json(self) -> dict[str, Any]:
        return {"feedbacks": self.feedbacks, "created": self.created, "replayed": self.replayed,
                "ambiguous": self.ambiguous, "unmatched": list(self.unmatched), "skipped": list(self.skipped),
                "failed": [{"feedback_id": f, "why": w} for f, w in self.failed],
                "withdrawn": list(self.withdrawn)}

    def summary(self) -> str:
        lines = [f"{self.feedbacks} feedback(s): {self.created} stored, {self.replayed} already stored, "
                 f"{len(self.unmatched)} unmatched, {len(self.skipped)} without a rating, {len(self.failed)} failed"
                 + (f" ({self.ambiguous} matched one of several identical logged answers)" if self.ambiguous else "")
                 + (f"; {len(self.withdrawn)} deleted in Open WebUI, their ratings withdrawn" if self.withdrawn else "")]
        if self.unmatched:
            lines.append("unmatched (loop logged no response with that prompt and answer, or the chat is gone): "
                         + ", ".join(self.unmatched))
        for fid, why in self.failed:
            lines.append(f"failed {fid}: {why}")
        return "\n".join(lines)


class OpenWebUI:
    """A small client for the Open WebUI routes sync needs; every failure becomes a loop error with a remedy."""

    def __init__(self, url: str, api_key: str, *, timeout_s: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        if not api_key:
            raise Invalid("no Open WebUI API key: make one in Open WebUI (Settings > Account > API keys, as an "
                          "admin) and pass it as LOOP_OPENWEBUI_API_KEY or --api-key", code="openwebui_key_missing")
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {api_key}"},
                                  timeout=timeout_s, transport=transport)

    def close(self) -> None:
        self._http.close()

    def get(self, path: str, **params: Any) -> Any:
        try:
            r = self._http.get(path, params=params or None)
        except httpx.HTTPError as exc:
            raise Unavailable(f"Open WebUI at {self.url} did not answer ({type(exc).__name__}: {exc}); check "
                              "--url (Open WebUI's own address, e.g. http://localhost:8080) and that it runs",
                              code="openwebui_unreachable") from exc
        if r.status_code in (401, 403):
            raise Invalid(f"Open WebUI at {self.url} refused the API key on {path} ({r.status_code}: "
                          f"{_detail(r)}); use an admin's API key (Settings > Account > API keys; API keys must "
                          "be enabled in Admin Settings)", code="openwebui_key_refused")
        if r.status_code != 200:
            raise Unavailable(f"Open WebUI at {self.url} answered {r.status_code} on {path}: {_detail(r)}",
                              code="openwebui_error")
        try:
            return r.json()
        except ValueError as exc:
            raise Unavailable(f"{self.url}{path} did not answer JSON: is --url Open WebUI's address?",
                              code="openwebui_error") from exc

    def feedbacks(self) -> list[dict[str, Any]]:
        """Every feedback, with its user, oldest change first (so a page boundary moves only forward)."""
        out: list[dict[str, Any]] = []
        page = 1
        while True:
            body = self.get(FEEDBACK_LIST, order_by="updated_at", direction="asc", page=page)
            items = body.get("items") or []
            out.extend(items)
            if not items or len(out) >= int(body.get("total") or 0):
                return out
            page += 1

    def chat(self, chat_id: str) -> dict[str, Any] | None:
        """The chat, or None when Open WebUI does not have it (deleted) or will not show it."""
        try:
            return self.get(CHAT.format(id=chat_id))
        except LoopError as exc:
            if exc.code == "openwebui_unreachable":
                raise
            # Open WebUI answers 401 for a chat that is gone or that this admin may not read, the same status as
            # for a refused key: an admin-only read tells the two apart (it raises if the key is the problem).
            self.get(FEEDBACK_LIST, page=1)
            log.warning("chat %s: %s", chat_id, exc.message)
            return None


def _detail(r: httpx.Response) -> str:
    try:
        body = r.json()
        return str(body.get("detail", body)) if isinstance(body, dict) else str(body)
    except ValueError:
        return r.text[:200]


@dataclass(frozen=True)
class Rated:
    """One feedback resolved against its chat: the prompt and answer Open WebUI had, and the rating."""

    feedback_id: str
    key: str
    rater: str
    prompt: list[dict[str, str]]
    completion: str
    at: datetime | None
    thumb: int | None
    score: int | None
    comment: str | None
    tags: tuple[str, ...]


def rater_of(user: dict[str, Any] | None, user_id: str) -> str:
    """`openwebui:<email>`: unique in Open WebUI, where display names are not (two people named alike must not
    supersede each other's ratings); the name when there is no email, the id when neither."""
    user = user or {}
    return RATER_PREFIX + (str(user.get("email") or "").strip() or str(user.get("name") or "").strip() or user_id)


def _thumb(value: Any) -> int | None:
    try:
        v = int(value)
    except (TypeError, ValueError):
        return None
    return v if v in (1, -1) else None


def _score(details: Any) -> int | None:
    if not isinstance(details, dict):
        return None
    try:
        v = int(details.get("rating"))
    except (TypeError, ValueError):
        return None
    return v if 1 <= v <= 10 else None


def prompt_before(chat: dict[str, Any], message_id: str) -> tuple[list[dict[str, str]], dict[str, Any]] | None:
    """The rated message and the messages before it (parentId chain), as Open WebUI sends them to the model:
    the chat's system prompt first when it has one. None when the chat has no such assistant message."""
    body = chat.get("chat") or {}
    messages = (body.get("history") or {}).get("messages") or {}
    rated = messages.get(message_id)
    if not isinstance(rated, dict) or rated.get("role") != "assistant":
        return None
    chain: list[dict[str, Any]] = []
    seen = {message_id}
    parent = rated.get("parentId")
    while parent and parent in messages and parent not in seen:
        seen.add(parent)
        chain.append(messages[parent])
        parent = messages[parent].get("parentId")
    chain.reverse()
    system = (body.get("params") or {}).get("system") or body.get("system")
    prompt = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": m.get("role", ""), "content": m.get("content", "")} for m in chain]
    return normalise_messages(prompt), rated


def resolve(item: dict[str, Any], chat: dict[str, Any] | None) -> Rated | None:
    """The feedback as a rating of a prompt and answer; None when its chat or rated answer cannot be read."""
    data, meta = item.get("data") or {}, item.get("meta") or {}
    if chat is None:
        return None
    found = prompt_before(chat, str(meta.get("message_id") or ""))
    if found is None:
        return None
    prompt, rated = found
    tags = [str(t) for t in (data.get("tags") or []) if str(t).strip()]
    if data.get("reason"):  # Open WebUI's chosen reason chip ("Accurate information", ...)
        tags.append(str(data["reason"]))
    ts = rated.get("timestamp")
    return Rated(feedback_id=str(item["id"]), key=f"openwebui:{item['id']}:{item.get('updated_at')}",
                 rater=rater_of(item.get("user"), str(item.get("user_id"))), prompt=prompt,
                 completion=str(rated.get("content") or ""),
                 at=datetime.fromtimestamp(float(ts), timezone.utc) if isinstance(ts, (int, float)) else None,
                 thumb=_thumb(data.get("rating")), score=_score(data.get("details")),
                 comment=(str(data.get("comment")).strip() or None) if data.get("comment") else None,
                 tags=tuple(dict.fromkeys(tags)))


def find_response(s: Session, rated: Rated) -> tuple[str | None, int]:
    """The id of the response loop logged for this prompt and answer (None: none), and how many fitted.

    First the exact prompt (its hash, an index lookup). Then, for a system prompt that Open WebUI adds from the
    user's or the model's settings (it is not in the chat), the responses logged within WINDOW_S of the message
    whose messages after their leading system messages are the chat's."""
    want = rated.completion.strip()
    rows = s.execute(select(Response.id, Response.completion, Response.created_at)
                     .where(Response.prompt_hash == prompt_hash(rated.prompt), Response.endpoint == "chat")).all()
    fits = [r for r in rows if (r.completion or "").strip() == want]
    if not fits and rated.at is not None:
        turns = _without_system(rated.prompt)
        window = timedelta(seconds=WINDOW_S)
        rows = s.execute(select(Response.id, Response.completion, Response.created_at, Response.messages)
                         .where(Response.endpoint == "chat",
                                Response.created_at.between(rated.at - window, rated.at + window))).all()
        fits = [r for r in rows if (r.completion or "").strip() == want
                and _without_system(normalise_messages(r.messages or [])) == turns]
    if not fits:
        return None, 0
    if rated.at is not None:
        at = rated.at

        def distance(r: Any) -> float:
            logged = r.created_at if r.created_at.tzinfo else r.created_at.replace(tzinfo=timezone.utc)
            return abs((logged - at).total_seconds())
        fits.sort(key=distance)
    return fits[0].id, len(fits)


def _without_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    i = 0
    while i < len(messages) and messages[i]["role"] == "system":
        i += 1
    return messages[i:]


def sync(sessions: sessionmaker[Session], url: str, api_key: str, *, since: float | None = None,
         transport: httpx.BaseTransport | None = None) -> SyncReport:
    """Store every Open WebUI feedback (changed at or after `since`, epoch seconds, when given) as a loop rating.

    Raises `Unavailable` (Open WebUI unreachable or failing) or `Invalid` (no key, or the key refused) before
    anything is written."""
    client = OpenWebUI(url, api_key, transport=transport)
    try:
        listed = client.feedbacks()
        items = [f for f in listed if since is None or float(f.get("updated_at") or 0) >= since]
        chats: dict[str, dict[str, Any] | None] = {}
        for f in items:
            chat_id = str((f.get("meta") or {}).get("chat_id") or "")
            if chat_id and chat_id not in chats:
                chats[chat_id] = client.chat(chat_id)
    finally:
        client.close()
    report = SyncReport(feedbacks=len(items),
                        latest=max((float(f.get("updated_at") or 0) for f in items), default=since))
    inputs: list[RatingInput] = []
    ids: list[str] = []
    with sessions() as s:
        for f in items:
            rated = resolve(f, chats.get(str((f.get("meta") or {}).get("chat_id") or "")))
            if rated is None:  # its chat is gone, unreadable, or has no such answer: nothing to match against
                report.unmatched.append(str(f.get("id")))
                continue
            if rated.thumb is None and rated.score is None and not rated.comment and not rated.tags:
                report.skipped.append(rated.feedback_id)
                continue
            response_id, fitted = find_response(s, rated)
            if response_id is None:
                report.unmatched.append(rated.feedback_id)
                continue
            report.ambiguous += fitted > 1
            inputs.append(RatingInput(response_id=response_id, rater=rated.rater, thumb=rated.thumb,
                                      score=rated.score, comment=rated.comment, tags=rated.tags,
                                      idempotency_key=rated.key))
            ids.append(rated.feedback_id)
    with sessions() as s:
        gone = deleted_feedback(s, {str(f.get("id")) for f in listed})
    for fid, outcome in zip(ids, write_ratings(sessions, inputs) if inputs else [], strict=True):
        if outcome.kind == "created":
            report.created += 1
        elif outcome.kind == "replayed":
            report.replayed += 1
        else:
            report.failed.append((fid, f"{outcome.kind}: {outcome.message}"))
    for (fid, _), outcome in zip(gone, write_ratings(sessions, [w for _, w in gone]) if gone else [], strict=True):
        if outcome.kind in ("created", "replayed"):
            report.withdrawn.append(fid)
        elif outcome.code != "stale_rating":  # the rater changed it in loop meanwhile: theirs stands
            report.failed.append((fid, f"withdrawing: {outcome.kind}: {outcome.message}"))
    if report.unmatched:
        log.info("open webui sync: %d feedback(s) name answers loop has not logged: %s", len(report.unmatched),
                 ", ".join(report.unmatched))
    return report


def deleted_feedback(s: Session, listed: set[str]) -> list[tuple[str, RatingInput]]:
    """Ratings stored from an Open WebUI feedback that Open WebUI no longer lists (deleted there), each as the
    withdrawal to write: only while that import is still the rater's current rating (`expected_current_id`), so a
    change made in loop since is never undone."""
    out = []
    rows = s.execute(select(Rating.id, Rating.response_id, Rating.rater, Rating.idempotency_key, Rating.thumb,
                            Rating.score, Rating.comment, Rating.tags)
                     .where(Rating.is_current.is_(True), Rating.rater.startswith(RATER_PREFIX, autoescape=True),
                            Rating.idempotency_key.startswith(RATER_PREFIX, autoescape=True)))
    for rid, response_id, rater, key, thumb, score, comment, tags in rows:
        fid = key[len(RATER_PREFIX):].split(":", 1)[0]
        if fid in listed or is_withdrawal(thumb, score, comment, tags):
            continue
        out.append((fid, RatingInput(response_id=response_id, rater=rater, idempotency_key=f"{RATER_PREFIX}{fid}:deleted",
                                     expects=True, expected_current_id=rid)))
    return out


class Poller:
    """`sync` every `interval_s` in a background task; a failed round is logged and the next one tries again.
    The first round reads all feedback (what is stored replays), later ones only what changed since the newest
    feedback seen (re-read once: `since` is inclusive)."""

    def __init__(self, sessions: sessionmaker[Session], url: str, api_key: str, interval_s: float, *,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.sessions, self.url, self.api_key, self.interval_s = sessions, url, api_key, interval_s
        self.transport = transport
        self.since: float | None = None
        self.last: SyncReport | None = None
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="openwebui-sync")

    async def stop(self) -> None:
        # A round under way runs in a thread that cannot be cancelled: it ends within the HTTP timeout, and its
        # writes are whole transactions either way.
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def round(self) -> SyncReport | None:
        try:
            report = await asyncio.to_thread(sync, self.sessions, self.url, self.api_key, since=self.since,
                                             transport=self.transport)
        except LoopError as exc:
            self.last_error = exc.message
            log.warning("open webui sync: %s", exc.message)
            return None
        except Exception as exc:  # noqa: BLE001 - a background loop: log it and try again next round
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("open webui sync failed")
            return None
        self.since, self.last, self.last_error = report.latest, report, None
        if report.created or report.unmatched or report.failed:
            log.info("open webui sync: %s", report.summary())
        return report

    async def _run(self) -> None:
        while True:
            await self.round()
            await asyncio.sleep(self.interval_s)
