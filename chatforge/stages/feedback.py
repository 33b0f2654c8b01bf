"""export the web page's feedback as training data: `chatforge feedback export --as sft|rankings|rewards --out FILE`.

    chatforge feedback export --as sft --out runs/serve/feedback_sft.jsonl
    chatforge sft-data --feedback runs/serve/feedback_sft.jsonl          # demonstrations → SFT
    chatforge feedback export --as rankings --out runs/serve/feedback_rankings.jsonl
    chatforge rankings --inputs runs/serve/feedback_rankings.jsonl       # rankings → reward model
    chatforge feedback export --as rewards --out runs/serve/feedback_rewards.jsonl
    chatforge reward --signals runs/serve/feedback_rewards.jsonl         # user signals → reward model

``sft`` lines are ``{"id", "messages": [...], "source": "feedback", "user_id"?, "model"}``; ``rankings``
lines are ``{"id", "prompt": [messages], "completions": [K texts], "ranking": [indices, best first],
"source": "feedback", "model"}``; ``rewards`` lines are ``{"id", "prompt": [messages], "completion": text,
"reward": [-1, 1], "signals": [...], "source": "feedback", "model", "provenance"}``, one per generated answer
that was copied, continued, regenerated or asked again (the rule from signals to a reward is
``chatforge.data.signal_rewards``'). Which answers become demonstrations is described in
``chatforge.serve.feedback``. The output is written atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chatforge.config import option
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.serve.feedback import EXPORT_FORMATS, FeedbackStore, store_target


@dataclass
class Config:
    as_: str = option("sft", "sft (demonstrations for `chatforge sft-data`), rankings (for `chatforge rankings`) "
                             "or rewards (user signals as rewards, for `chatforge reward --signals`)")
    out: str = option("", "output JSONL file (default: RUN_DIR/feedback_<as>.jsonl)")
    run_dir: str = option("runs/serve", "run directory of `chatforge serve` (holds feedback.db)")
    db: str = option("", "feedback database: a SQLAlchemy URL or a SQLite file (default: RUN_DIR/feedback.db)")
    include_implicit: bool = option(False, "sft: also answers that were copied or replied to, and never "
                                           "regenerated or asked again")

    def validate(self) -> None:
        if self.as_ not in EXPORT_FORMATS:
            raise ConfigError(f"option 'as' must be one of {', '.join(EXPORT_FORMATS)}; got {self.as_!r}")


def run(cfg: Config, args: list[str]) -> None:
    if args != ["export"]:
        raise ChatforgeError(
            "usage: chatforge feedback export --as sft|rankings|rewards [--out FILE] [--run_dir DIR | --db URL]"
        )
    target = store_target(cfg.run_dir, cfg.db)
    if "://" not in target and not Path(target).is_file():
        raise ChatforgeError(
            f"no feedback database at {target} (run `chatforge serve --run_dir=...` first, or pass --db)"
        )
    out = cfg.out or str(Path(cfg.run_dir) / f"feedback_{cfg.as_}.jsonl")
    store = FeedbackStore(target)
    try:
        written, skipped = store.export(cfg.as_, out, cfg.include_implicit)
    finally:
        store.close()
    why = {"rankings": "rankings skipped: the reward data needs 4 to 9 answers per ranking",
           "rewards": "answers with signals skipped: only answers the model generated are rewards for it"}
    note = f" ({skipped} {why[cfg.as_]})" if skipped else ""
    print(f"wrote {written} {cfg.as_} records to {out}{note}")
