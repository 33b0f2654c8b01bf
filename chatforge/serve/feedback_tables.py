"""The feedback store's tables, their schema version and its upgrades, and how a database is opened.

Version 1 (before versioning): answers' text came from clients. Version 2: answers reference the server's
``generations`` record (``messages.author``, ``messages.generation_id``); version-1 answers become
``unverified``. Opening a database creates it at SCHEMA_VERSION, upgrades a known older one, and refuses a
newer or unknown one with a clear error.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint, inspect, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from chatforge.errors import ChatforgeError

SCHEMA_VERSION = 2  # 1: before versioning (answers' text came from clients); 2: answers by reference
AUTHORS = ("model", "human", "unverified")


def now() -> datetime:
    return datetime.now(timezone.utc)


def _new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    pass


class Conversation(Base):
    __tablename__ = "conversations"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=_new_id)
    user_id: Mapped[str] = mapped_column(String(64), index=True, default="")
    title: Mapped[str] = mapped_column(Text, default="")
    model_id: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    messages: Mapped[list["Message"]] = relationship(back_populates="conversation", cascade="all, delete-orphan",
                                                     order_by="Message.seq")
    rankings: Mapped[list["Ranking"]] = relationship(cascade="all, delete-orphan")


class Message(Base):
    __tablename__ = "messages"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # creation order
    id: Mapped[str] = mapped_column(String(32), unique=True, index=True, default=_new_id)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"), index=True)
    parent_id: Mapped[str | None] = mapped_column(String(32), index=True)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    model_id: Mapped[str | None] = mapped_column(String(200))
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    compare_group: Mapped[str | None] = mapped_column(String(32), index=True)
    compare_index: Mapped[int | None] = mapped_column(Integer)
    author: Mapped[str] = mapped_column(String(16), default="human")
    generation_id: Mapped[int | None] = mapped_column(ForeignKey("generations.id"), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    conversation: Mapped[Conversation] = relationship(back_populates="messages")
    ratings: Mapped[list["Rating"]] = relationship(cascade="all, delete-orphan", order_by="Rating.id")
    edits: Mapped[list["Edit"]] = relationship(cascade="all, delete-orphan", order_by="Edit.id")
    signals: Mapped[list["Signal"]] = relationship(cascade="all, delete-orphan", order_by="Signal.id")


class Generation(Base):
    __tablename__ = "generations"
    __table_args__ = (UniqueConstraint("completion_id", "choice_index"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    completion_id: Mapped[str] = mapped_column(String(64), index=True)
    choice_index: Mapped[int] = mapped_column(Integer)
    user_id: Mapped[str] = mapped_column(String(64), default="")
    model_id: Mapped[str] = mapped_column(String(200))
    prompt_digest: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class SchemaVersion(Base):
    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)


class AboutAnswer:
    """The columns of every row about one answer."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Rating(AboutAnswer, Base):
    __tablename__ = "ratings"
    value: Mapped[int] = mapped_column(Integer)


class Ranking(Base):
    __tablename__ = "rankings"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=_new_id)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"), index=True)
    parent_id: Mapped[str] = mapped_column(String(32))  # the question the answers reply to
    message_ids: Mapped[list] = mapped_column(JSON)
    completions: Mapped[list] = mapped_column(JSON)  # the answers' texts when ranked
    ranking: Mapped[list] = mapped_column(JSON)  # indices into message_ids, best first
    model_id: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Edit(AboutAnswer, Base):
    __tablename__ = "edits"
    before: Mapped[str] = mapped_column(Text)
    after: Mapped[str] = mapped_column(Text)


class Signal(AboutAnswer, Base):
    __tablename__ = "signals"
    kind: Mapped[str] = mapped_column(String(16))


class FilterDecision(Base):
    __tablename__ = "filter_decisions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    where: Mapped[str] = mapped_column(String(8))  # input or output
    category: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(8))
    matched: Mapped[str] = mapped_column(Text)
    score: Mapped[float] = mapped_column(Float)
    model_id: Mapped[str | None] = mapped_column(String(200))
    client: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


def database_url(target: str | Path) -> str:
    """A SQLAlchemy URL as given, or the SQLite URL of a file path (its folder is created)."""
    target = str(target)
    if "://" in target:
        return target
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    # conversations are private: the file (and SQLite's -wal/-shm files, which copy its mode) is the owner's alone
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    os.chmod(path, 0o600)
    return f"sqlite:///{path.resolve()}"


def migrate(engine, name: str) -> None:
    """Create a new database at SCHEMA_VERSION, upgrade a known older one, refuse a newer or unknown one."""
    tables = set(inspect(engine).get_table_names())
    if "conversations" not in tables:
        version = SCHEMA_VERSION
    elif "schema_version" not in tables:
        version = 1
    else:
        with engine.connect() as c:
            version = c.execute(select(SchemaVersion.version)).scalar()
    if version is None or not 1 <= version <= SCHEMA_VERSION:
        raise ChatforgeError(f"the feedback database {name} has schema version {version}, which this "
                             f"chatforge does not know (it knows 1..{SCHEMA_VERSION}): open it with the "
                             "chatforge that wrote it")
    with engine.begin() as c:
        Base.metadata.create_all(c)  # new tables only: existing ones are altered below
        if version == 1:  # answers' text came from clients: mark them unverified
            c.execute(text("ALTER TABLE messages ADD COLUMN author VARCHAR(16) NOT NULL DEFAULT 'human'"))
            c.execute(text("ALTER TABLE messages ADD COLUMN generation_id INTEGER REFERENCES generations(id)"))
            c.execute(text("UPDATE messages SET author = 'unverified' WHERE role = 'assistant'"))
        c.execute(SchemaVersion.__table__.delete())
        c.execute(SchemaVersion.__table__.insert().values(version=SCHEMA_VERSION))


def sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
    cursor.execute("PRAGMA synchronous=NORMAL")  # WAL keeps the database consistent; only a power cut loses a write
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
