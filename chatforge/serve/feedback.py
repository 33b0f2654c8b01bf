"""The feedback store: what people do with the model, kept so it can become training data.

SQLAlchemy over SQLite by default (a file under the run directory, in WAL mode so the web page's writes do
not block readers), or any database URL (``postgresql+psycopg://user:pass@host/db``).

Tables (every row has a timestamp; every row about a model answer records the model id):

* ``conversations`` — id, owner (the API key's client id, "" without keys), title, model id.
* ``messages`` — a tree: each message has a ``parent_id`` (None for the first), so regenerating an answer
  or editing-and-resubmitting a question adds a sibling instead of overwriting history. The K answers of a
  compare-mode turn share a ``compare_group`` (with ``compare_index`` 0..K-1). ``author`` says who wrote
  it: ``model`` (an answer this server generated: it references its ``generations`` row), ``human`` (a
  question, or an answer a person wrote), or ``unverified`` (answers stored before version 2, when clients
  sent answers' text themselves).
* ``generations`` — every chat answer the server sent (by completion id and choice index), as the client
  was shown it, with the client id, the model and a digest of the messages it answered. An answer is
  stored in a conversation only by reference to one of these, under a path whose messages have that digest,
  so nobody can make the store say the model wrote something it did not, or wrote it to another question.
* ``schema_version`` — the database's schema version: an older known one is upgraded when opened, a newer
  or unknown one is refused with a clear error.
* ``ratings`` — thumbs up (+1) / down (-1) / cleared (0) of an answer; the latest counts.
* ``rankings`` — a compare-mode ranking: the K answers' ids and texts, and their order best to worst.
* ``edits`` — a person's rewrite of an answer (before, after): a human-corrected demonstration.
* ``filter_decisions`` — every content-filter decision on a prompt or an answer (where: input or output;
  category, action, what matched, score, model id).
* ``signals`` — implicit feedback on an answer: ``copied``, ``regenerated`` (another answer to the same
  question was asked for), ``continued`` (the person replied to it), ``asked_again`` (the person
  re-asked the question that led to it). The last three are recorded by the store itself when messages
  are added, whatever client adds them; ``copied`` is reported by the client.

Exports (``chatforge feedback export --as sft|rankings|rewards --out FILE``), JSON lines:

* ``sft`` — ``{"id", "messages": [{"role", "content"}, ...], "source": "feedback", "user_id"?, "model",
  "provenance"}``, where provenance is ``model-generated`` (every answer as the model wrote it),
  ``human-edited`` (a person edited an answer on the path), ``human-written`` (a person wrote one) or
  ``unverified`` (an answer from before version 2),
  the format ``chatforge sft-data --feedback FILE`` reads. One line per demonstration: the path from the
  first message to an answer that was rated up, edited by a person, or ranked best (with
  ``include_implicit``, also answers copied or replied to and never regenerated or re-asked). Every answer
  on the path appears with its edited text, if edited; a path through an answer rated down and not fixed
  by an edit is left out, as is a path contained in a longer exported one (SFT learns every assistant turn
  of a conversation, so the longer one already teaches it).
* ``rankings`` — ``{"id", "prompt": [messages up to the question], "completions": [K answer texts],
  "ranking": [indices of completions, best first], "source": "feedback", "model"}``, the format of
  ``chatforge rankings --inputs FILE`` and so of the reward model. ``completions`` are the answers as the
  model wrote them (edits are demonstrations, not samples), so ``provenance`` is always ``model-generated``
  (only generated answers can be ranked). Rankings of fewer than 4 or more than 9
  answers are skipped (and counted), since the reward data needs 4 ≤ K ≤ 9.
* ``rewards`` — ``{"id" (the answer's), "prompt": [messages up to the question], "completion": the answer as the
  model wrote it, "reward": in [-1, 1], "signals": [kinds], "source": "feedback", "model", "provenance"}``, one
  line per generated answer with implicit signals, the format of ``chatforge reward --signals FILE``. The rule
  from signals to a reward, and why, is ``chatforge.data.signal_rewards.signal_reward``'s. As with rankings,
  only answers the model generated are rewards for it (``provenance`` is ``model-generated``); signals on
  answers a person wrote, or from before version 2, are skipped (and counted).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import create_engine, event, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from chatforge import io
from chatforge.chat_template import ROLE_TOKENS
from chatforge.data.rankings import MAX_K, MIN_K
from chatforge.data.signal_rewards import SIGNALS, signal_reward
from chatforge.errors import ChatforgeError
from chatforge.serve.feedback_tables import (
    AUTHORS,
    Conversation,
    Edit,
    FilterDecision,
    Generation,
    Message,
    Ranking,
    Rating,
    Signal,
    database_url,
    migrate,
    now,
    sqlite_pragmas,
)

EXPORT_FORMATS = ("sft", "rankings", "rewards")
DB_FILE = "feedback.db"


class NotFound(ChatforgeError):
    """A conversation or message that does not exist (or belongs to someone else)."""


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive datetimes; they were stored as UTC
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat()


class FeedbackStore:
    """The tables above, behind methods that check what they are given (errors are ChatforgeError)."""

    def __init__(self, target: str | Path):
        self.url = database_url(target)
        try:
            sqlite = self.url.startswith("sqlite")
            self.engine = create_engine(self.url, connect_args={"check_same_thread": False} if sqlite else {},
                                        pool_pre_ping=not sqlite)
            if sqlite:
                event.listen(self.engine, "connect", sqlite_pragmas)
            migrate(self.engine, self._safe_url())
        except (SQLAlchemyError, ImportError) as exc:
            raise ChatforgeError(f"cannot open the feedback database {self._safe_url()}: {exc}") from None

    def _safe_url(self) -> str:
        from sqlalchemy.engine import make_url

        try:
            return make_url(self.url).render_as_string(hide_password=True)
        except Exception:  # an unparsable URL: say it as given, it holds no parsed password
            return self.url

    def close(self) -> None:
        self.engine.dispose()

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # ---- conversations -------------------------------------------------------------------------------------

    def create_conversation(self, model_id: str, user_id: str = "", title: str = "") -> dict:
        with self.session() as s, s.begin():
            conv = Conversation(model_id=model_id, user_id=user_id, title=title)
            s.add(conv)
        return self._conversation_summary(conv)

    def list_conversations(self, user_id: str = "") -> list[dict]:
        with self.session() as s:
            rows = s.scalars(select(Conversation).where(Conversation.user_id == user_id)
                             .order_by(Conversation.updated_at.desc()))
            return [self._conversation_summary(c) for c in rows]

    def _conversation_summary(self, conv: Conversation) -> dict:
        return {"id": conv.id, "title": conv.title, "model": conv.model_id, "created_at": _iso(conv.created_at),
                "updated_at": _iso(conv.updated_at)}

    def _conversation(self, s: Session, conversation_id: str, user_id: str) -> Conversation:
        conv = s.get(Conversation, conversation_id)
        if conv is None or conv.user_id != user_id:
            raise NotFound(f"no conversation {conversation_id!r}")
        return conv

    def get_conversation(self, conversation_id: str, user_id: str = "") -> dict:
        """The conversation with every message (creation order), each with its latest rating, edits and
        signals, and the rankings made in it."""
        with self.session() as s:
            conv = self._conversation(s, conversation_id, user_id)
            messages = [self._message_json(m) for m in conv.messages]
            rankings = [{"id": r.id, "parent_id": r.parent_id, "message_ids": r.message_ids, "ranking": r.ranking,
                         "created_at": _iso(r.created_at)} for r in conv.rankings]
            return {**self._conversation_summary(conv), "messages": messages, "rankings": rankings}

    def rename_conversation(self, conversation_id: str, title: str, user_id: str = "") -> dict:
        with self.session() as s, s.begin():
            conv = self._conversation(s, conversation_id, user_id)
            conv.title = title
            conv.updated_at = now()
        return self._conversation_summary(conv)

    def delete_conversation(self, conversation_id: str, user_id: str = "") -> None:
        with self.session() as s, s.begin():
            s.delete(self._conversation(s, conversation_id, user_id))

    # ---- messages ------------------------------------------------------------------------------------------

    @staticmethod
    def _message_json(m: Message) -> dict:
        return {"id": m.id, "parent_id": m.parent_id, "role": m.role, "content": m.content, "model": m.model_id,
                "finish_reason": m.finish_reason, "compare_group": m.compare_group, "compare_index": m.compare_index,
                "created_at": _iso(m.created_at), "rating": m.ratings[-1].value if m.ratings else 0,
                "author": m.author, "edited": bool(m.edits), "signals": sorted({x.kind for x in m.signals})}

    def _message(self, s: Session, message_id: str, user_id: str) -> Message:
        m = s.scalar(select(Message).where(Message.id == message_id))
        if m is None or m.conversation.user_id != user_id:
            raise NotFound(f"no message {message_id!r}")
        return m

    def add_message(self, conversation_id: str, role: str, content: str, parent_id: str | None = None,
                    model_id: str | None = None, finish_reason: str | None = None, compare_group: str | None = None,
                    compare_index: int | None = None, user_id: str = "", author: str | None = None,
                    generation_id: int | None = None) -> dict:
        """Append a message under ``parent_id`` and record the implicit signals it implies: a question
        replying to an answer ``continued`` it; a second question under the same parent means the earlier
        question was ``asked_again`` (signal on its latest answer); a second answer outside a compare group
        means the previous one was ``regenerated``."""
        if role not in ROLE_TOKENS:
            raise ChatforgeError(f"role must be one of {', '.join(ROLE_TOKENS)}; got {role!r}")
        if not isinstance(content, str):
            raise ChatforgeError("content must be a string")
        author = author or ("model" if role == "assistant" else "human")
        if author not in AUTHORS or (author != "human" and role != "assistant"):
            raise ChatforgeError(f"author must be one of {', '.join(AUTHORS)} (only answers have a model author); "
                                 f"got {author!r}")
        with self.session() as s, s.begin():
            conv = self._conversation(s, conversation_id, user_id)
            parent = None
            if parent_id is not None:
                parent = self._message(s, parent_id, user_id)
                if parent.conversation_id != conv.id:
                    raise ChatforgeError(f"message {parent_id!r} is in another conversation")
            siblings = [m for m in conv.messages if m.parent_id == parent_id and m.role == role]
            model = model_id if role == "assistant" else None
            message = Message(conversation_id=conv.id, parent_id=parent_id, role=role, content=content,
                              model_id=model, finish_reason=finish_reason, compare_group=compare_group,
                              compare_index=compare_index, author=author, generation_id=generation_id)
            s.add(message)
            if role == "user" and parent is not None and parent.role == "assistant":
                s.add(Signal(message_id=parent.id, kind="continued", model_id=parent.model_id))
            if role == "user" and siblings:
                answers = [m for m in conv.messages if m.parent_id == siblings[-1].id and m.role == "assistant"]
                if answers:
                    s.add(Signal(message_id=answers[-1].id, kind="asked_again", model_id=answers[-1].model_id))
            if role == "assistant" and compare_group is None and siblings:
                s.add(Signal(message_id=siblings[-1].id, kind="regenerated", model_id=siblings[-1].model_id))
            if not conv.title and role == "user":
                conv.title = content.strip().splitlines()[0][:80] if content.strip() else ""
            conv.updated_at = now()
            s.flush()
            return self._message_json(message)

    def record_generation(self, completion_id: str, user_id: str, model_id: str, prompt_digest: str,
                          choices: list[tuple[int, str, str]]) -> None:
        """Keep a chat completion's answers ((index, text as shown, finish reason)) for later reference."""
        with self.session() as s, s.begin():
            s.add_all(Generation(completion_id=completion_id, choice_index=i, user_id=user_id, model_id=model_id,
                                 prompt_digest=prompt_digest, text=t, finish_reason=f) for i, t, f in choices)

    def add_generated_answer(self, conversation_id: str, completion_id: str, choice_index: int, parent_id: str,
                             path_digest, compare_group: str | None = None, compare_index: int | None = None,
                             user_id: str = "") -> dict:
        """Store answer ``choice_index`` of chat completion ``completion_id`` (which ``user_id`` was sent, to
        the messages that end at ``parent_id``) under ``parent_id``: its text, model and finish reason are
        the server's record. ``path_digest(messages)`` digests [(role, content)] the way the server did."""
        with self.session() as s:
            generation = s.scalar(select(Generation).where(Generation.completion_id == completion_id,
                                                           Generation.choice_index == choice_index))
            if generation is None or generation.user_id != user_id:
                raise NotFound(f"no answer {choice_index} of completion {completion_id!r} was sent to you")
            if s.scalar(select(Message.id).where(Message.generation_id == generation.id)) is not None:
                raise ChatforgeError(f"answer {choice_index} of completion {completion_id!r} is already stored")
            parent = self._message(s, parent_id, user_id)
            by_id = {m.id: m for m in parent.conversation.messages}
            if generation.prompt_digest != path_digest([(m.role, m.content) for m in _path(parent, by_id)]):
                raise ChatforgeError(f"completion {completion_id!r} answered other messages than the ones ending at "
                                     f"{parent_id!r}")
        return self.add_message(conversation_id, "assistant", generation.text, parent_id, generation.model_id,
                                generation.finish_reason, compare_group, compare_index, user_id, "model",
                                generation.id)

    def edit_message(self, message_id: str, content: str, user_id: str = "") -> dict:
        """A person's rewrite of an answer: the message shows the new text; the edit keeps both."""
        with self.session() as s, s.begin():
            m = self._message(s, message_id, user_id)
            if m.role != "assistant":
                raise ChatforgeError("only answers are edited in place; to change a question, send it again "
                                     "(add a sibling message)")
            if content != m.content:
                s.add(Edit(message_id=m.id, before=m.content, after=content, model_id=m.model_id))
                m.content = content
                m.conversation.updated_at = now()
            s.flush()
            s.refresh(m)
            return self._message_json(m)

    def rate(self, message_id: str, value: int, user_id: str = "") -> dict:
        if value not in (-1, 0, 1):
            raise ChatforgeError(f"a rating is 1 (up), -1 (down) or 0 (cleared); got {value!r}")
        with self.session() as s, s.begin():
            m = self._message(s, message_id, user_id)
            if m.role != "assistant":
                raise ChatforgeError("only answers can be rated")
            s.add(Rating(message_id=m.id, value=value, model_id=m.model_id))
            s.flush()
            s.refresh(m)
            return self._message_json(m)

    def add_signal(self, message_id: str, kind: str, user_id: str = "") -> None:
        if kind not in SIGNALS:
            raise ChatforgeError(f"signal must be one of {', '.join(SIGNALS)}; got {kind!r}")
        with self.session() as s, s.begin():
            m = self._message(s, message_id, user_id)
            s.add(Signal(message_id=m.id, kind=kind, model_id=m.model_id))

    def add_ranking(self, message_ids: list[str], ranking: list[int], user_id: str = "") -> dict:
        """Rank sibling answers: ``ranking`` lists indices into ``message_ids``, best first, each once."""
        if not isinstance(message_ids, list) or len(message_ids) < 2 or len(set(message_ids)) != len(message_ids):
            raise ChatforgeError("a ranking needs at least two distinct answers")
        if sorted(ranking) != list(range(len(message_ids))):
            raise ChatforgeError(f"ranking must order all {len(message_ids)} answers, each index once, best first; "
                                 f"got {ranking}")
        with self.session() as s, s.begin():
            messages = [self._message(s, i, user_id) for i in message_ids]
            parents = {m.parent_id for m in messages}
            if any(m.role != "assistant" for m in messages) or len(parents) != 1 or None in parents:
                raise ChatforgeError("ranked messages must be answers to the same question")
            if any(m.author != "model" for m in messages):
                raise ChatforgeError("only answers the model generated can be ranked (a ranking trains the reward "
                                     "model on the model's own samples)")
            row = Ranking(conversation_id=messages[0].conversation_id, parent_id=messages[0].parent_id,
                          message_ids=list(message_ids), completions=[_as_written(m) for m in messages],
                          ranking=list(ranking), model_id=messages[0].model_id)
            s.add(row)
            messages[0].conversation.updated_at = now()
        return {"id": row.id, "message_ids": row.message_ids, "ranking": row.ranking, "created_at": _iso(row.created_at)}

    # ---- exports -------------------------------------------------------------------------------------------

    def log_filter_decisions(self, where: str, decisions: list[dict], model_id: str = "", client: str = "") -> None:
        """Record content-filter decisions ({category, action, matched, score}) on an input or an output."""
        with self.session() as s, s.begin():
            s.add_all(FilterDecision(where=where, model_id=model_id, client=client, **d) for d in decisions)

    def filter_decisions(self) -> list[dict]:
        with self.session() as s:
            rows = s.scalars(select(FilterDecision).order_by(FilterDecision.id)).all()
            return [{"where": r.where, "category": r.category, "action": r.action, "matched": r.matched,
                     "score": r.score, "model_id": r.model_id, "client": r.client, "created_at": _iso(r.created_at)}
                    for r in rows]

    def sft_records(self, include_implicit: bool = False) -> list[dict]:
        """Demonstrations in ``chatforge sft-data``'s input format (see the module docstring for the rules)."""
        with self.session() as s:
            records = []
            for conv in s.scalars(_in_stored_order(select(Conversation))):
                by_id = {m.id: m for m in conv.messages}
                best = {r.message_ids[r.ranking[0]] for r in conv.rankings}
                chosen = [m for m in conv.messages if m.role == "assistant" and _is_demonstration(m, best, include_implicit)]
                paths = {}
                for m in chosen:
                    path = _path(m, by_id)
                    if not any(a.role == "assistant" and _rated_down(a) and not a.edits for a in path):
                        paths[m.id] = path
                on_path = {end: {m.id for m in path} for end, path in paths.items()}
                for message_id, path in paths.items():
                    if any(message_id in ids for end, ids in on_path.items() if end != message_id):
                        continue  # a longer exported path already contains this one
                    record = {"id": message_id, "messages": [{"role": m.role, "content": m.content} for m in path],
                              "source": "feedback", "model": by_id[message_id].model_id,
                              "provenance": _provenance([m for m in path if m.role == "assistant"])}
                    if conv.user_id:
                        record["user_id"] = conv.user_id
                    records.append(record)
            return records

    def ranking_records(self) -> tuple[list[dict], int]:
        """(ranking records in the reward data's format, how many rankings were skipped for their size)."""
        records, skipped = [], 0
        with self.session() as s:
            for r in s.scalars(select(Ranking).order_by(Ranking.created_at, Ranking.id)):
                if not MIN_K <= len(r.completions) <= MAX_K:
                    skipped += 1
                    continue
                conv = s.get(Conversation, r.conversation_id)
                by_id = {m.id: m for m in conv.messages}
                prompt = [{"role": m.role, "content": m.content} for m in _path(by_id[r.parent_id], by_id)]
                records.append({"id": r.id, "prompt": prompt, "completions": list(r.completions),
                                "ranking": list(r.ranking), "source": "feedback", "model": r.model_id,
                                "provenance": "model-generated"})
        return records, skipped

    def reward_records(self) -> tuple[list[dict], int]:
        """(reward records of generated answers with signals, how many answers with signals were not generated)."""
        records, skipped = [], 0
        with self.session() as s:
            for conv in s.scalars(_in_stored_order(select(Conversation))):
                by_id = {m.id: m for m in conv.messages}
                for m in conv.messages:
                    if m.role != "assistant" or not m.signals:
                        continue
                    if m.author != "model":
                        skipped += 1
                        continue
                    kinds = sorted({x.kind for x in m.signals})
                    prompt = [{"role": p.role, "content": p.content} for p in _path(by_id[m.parent_id], by_id)]
                    records.append({"id": m.id, "prompt": prompt, "completion": _as_written(m),
                                    "reward": signal_reward(kinds), "signals": kinds, "source": "feedback",
                                    "model": m.model_id, "provenance": "model-generated"})
        return records, skipped

    def export(self, kind: str, path: str | Path, include_implicit: bool = False) -> tuple[int, int]:
        """Write ``kind`` (sft, rankings or rewards) to ``path`` atomically; returns (rows written, rows skipped:
        rankings of the wrong size, or signals on answers the model did not generate)."""
        if kind == "sft":
            return io.write_jsonl(path, self.sft_records(include_implicit)), 0
        if kind in ("rankings", "rewards"):
            records, skipped = self.ranking_records() if kind == "rankings" else self.reward_records()
            return io.write_jsonl(path, records), skipped
        raise ChatforgeError(f"export format must be one of {', '.join(EXPORT_FORMATS)}; got {kind!r}")


def _as_written(m: Message) -> str:
    """An answer's text as the model wrote it, before any edit."""
    return m.edits[0].before if m.edits else m.content


def _provenance(answers: list[Message]) -> str:
    """Who wrote the answers of an exported dialogue: the weakest claim of any of them."""
    if any(m.author == "unverified" for m in answers):
        return "unverified"
    if any(m.author == "human" for m in answers):
        return "human-written"
    return "human-edited" if any(m.edits for m in answers) else "model-generated"


def _rated_down(m: Message) -> bool:
    return bool(m.ratings) and m.ratings[-1].value < 0


def _is_demonstration(m: Message, ranked_best: set[str], include_implicit: bool) -> bool:
    if m.edits:
        return True  # a person wrote (fixed) this answer
    if _rated_down(m):
        return False
    if (m.ratings and m.ratings[-1].value > 0) or m.id in ranked_best:
        return True
    kinds = {x.kind for x in m.signals}
    return include_implicit and bool(kinds & {"copied", "continued"}) and not kinds & {"regenerated", "asked_again"}


def _in_stored_order(query):
    """Conversations in the order they were started: by created_at, then, for the ones started within one clock
    tick (a fast loop, a coarse clock), by the seq of their first message, so an export's order never rests on
    the database's whim (the order of exported rewards is the order the reward model learns them in)."""
    first_seq = select(func.min(Message.seq)).where(Message.conversation_id == Conversation.id).scalar_subquery()
    return query.order_by(Conversation.created_at, first_seq, Conversation.id)


def _path(message: Message, by_id: dict[str, Message]) -> list[Message]:
    """The messages from the conversation's start down to ``message``."""
    path = [message]
    while path[-1].parent_id is not None:
        path.append(by_id[path[-1].parent_id])
    return path[::-1]


def store_target(run_dir: str, db: str) -> str:
    """The database a serve run uses: ``db`` (a URL or a file) if set, else ``RUN_DIR/feedback.db``."""
    return db or str(Path(run_dir) / DB_FILE)
