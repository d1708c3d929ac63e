"""The human-feedback database: projects, items, candidates, annotators, assignments and judgements.

One SQLAlchemy 2 ORM schema serves a SQLite file (the default: WAL journal, a busy timeout, foreign keys on, every
transaction ``BEGIN IMMEDIATE`` so a read-then-write never fails on a stale snapshot) and PostgreSQL
(``postgresql+psycopg://user:pass@host/db``; row locks order concurrent claims and submissions). Only the ORM and
bound parameters reach the database.

The ledger is append-only. Every judgement is its own row and is never updated; "undo" inserts a row into
``retractions`` that points at the judgement, and consensus and exports are computed from the rows that have no
retraction. A client sends a submission UUID with each judgement; sending the same UUID again returns the row
already stored (no duplicate). ``(item, annotator)`` is unique in ``assignments``: nobody is given the same item
twice, and an item takes at most ``annotators_per_item`` annotators (gold/honeypot items go to every annotator).

The web routes (:mod:`moss_rlhf.feedback.app`) and the simulated annotators (:mod:`moss_rlhf.feedback.simulate`)
both label through :meth:`Store.next_item`, :meth:`Store.submit` and :meth:`Store.retract` — there is no side path.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import statistics
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (JSON, Boolean, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine,
                        event, exists, func, inspect, or_, select)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from moss_rlhf.config import UserError

T = TypeVar("T")

TASK_TYPES = ("pairwise", "rating", "ranking")
CHOICES = ("A", "B", "tie", "both_bad")
STRENGTHS = ("slightly", "much")
RATING_MIN, RATING_MAX = 1, 7
MAX_TEXT = 20_000  # characters of rationale or edited answer
MAX_ID = 2 ** 31 - 1  # ids are 32-bit integers in every database
SESSION_HOURS = 12


class FeedbackError(UserError):
    """A request the store refuses; ``status`` is the matching HTTP status."""

    status = 400


class InvalidSubmission(FeedbackError):
    status = 422


class NotAssigned(FeedbackError):
    status = 403


class AlreadyJudged(FeedbackError):
    status = 409


class SubmissionConflict(FeedbackError):
    status = 409


class NotFound(FeedbackError):
    status = 404


def _now() -> datetime:
    return datetime.now(timezone.utc)


def hash_token(token: str) -> str:
    """SHA-256 hex digest of a token: the only form in which tokens are stored."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def database_url(db: str) -> str:
    """A SQLAlchemy URL from ``--db``: a URL is kept as it is, anything else is a SQLite file path."""
    if "://" in db:
        return db
    return "sqlite:///" + str(Path(db).expanduser().resolve())


def masked(url: str) -> str:
    """The URL with its password replaced by ``***``: how a database is named in every message and log line."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split("@")[-1]


def check_text(value: str, name: str) -> str:
    """Text stored in the database: no NUL characters (PostgreSQL refuses them; nobody types them)."""
    if "\x00" in value:
        raise InvalidSubmission(f"{name}: contains a NUL character")
    return value


# Letters of other scripts that look like Latin ones (after case folding), and the Latin look-alikes of "l" and "o":
# two annotator names with the same skeleton would be told apart by nobody reading the admin page.
_LOOKALIKES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t", "у": "y",
    "х": "x", "і": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ӏ": "l", "ԛ": "q", "ԝ": "w", "ү": "y", "һ": "h",
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u",
    "χ": "x", "ζ": "z", "1": "l", "|": "l", "0": "o"})
_SCRIPT_FAMILIES = ({"CJK", "HIRAGANA", "KATAKANA"}, {"HANGUL", "CJK"})  # scripts written together in one name


def name_skeleton(name: str) -> str:
    """What a name looks like: NFKC, capital I as l, case-folded, look-alike letters mapped to Latin ones."""
    return " ".join(unicodedata.normalize("NFKC", name).replace("I", "l").casefold().translate(_LOOKALIKES).split())


def check_annotator_name(name: str) -> str:
    """A name people can read and tell apart: no control, zero-width or bidi characters, one script."""
    name = unicodedata.normalize("NFC", name.strip())
    if not name:
        raise FeedbackError("an annotator needs a name")
    if len(name) > 100:
        raise FeedbackError("an annotator name is at most 100 characters")
    for ch in name:
        if unicodedata.category(ch)[0] == "C" or unicodedata.category(ch) in ("Zl", "Zp"):
            raise FeedbackError(f"annotator name {name!r}: contains an invisible or control character "
                                f"(U+{ord(ch):04X})")
    scripts = {unicodedata.name(ch, "?").split()[0] for ch in name if ch.isalpha()}
    if len(scripts) > 1 and not any(scripts <= family for family in _SCRIPT_FAMILIES):
        raise FeedbackError(f"annotator name {name!r}: mixes scripts ({', '.join(sorted(scripts))})")
    return name


# --------------------------------------------------------------------------------------------------------------------
# Schema


class Base(DeclarativeBase):
    pass


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    task_type: Mapped[str] = mapped_column(String(16))  # default for new items
    annotators_per_item: Mapped[int] = mapped_column(Integer, default=1)
    guideline_version: Mapped[str] = mapped_column(String(64), default="1")
    guidelines: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    items: Mapped[list[Item]] = relationship(back_populates="project")


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    messages: Mapped[list] = mapped_column(JSON)  # the conversation so far: [{"role", "content"}, ...]
    task_type: Mapped[str] = mapped_column(String(16))
    gold: Mapped[int | None] = mapped_column(Integer, nullable=True)  # position of the best candidate (honeypot)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    project: Mapped[Project] = relationship(back_populates="items")
    candidates: Mapped[list[Candidate]] = relationship(order_by="Candidate.position", back_populates="item")


class Candidate(Base):
    __tablename__ = "candidates"
    __table_args__ = (UniqueConstraint("item_id", "position"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # order as stored (not as shown)
    text: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(500), default="")  # model path or "import"
    item: Mapped[Item] = relationship(back_populates="candidates")


class Annotator(Base):
    __tablename__ = "annotators"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("item_id", "annotator_id", name="uq_assignment_item_annotator"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id", ondelete="CASCADE"), index=True)
    shown_order: Mapped[list] = mapped_column(JSON)  # candidate ids, left to right
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Judgement(Base):
    __tablename__ = "judgements"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    submission_id: Mapped[str] = mapped_column(String(36), unique=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    task_type: Mapped[str] = mapped_column(String(16))
    choice: Mapped[str | None] = mapped_column(String(16), nullable=True)  # A / B / tie / both_bad (as shown)
    strength: Mapped[str | None] = mapped_column(String(16), nullable=True)  # slightly / much
    preferred_candidate_id: Mapped[int | None] = mapped_column(ForeignKey("candidates.id"), nullable=True)
    ratings: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # {"candidate id": 1..7}
    ranking: Mapped[list | None] = mapped_column(JSON, nullable=True)  # candidate ids, best first (may be partial)
    rationale: Mapped[str] = mapped_column(Text, default="")
    edited: Mapped[str] = mapped_column(Text, default="")  # the annotator's improved answer, if any
    shown_order: Mapped[list] = mapped_column(JSON)  # candidate ids as displayed: [A (left), B (right), C, ...]
    time_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    guideline_version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class LoginSession(Base):
    """A signed-in browser: the cookie holds a random session token (only its SHA-256 is stored), never the
    annotator's permanent token; logging out revokes it."""

    __tablename__ = "sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class Retraction(Base):
    """An undo: the judgement stays, this row says it no longer counts."""

    __tablename__ = "retractions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    judgement_id: Mapped[int] = mapped_column(ForeignKey("judgements.id"), unique=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


# --------------------------------------------------------------------------------------------------------------------
# Plain records handed to callers (no live ORM objects leave the store)


@dataclass(frozen=True)
class AnnotatorInfo:
    id: int
    name: str
    is_admin: bool


@dataclass(frozen=True)
class CandidateView:
    id: int
    position: int
    text: str
    source: str = ""


@dataclass(frozen=True)
class ItemView:
    """An item as one annotator sees it: ``candidates`` are in display order (A, B, C, ... left to right)."""

    id: int
    project_id: int
    project: str
    task_type: str
    messages: list[dict]
    candidates: list[CandidateView]
    guideline_version: str
    guidelines: str = ""

    @property
    def shown_order(self) -> list[int]:
        return [c.id for c in self.candidates]


@dataclass(frozen=True)
class ItemRecord:
    """An item with its candidates in stored order (for exports and agreement)."""

    id: int
    project_id: int
    task_type: str
    messages: list[dict]
    candidates: list[CandidateView]
    gold: int | None
    meta: dict


@dataclass
class Submission:
    """One answer from a client. ``choice`` A/B refers to ``shown_order`` (A is the first/left candidate shown);
    ``ratings`` maps candidate id to 1..7; ``ranking`` lists candidate ids best first (partial allowed)."""

    item_id: int
    submission_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    choice: str | None = None
    strength: str | None = None
    ratings: dict[int, int] | None = None
    ranking: list[int] | None = None
    rationale: str = ""
    edited: str = ""
    shown_order: list[int] | None = None
    time_ms: int | None = None
    guideline_version: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> Submission:
        """Validate the shape of a JSON body (types only; the store checks it against the item)."""
        if not isinstance(data, dict):
            raise InvalidSubmission("expected a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidSubmission(f"unknown field(s): {', '.join(unknown)}")

        def integer(value, name):
            if isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value.strip()) < 20:
                value = int(value)
            if isinstance(value, int) and not isinstance(value, bool):
                if not 0 <= value <= MAX_ID:
                    raise InvalidSubmission(f"{name}: out of range (0..{MAX_ID})")
                return value
            raise InvalidSubmission(f"{name}: expected an integer")

        def text(value, name):
            if value is None:
                return None
            if not isinstance(value, str):
                raise InvalidSubmission(f"{name}: expected a string")
            return check_text(value, name)

        if "item_id" not in data:
            raise InvalidSubmission("item_id: missing")
        kwargs: dict[str, Any] = {"item_id": integer(data["item_id"], "item_id")}
        if data.get("submission_id") is not None:
            kwargs["submission_id"] = text(data["submission_id"], "submission_id")
        for name in ("choice", "strength", "guideline_version"):
            kwargs[name] = text(data.get(name), name) or None
        for name in ("rationale", "edited"):
            kwargs[name] = text(data.get(name), name) or ""
        if data.get("ratings") is not None:
            if not isinstance(data["ratings"], dict):
                raise InvalidSubmission("ratings: expected an object {candidate id: 1..7}")
            kwargs["ratings"] = {integer(k, "ratings key"): integer(v, f"ratings[{k}]")
                                 for k, v in data["ratings"].items()}
        for name in ("ranking", "shown_order"):
            if data.get(name) is not None:
                if not isinstance(data[name], list):
                    raise InvalidSubmission(f"{name}: expected a list of candidate ids")
                kwargs[name] = [integer(v, name) for v in data[name]]
        if data.get("time_ms") is not None:
            kwargs["time_ms"] = integer(data["time_ms"], "time_ms")
        return cls(**kwargs)


@dataclass(frozen=True)
class JudgementRecord:
    id: int
    submission_id: str
    annotator_id: int
    annotator: str
    item_id: int
    project_id: int
    task_type: str
    choice: str | None
    strength: str | None
    preferred_candidate_id: int | None
    ratings: dict[int, int] | None
    ranking: list[int] | None
    rationale: str
    edited: str
    shown_order: list[int]
    time_ms: int | None
    guideline_version: str
    created_at: str
    retracted: bool = False
    retracted_at: str | None = None

    def to_json(self) -> dict:
        out = dict(self.__dict__)
        if self.ratings is not None:
            out["ratings"] = {str(k): v for k, v in self.ratings.items()}
        return out


@dataclass(frozen=True)
class SubmitResult:
    judgement: JudgementRecord
    created: bool  # False: this submission_id was already stored; the stored row is returned


@dataclass(frozen=True)
class Progress:
    done: int
    remaining: int

    @property
    def total(self) -> int:
        return self.done + self.remaining


@dataclass(frozen=True)
class AnnotatorProgress:
    annotator_id: int
    name: str
    is_admin: bool
    assigned: int
    judged: int
    retracted: int
    median_time_ms: float | None
    last_active: str | None


def _aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; they were written in UTC."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive datetimes; they were written in UTC
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat()


# --------------------------------------------------------------------------------------------------------------------
# The store


def _transient(error: Exception) -> bool:
    """Lock timeouts, deadlocks and serialisation failures: worth running the transaction again."""
    if isinstance(error, OperationalError) and "locked" in str(error).lower():
        return True
    code = getattr(getattr(error, "orig", None), "sqlstate", None) or getattr(getattr(error, "orig", None),
                                                                             "pgcode", None)
    return code in ("40001", "40P01", "55P03")


class Store:
    """Opens the feedback database at ``db`` (a SQLAlchemy URL or a SQLite file path); with ``create`` (the
    commands that make projects) an absent one is created, otherwise it must exist: a typo in ``--db`` is an
    error, not a new empty database."""

    def __init__(self, db: str = "sqlite:///feedback.db", echo: bool = False, create: bool = True):
        self.url = database_url(db)
        self.display_url = masked(self.url)
        self.is_sqlite = self.url.startswith("sqlite")
        try:
            if self.is_sqlite:
                if self.url in ("sqlite://", "sqlite:///:memory:"):
                    raise FeedbackError("an in-memory SQLite database cannot be shared by the web server's threads; "
                                        "give a file path")
                path = Path(self.url.removeprefix("sqlite:///"))
                if not create and not path.is_file():
                    raise FeedbackError(f"--db {db}: no feedback database there (`moss-rlhf feedback create` or "
                                        f"`import` makes one)")
                path.parent.mkdir(parents=True, exist_ok=True)
                self.engine = create_engine(self.url, echo=echo, pool_size=8, max_overflow=24,
                                            connect_args={"timeout": 60, "check_same_thread": False})
                _configure_sqlite(self.engine)
            else:
                self.engine = create_engine(self.url, echo=echo, pool_size=10, max_overflow=30, pool_pre_ping=True)
            if not create and not inspect(self.engine).has_table("projects"):
                raise FeedbackError(f"--db {self.display_url}: holds no feedback tables (`moss-rlhf feedback "
                                    f"create` or `import` makes them)")
            Base.metadata.create_all(self.engine)
        except (OperationalError, DatabaseError, ArgumentError) as e:
            reason = next((line.strip() for line in str(getattr(e, "orig", None) or e).splitlines() if line.strip()),
                          type(e).__name__)
            raise FeedbackError(f"--db {self.display_url}: cannot open the database: {reason}") from None
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        # Reads need no write lock: on SQLite they begin a plain (deferred) transaction and run beside the writer.
        self._read = sessionmaker(self.engine.execution_options(read_only=True), expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------------------------------------ transactions

    def _tx(self, work: Callable[[Session], T], attempts: int = 8) -> T:
        for attempt in range(attempts):
            try:
                with self._session.begin() as s:
                    return work(s)
            except (OperationalError, DBAPIError) as e:
                if attempt == attempts - 1 or not _transient(e):
                    raise
                time.sleep(min(0.05 * 2 ** attempt, 1.0) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------------------------------------ annotators

    def add_annotator(self, name: str, admin: bool = False) -> tuple[AnnotatorInfo, str]:
        """Create an annotator; returns it with its token (shown once — only its SHA-256 is stored). A name that
        looks like an existing one (look-alike letters, another case) is refused."""
        name = check_annotator_name(name)
        token = secrets.token_urlsafe(24)

        def work(s: Session):
            for other in s.scalars(select(Annotator.name)):
                if name_skeleton(other) == name_skeleton(name):
                    raise FeedbackError(f"an annotator named {other!r} already exists"
                                        + ("" if other == name else f" (and {name!r} looks the same)"))
            a = Annotator(name=name, token_hash=hash_token(token), is_admin=admin)
            s.add(a)
            s.flush()
            return AnnotatorInfo(a.id, a.name, a.is_admin)

        return self._tx(work), token

    def authenticate(self, token: str | None) -> AnnotatorInfo | None:
        """The annotator whose permanent token this is (API bearer tokens, the login form)."""
        if not token or len(token) > 256:
            return None
        with self._read() as s:
            a = s.scalar(select(Annotator).where(Annotator.token_hash == hash_token(token)))
            return AnnotatorInfo(a.id, a.name, a.is_admin) if a else None

    def rotate_token(self, name: str) -> str:
        """A new token for the annotator ``name`` (the old one stops working) and every session of theirs ended;
        returns the new token (shown once)."""
        token = secrets.token_urlsafe(24)

        def work(s: Session):
            a = s.scalar(select(Annotator).where(Annotator.name == name))
            if a is None:
                raise NotFound(f"no annotator named {name!r}")
            a.token_hash = hash_token(token)
            for session in s.scalars(select(LoginSession).where(LoginSession.annotator_id == a.id)):
                session.revoked = True

        self._tx(work)
        return token

    def open_session(self, annotator_id: int) -> str:
        """A new browser session for the annotator; returns its token (the cookie's value)."""
        token = secrets.token_urlsafe(32)
        self._tx(lambda s: s.add(LoginSession(token_hash=hash_token(token), annotator_id=annotator_id,
                                              expires_at=_now() + timedelta(hours=SESSION_HOURS))))
        return token

    def session_annotator(self, token: str | None) -> AnnotatorInfo | None:
        """The annotator of a live (not revoked, not expired) session token."""
        if not token or len(token) > 256:
            return None
        with self._read() as s:
            row = s.execute(select(LoginSession, Annotator).join(Annotator, Annotator.id == LoginSession.annotator_id)
                            .where(LoginSession.token_hash == hash_token(token))).first()
        if row is None or row[0].revoked or _aware(row[0].expires_at) < _now():
            return None
        return AnnotatorInfo(row[1].id, row[1].name, row[1].is_admin)

    def close_session(self, token: str) -> None:
        """Log out: the session token stops working at once."""

        def work(s: Session):
            for session in s.scalars(select(LoginSession).where(LoginSession.token_hash == hash_token(token))):
                session.revoked = True

        self._tx(work)

    def annotators(self) -> list[AnnotatorInfo]:
        with self._read() as s:
            return [AnnotatorInfo(a.id, a.name, a.is_admin) for a in s.scalars(select(Annotator).order_by(Annotator.id))]

    # ------------------------------------------------------------------------------------------------ projects

    def create_project(self, name: str, task_type: str = "pairwise", annotators_per_item: int = 1,
                       guideline_version: str = "1", guidelines: str = "") -> int:
        if task_type not in TASK_TYPES:
            raise FeedbackError(f"task_type must be one of {', '.join(TASK_TYPES)}, got {task_type!r}")
        if annotators_per_item < 1:
            raise FeedbackError("annotators_per_item must be at least 1")
        if not name.strip() or len(name) > 200 or "\x00" in name:
            raise FeedbackError("a project name is 1 to 200 characters (no NUL)")
        if len(guideline_version) > 64 or "\x00" in guideline_version + guidelines:
            raise FeedbackError("a guideline version is at most 64 characters (no NUL in it or the guidelines)")

        def work(s: Session):
            if s.scalar(select(Project.id).where(Project.name == name)) is not None:
                raise FeedbackError(f"a project named {name!r} already exists")
            p = Project(name=name, task_type=task_type, annotators_per_item=annotators_per_item,
                        guideline_version=guideline_version, guidelines=guidelines)
            s.add(p)
            s.flush()
            return p.id

        return self._tx(work)

    def project_id(self, name_or_id: str | int | None) -> int | None:
        """A project's id from its name (or id); ``None`` when there is no such project (or none was named)."""
        if name_or_id is None or name_or_id == "":
            return None
        with self._read() as s:
            if isinstance(name_or_id, int) or str(name_or_id).isdigit():
                pid = s.scalar(select(Project.id).where(Project.id == int(name_or_id)))
                if pid is not None:
                    return pid
            return s.scalar(select(Project.id).where(Project.name == str(name_or_id)))

    def require_project(self, name_or_id: str | int | None) -> int | None:
        """Like :meth:`project_id`, but a named project that does not exist raises :class:`NotFound`
        (``None`` or "" still means "all projects")."""
        pid = self.project_id(name_or_id)
        if pid is None and name_or_id not in (None, ""):
            names = ", ".join(p["name"] for p in self.projects()) or "none yet"
            raise NotFound(f"no project {name_or_id!r} (projects: {names})")
        return pid

    def projects(self) -> list[dict]:
        with self._read() as s:
            rows = s.execute(select(Project, func.count(Item.id)).outerjoin(Item).group_by(Project.id)
                             .order_by(Project.id)).all()
            return [dict(id=p.id, name=p.name, task_type=p.task_type, annotators_per_item=p.annotators_per_item,
                         guideline_version=p.guideline_version, items=n) for p, n in rows]

    def add_items(self, project_id: int, items: Iterable[dict]) -> list[int]:
        """Add items: each ``{"messages": [...], "responses": [str | {"text", "source"}], "gold"?: int,
        "task_type"?: str, "meta"?: dict}``. Returns the new item ids."""

        def work(s: Session):
            project = s.get(Project, project_id)
            if project is None:
                raise NotFound(f"no project with id {project_id}")
            ids = []
            for number, spec in enumerate(items, start=1):
                responses = spec["responses"]
                task_type = spec.get("task_type") or (project.task_type if len(responses) == 2 else
                                                      ("ranking" if project.task_type == "pairwise"
                                                       else project.task_type))
                if task_type not in TASK_TYPES:
                    raise FeedbackError(f"item {number}: task_type must be one of {', '.join(TASK_TYPES)}")
                if task_type == "pairwise" and len(responses) != 2:
                    raise FeedbackError(f"item {number}: a pairwise item needs exactly 2 responses")
                if task_type == "ranking" and len(responses) < 2:
                    raise FeedbackError(f"item {number}: a ranking item needs at least 2 responses")
                if not responses:
                    raise FeedbackError(f"item {number}: no responses")
                gold = spec.get("gold")
                if gold is not None and not (isinstance(gold, int) and 0 <= gold < len(responses)):
                    raise FeedbackError(f"item {number}: gold must be the index of one of the responses")
                texts = [m.get("content", "") for m in spec["messages"]] + [
                    r if isinstance(r, str) else r["text"] for r in responses]
                if any("\x00" in t for t in texts):
                    raise FeedbackError(f"item {number}: a text contains a NUL character")
                item = Item(project_id=project.id, messages=spec["messages"], task_type=task_type, gold=gold,
                            meta=spec.get("meta") or {})
                for position, r in enumerate(responses):
                    text, source = (r, "") if isinstance(r, str) else (r["text"], r.get("source", ""))
                    item.candidates.append(Candidate(position=position, text=text, source=source[:500]))
                s.add(item)
                s.flush()
                ids.append(item.id)
            return ids

        return self._tx(work)

    def items(self, project_id: int | None = None) -> list[ItemRecord]:
        with self._read() as s:
            q = select(Item).order_by(Item.id)
            if project_id is not None:
                q = q.where(Item.project_id == project_id)
            out = []
            for item in s.scalars(q):
                out.append(ItemRecord(item.id, item.project_id, item.task_type, item.messages,
                                      [CandidateView(c.id, c.position, c.text, c.source) for c in item.candidates],
                                      item.gold, item.meta or {}))
            return out

    # ------------------------------------------------------------------------------------------------ labelling

    def next_item(self, annotator_id: int, project_id: int | None = None, item_id: int | None = None) -> ItemView | None:
        """The annotator's next item: ``item_id`` if it is assigned to them and not judged (e.g. after an undo),
        else their oldest open assignment, else a newly claimed item that still needs annotators. ``None``: done."""

        def open_assignment(s: Session, only_item: int | None = None):
            q = (select(Assignment).join(Item, Item.id == Assignment.item_id)
                 .where(Assignment.annotator_id == annotator_id, ~exists(_active_judgement(annotator_id, Assignment.item_id))))
            if project_id is not None:
                q = q.where(Item.project_id == project_id)
            if only_item is not None:
                q = q.where(Assignment.item_id == only_item)
            return s.scalar(q.order_by(Assignment.id).limit(1))

        def work(s: Session):
            # one claim at a time per annotator: concurrent requests of the same annotator (two tabs, a double
            # reload) queue on this row lock, and the second finds the first one's claim as its open assignment
            s.execute(select(Annotator.id).where(Annotator.id == annotator_id).with_for_update())
            assignment = open_assignment(s, item_id) if item_id is not None else None
            assignment = assignment or open_assignment(s)
            for _ in range(50):
                if assignment is not None:
                    break
                candidate_id = s.scalar(_claimable(annotator_id, project_id).with_only_columns(Item.id)
                                        .order_by(Item.id).limit(1))
                if candidate_id is None:
                    return None
                item = s.scalar(select(Item).where(Item.id == candidate_id).with_for_update())
                taken = s.scalar(select(func.count(Assignment.id)).where(Assignment.item_id == item.id))
                mine = s.scalar(select(Assignment.id).where(Assignment.item_id == item.id,
                                                            Assignment.annotator_id == annotator_id))
                if mine is not None or (item.gold is None and taken >= item.project.annotators_per_item):
                    continue  # someone else filled it between the search and the lock: look again
                order = [c.id for c in item.candidates]
                # shown order is random across items (no side is favoured) but fixed per (item, annotator), so a
                # simulated labelling rerun with the same seed sees, and answers, the same screens
                random.Random(f"{item.id}:{annotator_id}").shuffle(order)
                try:
                    with s.begin_nested():
                        assignment = Assignment(item_id=item.id, annotator_id=annotator_id, shown_order=order)
                        s.add(assignment)
                except IntegrityError:
                    assignment = None
            if assignment is None:
                return None
            return self._view(s, assignment)

        return self._tx(work)

    def _view(self, s: Session, assignment: Assignment) -> ItemView:
        item = s.get(Item, assignment.item_id)
        by_id = {c.id: c for c in item.candidates}
        shown = [by_id[cid] for cid in assignment.shown_order if cid in by_id]
        shown += [c for c in item.candidates if c.id not in assignment.shown_order]
        return ItemView(item.id, item.project_id, item.project.name, item.task_type, item.messages,
                        [CandidateView(c.id, c.position, c.text, c.source) for c in shown],
                        item.project.guideline_version, item.project.guidelines)

    def progress(self, annotator_id: int, project_id: int | None = None) -> Progress:
        """Judged (and not retracted) items, and items still to do (open assignments plus claimable items)."""
        with self._read() as s:
            done_q = (select(func.count(Judgement.id)).join(Item, Item.id == Judgement.item_id)
                      .where(Judgement.annotator_id == annotator_id,
                             ~exists(select(Retraction.id).where(Retraction.judgement_id == Judgement.id))))
            open_q = (select(func.count(Assignment.id)).join(Item, Item.id == Assignment.item_id)
                      .where(Assignment.annotator_id == annotator_id,
                             ~exists(_active_judgement(annotator_id, Assignment.item_id))))
            if project_id is not None:
                done_q = done_q.where(Item.project_id == project_id)
                open_q = open_q.where(Item.project_id == project_id)
            claimable = s.scalar(_claimable(annotator_id, project_id).with_only_columns(func.count(Item.id)))
            return Progress(s.scalar(done_q) or 0, (s.scalar(open_q) or 0) + (claimable or 0))

    def submit(self, annotator_id: int, sub: Submission) -> SubmitResult:
        """Store one judgement. Idempotent on ``sub.submission_id``: a UUID already stored returns that row
        (``created=False``). Raises :class:`NotAssigned`, :class:`AlreadyJudged`, :class:`InvalidSubmission`,
        :class:`SubmissionConflict` (the UUID belongs to another annotator's judgement)."""
        try:
            sub.submission_id = str(uuid.UUID(str(sub.submission_id)))
        except ValueError:
            raise InvalidSubmission("submission_id: expected a UUID") from None
        for name in ("rationale", "edited"):
            if len(getattr(sub, name) or "") > MAX_TEXT:
                raise InvalidSubmission(f"{name}: longer than {MAX_TEXT} characters")
            check_text(getattr(sub, name) or "", name)
        if sub.time_ms is not None and not 0 <= sub.time_ms < 2 ** 31:
            raise InvalidSubmission("time_ms: out of range")
        if sub.choice is not None and sub.choice not in CHOICES:
            raise InvalidSubmission(f"choice: expected one of {', '.join(CHOICES)}")
        if sub.strength is not None and sub.strength not in STRENGTHS:
            raise InvalidSubmission(f"strength: expected one of {', '.join(STRENGTHS)}")

        def existing(s: Session) -> SubmitResult | None:
            j = s.scalar(select(Judgement).where(Judgement.submission_id == sub.submission_id))
            if j is None:
                return None
            if j.annotator_id != annotator_id:
                raise SubmissionConflict("this submission_id belongs to another judgement")
            return SubmitResult(_record(s, j), False)

        def work(s: Session):
            found = existing(s)
            if found:
                return found
            assignment = s.scalar(select(Assignment).where(Assignment.item_id == sub.item_id,
                                                           Assignment.annotator_id == annotator_id).with_for_update())
            if assignment is None:
                raise NotAssigned(f"item {sub.item_id} is not assigned to you")
            found = existing(s)  # a twin request may have committed while we waited for the lock
            if found:
                return found
            if s.scalar(select(exists(_active_judgement(annotator_id, sub.item_id)))):
                raise AlreadyJudged(f"you have already judged item {sub.item_id} (undo it first to change it)")
            item = s.get(Item, sub.item_id)
            project = item.project
            if sub.guideline_version is not None and sub.guideline_version != project.guideline_version:
                raise InvalidSubmission(f"guideline_version: the project's guidelines are now version "
                                        f"{project.guideline_version!r}; reload the page")
            fields = _validated(sub, item, assignment)
            # an "edit" that is one of the responses word for word is no edit (the box starts filled with one)
            edited = sub.edited or ""
            if edited.strip() in {c.text.strip() for c in item.candidates}:
                edited = ""
            judgement = Judgement(submission_id=sub.submission_id, annotator_id=annotator_id, item_id=item.id,
                                  task_type=item.task_type, guideline_version=project.guideline_version,
                                  rationale=sub.rationale or "", edited=edited, time_ms=sub.time_ms, **fields)
            try:
                with s.begin_nested():
                    s.add(judgement)
            except IntegrityError:
                found = existing(s)
                if found:
                    return found
                raise
            return SubmitResult(_record(s, judgement), True)

        return self._tx(work)

    def retract(self, annotator_id: int, judgement_id: int | None = None) -> JudgementRecord | None:
        """Undo: mark the annotator's latest (or the given) active judgement as retracted. Returns it, or None."""

        def work(s: Session):
            q = (select(Judgement).where(Judgement.annotator_id == annotator_id,
                                         ~exists(select(Retraction.id).where(Retraction.judgement_id == Judgement.id)))
                 .order_by(Judgement.id.desc()).limit(1))
            if judgement_id is not None:
                q = q.where(Judgement.id == judgement_id)
            j = s.scalar(q)
            if j is None:
                return None
            try:
                with s.begin_nested():
                    s.add(Retraction(judgement_id=j.id, annotator_id=annotator_id))
            except IntegrityError:
                return None  # a concurrent undo retracted it first
            return _record(s, j)

        return self._tx(work)

    # ------------------------------------------------------------------------------------------------ reading

    def judgements(self, project_id: int | None = None, include_retracted: bool = False,
                   annotator_id: int | None = None) -> list[JudgementRecord]:
        with self._read() as s:
            q = (select(Judgement, Annotator.name, Item.project_id, Retraction.created_at)
                 .join(Annotator, Annotator.id == Judgement.annotator_id)
                 .join(Item, Item.id == Judgement.item_id)
                 .outerjoin(Retraction, Retraction.judgement_id == Judgement.id).order_by(Judgement.id))
            if project_id is not None:
                q = q.where(Item.project_id == project_id)
            if annotator_id is not None:
                q = q.where(Judgement.annotator_id == annotator_id)
            if not include_retracted:
                q = q.where(Retraction.id.is_(None))
            return [_record_from(j, name, pid, retracted_at) for j, name, pid, retracted_at in s.execute(q)]

    def annotator_progress(self, project_id: int | None = None) -> list[AnnotatorProgress]:
        """Per annotator: assignments, active and retracted judgements, median time, last activity."""
        out = []
        records = self.judgements(project_id, include_retracted=True)
        with self._read() as s:
            q = select(Assignment.annotator_id, func.count(Assignment.id)).join(Item, Item.id == Assignment.item_id)
            if project_id is not None:
                q = q.where(Item.project_id == project_id)
            assigned = dict(s.execute(q.group_by(Assignment.annotator_id)).all())
            for a in s.scalars(select(Annotator).order_by(Annotator.id)):
                mine = [r for r in records if r.annotator_id == a.id]
                active = [r for r in mine if not r.retracted]
                times = [r.time_ms for r in active if r.time_ms is not None]
                if a.is_admin and not mine and not assigned.get(a.id):
                    continue
                out.append(AnnotatorProgress(a.id, a.name, a.is_admin, assigned.get(a.id, 0), len(active),
                                             len(mine) - len(active), statistics.median(times) if times else None,
                                             max((r.created_at for r in mine), default=None)))
        return out


def _active_judgement(annotator_id: int, item_id) -> Any:
    """A correlated ``SELECT`` of the annotator's non-retracted judgements of ``item_id`` (a value or a column)."""
    return (select(Judgement.id)
            .where(Judgement.annotator_id == annotator_id, Judgement.item_id == item_id,
                   ~exists(select(Retraction.id).where(Retraction.judgement_id == Judgement.id))))


def _claimable(annotator_id: int, project_id: int | None):
    """Items the annotator has not been given that still need annotators (gold items go to everyone)."""
    taken = select(func.count(Assignment.id)).where(Assignment.item_id == Item.id).scalar_subquery()
    mine = select(Assignment.id).where(Assignment.item_id == Item.id, Assignment.annotator_id == annotator_id)
    q = (select(Item.id).join(Project, Project.id == Item.project_id)
         .where(~exists(mine), or_(Item.gold.is_not(None), taken < Project.annotators_per_item)))
    if project_id is not None:
        q = q.where(Item.project_id == project_id)
    return q


def _validated(sub: Submission, item: Item, assignment: Assignment) -> dict:
    """Check an answer against its item; returns the judgement's answer columns. The order recorded is the one the
    server showed (a client may echo it, not change it), and only the answer fields of the item's task type may be
    given (a rating with a ``choice`` beside it would contradict itself, and export would believe the choice)."""
    ids = [c.id for c in item.candidates]
    shown = list(assignment.shown_order)
    if sub.shown_order is not None and list(sub.shown_order) != shown:
        raise InvalidSubmission("shown_order: differs from the order you were shown; reload the page")
    if sorted(shown) != sorted(ids):
        raise InvalidSubmission("shown_order: must list each of the item's candidate ids once")
    allowed = {"pairwise": {"choice", "strength"}, "rating": {"ratings"}, "ranking": {"ranking"}}[item.task_type]
    foreign = [name for name in ("choice", "strength", "ratings", "ranking")
               if getattr(sub, name) not in (None, {}, []) and name not in allowed]
    if foreign:
        raise InvalidSubmission(f"{', '.join(foreign)}: not an answer to a {item.task_type} item")
    out: dict[str, Any] = {"shown_order": list(shown), "choice": None, "strength": None,
                           "preferred_candidate_id": None, "ratings": None, "ranking": None}
    if sub.choice is not None:
        if sub.choice not in CHOICES:
            raise InvalidSubmission(f"choice: expected one of {', '.join(CHOICES)}")
        if len(ids) != 2:
            raise InvalidSubmission("choice: A/B answers need an item with exactly two responses")
        out["choice"] = sub.choice
        if sub.choice in ("A", "B"):
            out["preferred_candidate_id"] = shown[0 if sub.choice == "A" else 1]
    if sub.strength is not None:
        if sub.strength not in STRENGTHS:
            raise InvalidSubmission(f"strength: expected one of {', '.join(STRENGTHS)}")
        if out["choice"] not in ("A", "B"):
            raise InvalidSubmission("strength: only with choice A or B")
        out["strength"] = sub.strength
    if sub.ratings:
        unknown = set(sub.ratings) - set(ids)
        if unknown:
            raise InvalidSubmission(f"ratings: unknown candidate id(s) {sorted(unknown)}")
        if any(not RATING_MIN <= v <= RATING_MAX for v in sub.ratings.values()):
            raise InvalidSubmission(f"ratings: each rating must be {RATING_MIN}..{RATING_MAX}")
        out["ratings"] = {str(k): int(v) for k, v in sub.ratings.items()}
    if sub.ranking:
        if len(set(sub.ranking)) != len(sub.ranking) or set(sub.ranking) - set(ids):
            raise InvalidSubmission("ranking: candidate ids of this item, each at most once")
        out["ranking"] = list(sub.ranking)
    if item.task_type == "pairwise" and out["choice"] is None:
        raise InvalidSubmission("choice: required (A, B, tie or both_bad)")
    if item.task_type == "rating" and (out["ratings"] is None or len(out["ratings"]) != len(ids)):
        raise InvalidSubmission("ratings: rate every response 1..7")
    if item.task_type == "ranking" and (out["ranking"] is None or len(out["ranking"]) < 2):
        raise InvalidSubmission("ranking: order at least two responses (best first)")
    return out


def _record(s: Session, j: Judgement) -> JudgementRecord:
    name = s.scalar(select(Annotator.name).where(Annotator.id == j.annotator_id))
    project_id = s.scalar(select(Item.project_id).where(Item.id == j.item_id))
    retracted_at = s.scalar(select(Retraction.created_at).where(Retraction.judgement_id == j.id))
    return _record_from(j, name, project_id, retracted_at)


def _record_from(j: Judgement, annotator: str, project_id: int, retracted_at: datetime | None) -> JudgementRecord:
    return JudgementRecord(
        id=j.id, submission_id=j.submission_id, annotator_id=j.annotator_id, annotator=annotator, item_id=j.item_id,
        project_id=project_id, task_type=j.task_type, choice=j.choice, strength=j.strength,
        preferred_candidate_id=j.preferred_candidate_id,
        ratings={int(k): int(v) for k, v in j.ratings.items()} if j.ratings else None,
        ranking=list(j.ranking) if j.ranking else None, rationale=j.rationale or "", edited=j.edited or "",
        shown_order=list(j.shown_order), time_ms=j.time_ms, guideline_version=j.guideline_version,
        created_at=_iso(j.created_at), retracted=retracted_at is not None, retracted_at=_iso(retracted_at))


def _configure_sqlite(engine) -> None:
    """WAL, busy timeout, foreign keys; and ``BEGIN IMMEDIATE`` for every read-write transaction, so that one that
    reads then writes takes the write lock up front (waiting up to the busy timeout) instead of failing when another
    writer committed since its read. Read-only sessions begin a deferred transaction (WAL readers never wait)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        connection.exec_driver_sql("BEGIN" if connection.get_execution_options().get("read_only") else "BEGIN IMMEDIATE")


# --------------------------------------------------------------------------------------------------------------------
# Filling a project


def new_project(store: Store, name: str, task_type: str, annotators_per_item: int, guideline_version: str,
                 guidelines: str, append: bool) -> int:
    existing = store.project_id(name)
    if existing is not None:
        if not append:
            raise FeedbackError(f"a project named {name!r} already exists (append=True adds items to it)")
        return existing
    return store.create_project(name, task_type, annotators_per_item, guideline_version, guidelines)


def import_candidates(store: Store, name: str, jsonl_path: str | Path, annotators_per_item: int = 1,
                      task_type: str = "pairwise", guideline_version: str = "1", guidelines: str = "",
                      append: bool = False) -> int:
    """Create project ``name`` from a file of ``{"prompt": str | messages, or "messages": [...], "responses": [str,
    ...], "gold"?: index of the best response, "task_type"?: pairwise|rating|ranking}`` records (any format
    :func:`moss_rlhf.data.formats.iter_rows` reads). Items with two responses get ``task_type``; items with more get
    ``ranking`` when ``task_type`` is pairwise. Other fields are kept in the item's ``meta``. Returns the project id.
    Errors name the file, line and field (:class:`moss_rlhf.data.formats.DataError`)."""
    from moss_rlhf.data.formats import DataError, iter_rows, parse_prompt

    specs = []
    for source, line, row in iter_rows(jsonl_path):
        where = (source, line)
        if "\\u0000" in json.dumps(row):
            raise DataError(source, line, None, "contains a NUL character (\\u0000), which no database text holds")
        messages = parse_prompt({k: row[k] for k in ("prompt", "messages") if k in row}, where)
        responses = row.get("responses")
        if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
            raise DataError(source, line, "responses", "expected a non-empty list of strings")
        gold = row.get("gold")
        if gold is not None and (isinstance(gold, bool) or not isinstance(gold, int)
                                 or not 0 <= gold < len(responses)):
            raise DataError(source, line, "gold", f"expected the index (0..{len(responses) - 1}) of the best response")
        item_type = row.get("task_type") or None
        if item_type is not None and item_type not in TASK_TYPES:
            raise DataError(source, line, "task_type", f"expected one of {', '.join(TASK_TYPES)}")
        if item_type == "pairwise" and len(responses) != 2:
            raise DataError(source, line, "responses", "a pairwise item needs exactly 2 responses")
        meta = {k: v for k, v in row.items() if k not in ("prompt", "messages", "responses", "gold", "task_type")}
        specs.append({"messages": messages, "responses": [{"text": r, "source": "import"} for r in responses],
                      "gold": gold, "task_type": item_type, "meta": meta})
    project_id = new_project(store, name, task_type, annotators_per_item, guideline_version, guidelines, append)
    store.add_items(project_id, specs)
    return project_id


@dataclass(frozen=True)
class CreatedProject:
    project_id: int
    items: int
    duplicates_removed: int  # candidates whose text repeated another candidate of the same item
    items_dropped: int       # prompts left with fewer than two different replies


def create_project_from_models(store: Store, name: str, prompts_path: str | Path, model_paths: Sequence[str],
                               k: int = 2, annotators_per_item: int = 1, sampling=None, seed: int = 0,
                               device: str = "auto", batch_size: int = 32, task_type: str = "auto",
                               guideline_version: str = "1", guidelines: str = "",
                               append: bool = False) -> CreatedProject:
    """Create project ``name``: for every prompt in ``prompts_path`` sample ``k`` responses, candidate ``i`` from
    model ``model_paths[i % len(model_paths)]`` (so two models and k=2 compare the models head to head), with
    :func:`moss_rlhf.sampling.sample_replies` and ``sampling`` (a :class:`moss_rlhf.sampling.SamplingConfig`).
    ``task_type`` "auto" is pairwise for k=2 and ranking for k>2. A reply sampled twice for one prompt is kept once
    (two equal texts carry no preference), and a prompt left with fewer than two different replies (or, for
    pairwise items, not two) is dropped; the result says how many."""
    from moss_rlhf.data.formats import load_records, parse_prompt
    from moss_rlhf.models import load_causal_lm, resolve_device
    from moss_rlhf.sampling import SamplingConfig, sample_replies
    from moss_rlhf.sampling.builtin import BuiltinSampler
    from moss_rlhf.tokenizer import load_tokenizer

    if k < 2:
        raise FeedbackError("k must be at least 2 (responses to compare per prompt)")
    if not model_paths:
        raise FeedbackError("give at least one model")
    kind = task_type if task_type != "auto" else ("pairwise" if k == 2 else "ranking")
    if kind == "pairwise" and k != 2:
        raise FeedbackError("pairwise items need k=2; use ranking or rating for k>2")
    sampling = sampling or SamplingConfig()
    rows = load_records(prompts_path)
    prompts = [parse_prompt(row, (str(prompts_path), n)) for n, row in enumerate(rows, start=1)]
    metas = [{key: v for key, v in row.items() if key not in ("prompt", "messages")} for row in rows]
    responses: list[list[dict]] = [[{} for _ in range(k)] for _ in prompts]
    for m, path in enumerate(model_paths):
        slots = list(range(m, k, len(model_paths)))
        if not slots:
            continue
        tokenizer = load_tokenizer(path)
        model = load_causal_lm(path).to(resolve_device(device))
        inputs = [p for p in prompts for _ in slots]
        texts, _ = sample_replies(BuiltinSampler(model, tokenizer), tokenizer, inputs, sampling, seed=seed + m,
                                  batch_size=batch_size)
        for n, text in enumerate(texts):
            # a NUL a model may sample is no text anyone wrote, and no database stores it
            responses[n // len(slots)][slots[n % len(slots)]] = {"text": text.replace("\x00", ""),
                                                                 "source": str(path)}
        del model
    specs, removed, dropped = [], 0, 0
    for prompt, replies, meta in zip(prompts, responses, metas):
        distinct, seen = [], set()
        for reply in replies:
            if reply["text"].strip() not in seen:
                seen.add(reply["text"].strip())
                distinct.append(reply)
        removed += len(replies) - len(distinct)
        if len(distinct) < 2 or (kind == "pairwise" and len(distinct) != 2):
            dropped += 1
            continue
        specs.append({"messages": prompt, "responses": distinct, "task_type": kind, "meta": meta})
    project_id = new_project(store, name, kind, annotators_per_item, guideline_version, guidelines, append)
    store.add_items(project_id, specs)
    return CreatedProject(project_id, len(specs), removed, dropped)
