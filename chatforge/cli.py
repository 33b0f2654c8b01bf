"""`chatforge <stage> [--config FILE] [--key=value ...]`.

Each stage is the module ``chatforge/stages/<stage>.py`` (hyphens become underscores): a config dataclass
``Config``, a function ``run(cfg, args) -> None`` and a module docstring whose first line is the stage's
one-line summary, which ``chatforge --help`` lists. Modules are imported only when their stage runs; the
listing reads the docstrings without importing, so ``chatforge --help`` stays instant.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

from chatforge.config import die, help_text, parse
from chatforge.errors import ChatforgeError

STAGES_DIR = Path(__file__).parent / "stages"

# The order data flows through the pipeline, as `chatforge --help` lists it; a stage module missing here is
# listed after these (tests/test_cli.py checks every stage module is listed).
ORDER = [
    "data", "tokenizer", "pretrain", "sft-data", "sft", "rankings", "reward", "ppo", "code", "fim", "edit-data",
    "edit-train", "tool-data", "safety-train", "ape", "embed", "eval-embed", "search", "generate", "chat", "edit",
    "serve", "feedback", "eval", "speedrun",
]
# stages that take positional arguments (prompts, an eval suite, a feedback command, a search query)
POSITIONAL = {"search", "generate", "chat", "edit", "feedback", "eval"}


def stage_names() -> list[str]:
    found = {p.stem.replace("_", "-") for p in STAGES_DIR.glob("*.py") if p.stem != "__init__"}
    return [name for name in ORDER if name in found] + sorted(found - set(ORDER))


def summary(stage: str) -> str:
    """The first line of the stage module's docstring, read without importing the module."""
    source = (STAGES_DIR / f"{stage.replace('-', '_')}.py").read_text(encoding="utf-8")
    return (ast.get_docstring(ast.parse(source)) or "").strip().splitlines()[0].rstrip(".")


def _usage() -> str:
    names = stage_names()
    width = max(map(len, names))
    lines = [
        "usage: chatforge <stage> [--config FILE.toml|.yaml] [--key=value ...]",
        "",
        "stages:",
        *(f"  {name.ljust(width)}  {summary(name)}" for name in names),
        "",
        "`chatforge <stage> --help` lists every option of a stage with its default.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    stage, rest = argv[0], argv[1:]
    if stage not in stage_names():
        die(f"unknown stage '{stage}'. Stages: {', '.join(stage_names())}")
    module = importlib.import_module(f"chatforge.stages.{stage.replace('-', '_')}")
    if "-h" in rest or "--help" in rest:
        print(f"usage: chatforge {stage} [--config FILE] [--key=value ...]\n\n{module.__doc__.strip()}\n\noptions:")
        print(help_text(module.Config))
        return
    try:
        cfg, positional = parse(module.Config, rest, allow_positional=stage in POSITIONAL)
        module.run(cfg, positional)
    except ChatforgeError as exc:
        die(str(exc))
    except KeyboardInterrupt:
        die("interrupted")
    from chatforge.train.distributed import finish  # here, so that --help does not wait for torch to load

    finish()


if __name__ == "__main__":
    main()
