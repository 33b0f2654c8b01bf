"""The report card: one markdown page for a run, built from the artifacts its stages left behind.

Every section is read from files on disk (manifests, summaries, metrics), never from a stage's memory, so
the card can be rebuilt at any time with ``chatforge report`` and a stage added later only needs to add
its section builder to ``SECTIONS``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from chatforge import io


@dataclass
class Section:
    title: str
    facts: dict[str, Any] = field(default_factory=dict)
    tables: list[tuple[str, list[str], list[list[Any]]]] = field(default_factory=list)  # caption, header, rows
    plots: list[Path] = field(default_factory=list)
    text: str = ""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def render(sections: list[Section], run_dir: Path, title: str) -> str:
    out = [f"# {title}", ""]
    for section in sections:
        out += [f"## {section.title}", ""]
        if section.facts:
            out += ["| | |", "| --- | --- |", *(f"| {k} | {_fmt(v)} |" for k, v in section.facts.items()), ""]
        for caption, header, rows in section.tables:
            out += [f"**{caption}**", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
            out.append("")
        for plot in section.plots:
            resolved, root = Path(plot).resolve(), run_dir.resolve()
            rel = resolved.relative_to(root) if resolved.is_relative_to(root) else plot
            out += [f"![{Path(plot).stem}]({rel})", ""]
        if section.text:
            out += [section.text.rstrip(), ""]
    return "\n".join(out)


def corpus_section(run_dir: Path) -> Section | None:
    manifest = _read_json(run_dir / "data" / "manifest.json")
    if manifest is None:
        return None
    section = Section("Corpus")
    sources = manifest.get("sources", {})
    if sources:
        counted = {name: counts for name, counts in sources.items() if isinstance(counts, dict)}
        keys = sorted({k for counts in counted.values() for k in counts if isinstance(counts[k], (int, float))})
        section.tables.append(("Documents per source", ["source", *keys],
                               [[name, *(counts.get(k, "") for k in keys)] for name, counts in counted.items()]))
    filters = manifest.get("filters", {})
    if filters:
        section.tables.append(("Cleaning: documents dropped or changed per filter", ["filter", "count"],
                               [[name, count] for name, count in filters.items()]))
    splits = manifest.get("splits", {})
    if splits:
        section.tables.append(("Splits", ["split", "documents"],
                               [[name, v.get("documents", v) if isinstance(v, dict) else v]
                                for name, v in splits.items()]))
    return section


def tokenizer_section(run_dir: Path) -> Section | None:
    report = _read_json(run_dir / "tokenizer" / "tokenizer_report.json")
    if report is None:
        return None
    return Section("Tokenizer", facts={k: v for k, v in report.items() if not isinstance(v, (dict, list))},
                   tables=[(k, ["key", "value"], [[kk, vv] for kk, vv in v.items()])
                           for k, v in report.items() if isinstance(v, dict)])


CONFIG_KEYS = ("model", "train", "stage_config", "config")  # recorded settings, not results


def figures(summary: dict) -> dict:
    """Scalar results of a summary, nested ones flattened one level ("held_out_code_loss.before")."""
    facts = {}
    for key, value in summary.items():
        if isinstance(value, dict) and key not in CONFIG_KEYS:
            facts.update({f"{key}.{k}": v for k, v in value.items() if not isinstance(v, (dict, list))})
        elif not isinstance(value, (dict, list)):
            facts[key] = value
    return facts


def training_section(title: str, stage_dir: str) -> Callable[[Path], Section | None]:
    """Sections for stages that ran on the shared training loop: summary.json plus their plots."""

    def build(run_dir: Path) -> Section | None:
        summary = _read_json(run_dir / stage_dir / "summary.json")
        if summary is None:
            return None
        return Section(title, facts=figures(summary), plots=sorted((run_dir / stage_dir).glob("*.png")))

    return build


def markdown_section(title: str, path: str) -> Callable[[Path], Section | None]:
    """A section whose body is a markdown file a stage wrote (e.g. an evaluation's tables)."""

    def build(run_dir: Path) -> Section | None:
        file = run_dir / path
        return Section(title, text=file.read_text(encoding="utf-8")) if file.is_file() else None

    return build


def samples_section(run_dir: Path) -> Section | None:
    samples = _read_json(run_dir / "samples.json")
    if not samples:
        return None
    blocks = []
    for model in dict.fromkeys(s["model"] for s in samples):
        blocks.append(f"### {model}\n")
        for s in (s for s in samples if s["model"] == model):
            blocks.append(f"**{s['prompt']}**\n\n```\n{s['completion']}\n```\n")
    return Section("Samples", text="\n".join(blocks))


def manifest_section(title: str, path: str) -> Callable[[Path], Section | None]:
    """Counts of a data stage's manifest.json: its numbers as facts, its tables of numbers as tables."""

    def build(run_dir: Path) -> Section | None:
        manifest = _read_json(run_dir / path)
        if manifest is None:
            return None
        facts = {k: v for k, v in manifest.items() if isinstance(v, (int, float, str))}
        tables = [(k, ["key", "value"], [[kk, vv] for kk, vv in v.items() if not isinstance(vv, (dict, list))])
                  for k, v in manifest.items() if isinstance(v, dict)]
        return Section(title, facts=facts, tables=[t for t in tables if t[2]])

    return build


def _quoted(text: str, limit: int = 200) -> str:
    return "`" + text[:limit].replace("`", "'").replace("\n", "⏎") + "`"


def insertion_section(run_dir: Path) -> Section | None:
    """The FIM model next to its left-to-right twin: insertion and ordinary loss (the fim stage's summaries)."""
    runs = [(label, _read_json(run_dir / folder / "summary.json")) for label, folder in
            (("FIM", "fim"), ("no FIM (twin)", "fim_baseline"))]
    runs = [(label, s) for label, s in runs if s and "insertion" in s]
    if not runs:
        return None
    header = ["model", "steps", "left-to-right val loss", "middle loss PSM", "exact match PSM", "middle loss SPM",
              "exact match SPM", "middle loss from the prefix alone"]
    rows = [[label, s.get("steps"), s.get("final_val_loss"), s["insertion"]["psm"]["middle_loss"],
             s["insertion"]["psm"]["exact_match"], s["insertion"]["spm"]["middle_loss"],
             s["insertion"]["spm"]["exact_match"], s["insertion"]["left_to_right_middle_loss"]] for label, s in runs]
    first = runs[0][1]["insertion"]
    samples = "\n".join(f"- before {_quoted(x['prefix_end'])}, after {_quoted(x['suffix_start'])}: removed "
                         f"{_quoted(x['removed'])}, written {_quoted(x['written'])}" for x in first["psm"]["samples"])
    return Section("Insert (fill-in-the-middle)", facts={"held-out spans": first["examples"], **first["kinds"]},
                   tables=[("Middle loss and exact match on held-out spans; the twin trains the same way without FIM",
                            header, rows)],
                   text=f"Sample inserts by the {runs[0][0]} model (PSM, greedy):\n\n{samples}")


def edit_section(run_dir: Path) -> Section | None:
    summary = _read_json(run_dir / "edit" / "summary.json")
    if not summary or "edits" not in summary:
        return None
    edits = summary["edits"]
    rows = [[kind, e["count"], e["exact_match"], e["cer"], e["unchanged_cer"]] for kind, e in edits.items()]
    samples = "\n".join(f"- {kind}: {_quoted(x['instruction'])} on {_quoted(x['input'], 120)} → "
                         f"{_quoted(x['written'], 120)} (reference {_quoted(x['output'], 120)})"
                         for kind, e in edits.items() for x in e["samples"][:1])
    return Section("Edit (instruction-driven rewrites)",
                   facts={"steps": summary.get("steps"), "held-out loss before": summary.get("base_val_loss"),
                          "held-out loss after": summary.get("final_val_loss")},
                   tables=[("Held-out triples per edit type "
                            "(CER: character error rate; unchanged: returning the input)",
                            ["type", "held out", "exact match", "CER", "unchanged CER"], rows)],
                   plots=sorted((run_dir / "edit").glob("*.png")), text=f"Sample edits (greedy):\n\n{samples}")


def icl_section(run_dir: Path) -> Section | None:
    folder = run_dir / "eval" / "icl"
    if not (folder / "summary.md").is_file():
        return None
    return Section("In-context learning (EM: exact match; MC: gold among candidates by log-likelihood)",
                   plots=sorted(folder.glob("*.png")), text=(folder / "summary.md").read_text(encoding="utf-8"))


def cot_section(run_dir: Path) -> Section | None:
    summary = _read_json(run_dir / "eval" / "cot" / "summary.json")
    if summary is None:
        return None
    rows = [[style, summary[style]["accuracy"], summary[style]["extracted"],
             _quoted(summary[style]["sample"]["written"])] for style in ("reasoning", "direct")]
    return Section("Chain-of-thought (multi-step arithmetic)",
                   facts={"problems": summary["items"], "shots": summary["shots"]},
                   tables=[("Few-shot with worked reasoning vs direct answers",
                            ["prompt style", "accuracy", "answers with a number", "first answer"], rows)])


def ape_section(run_dir: Path) -> Section | None:
    summary = _read_json(run_dir / "ape" / "summary.json")
    if summary is None:
        return None
    facts = {"task": summary["task"], "metric": summary["metric"],
             **{f"proposed ({mode})": n for mode, n in summary["proposed"].items()},
             "distinct candidates": summary["distinct_candidates"],
             "alive per filtering round": " → ".join(map(str, summary["alive_per_round"])),
             "Monte-Carlo new variants per round": ", ".join(map(str, summary["monte_carlo_new"])) or "none",
             "best instruction": _quoted(summary["best_instruction"]),
             "hand-written instruction": _quoted(summary["baseline_instruction"])}
    rows = [[name, score] for name, score in summary["held_out_score"].items()]
    return Section("Automatic Prompt Engineer", facts=facts,
                   tables=[(f"Held-out {summary['metric']} on {summary['held_out_examples']} examples",
                            ["instruction", summary["metric"]], rows)])


def tools_section(run_dir: Path) -> Section | None:
    summary = _read_json(run_dir / "eval" / "tools" / "summary.json")
    if summary is None:
        return None
    sample = summary["samples"][0] if summary.get("samples") else None
    text = (f"First held-out question: {_quoted(sample['question'])} (gold {sample['gold']}); direct answer "
            f"{_quoted(sample['direct'])}; calls {sample['calls']}; answer with the calculator "
            f"{_quoted(sample['with_calculator'])}") if sample else ""
    return Section("Tool use (held-out arithmetic, SFT with tool-use conversations)",
                   facts={k: summary[k] for k in ("questions", "without_tools", "with_calculator", "called_calculator",
                                                  "right_call", "oracle") if k in summary}, text=text)


def _interval(result: dict, key: str = "mean") -> str:
    return f"{result[key]:.4g} [{result['low']:.4g}, {result['high']:.4g}] on {result['prompts']} prompts"


def rlhf_section(run_dir: Path) -> Section | None:
    """PPO's training (summary, ppo.png) and `eval rlhf`'s verdict: win rates over SFT with their intervals, and
    gold and proxy reward of PPO against best-of-n from SFT at matched KL (rlhf.png)."""
    ppo, judged = _read_json(run_dir / "ppo" / "summary.json"), _read_json(run_dir / "eval" / "rlhf" / "summary.json")
    if ppo is None and judged is None:
        return None
    section = Section("RLHF (PPO against the proxy reward model; judged by a gold reward model and MiniLM)",
                      facts=figures(ppo or {}), plots=[*sorted((run_dir / "ppo").glob("*.png")),
                                                       *sorted((run_dir / "eval" / "rlhf").glob("*.png"))])
    if judged is None:
        return section
    section.facts.update({"held-out prompts": judged["prompts"], "sampling": judged["sampling"],
                          "intervals": judged["intervals"], "answer budget (tokens)": judged["max_tokens"],
                          "unfinished penalty": judged["unfinished_penalty"],
                          "gold reward, PPO − SFT (paired)": _interval(judged["gold_reward_difference"]),
                          "best-of-n gold reward at PPO's KL": judged["best_of_n_gold_at_policy_kl"],
                          "PPO − best-of-n gold reward at PPO's KL": judged["policy_minus_best_of_n_gold"]})
    policy, sft = judged["policy"], judged["sft"]
    rows = [["SFT", 0.0, sft["proxy_reward"]["mean"], sft["gold_reward"]["mean"], sft["similarity"]]]
    rows += [[f"best-of-{p['n']} from SFT", p["kl"], p["proxy_reward"], p["gold_reward"], ""]
             for p in judged["best_of_n"]]
    rows.append(["PPO", _interval(policy["kl"]), _interval(policy["proxy_reward"]), _interval(policy["gold_reward"]),
                 policy["similarity"]])
    judges = (("gold reward model", "win_rate_gold"), ("MiniLM similarity to the reference", "win_rate_minilm"),
              ("proxy reward model (the one optimised)", "win_rate_proxy"))
    section.tables += [
        ("PPO vs best-of-n from SFT on the held-out prompts (best-of-n KL = log n − (n−1)/n; PPO's measured)",
         ["policy", "KL to SFT (nats)", "proxy reward", "gold reward", "MiniLM similarity"], rows),
        ("Win rate of PPO over SFT (ties ½) with its 95 % interval",
         ["judge", "win rate", "low", "high", "prompts"],
         [[name, *(judged[key][k] for k in ("rate", "low", "high", "prompts"))] for name, key in judges]),
    ]
    return section


SECTIONS: list[Callable[[Path], Section | None]] = [
    corpus_section,
    tokenizer_section,
    training_section("Pretraining", "pretrain"),
    manifest_section("SFT data (InstructGPT-style curation)", "sft_data/manifest.json"),
    training_section("Supervised fine-tuning (held-out loss on assistant tokens: base_val_loss vs final_val_loss)",
                     "sft"),
    manifest_section("Ranking data", "rankings/manifest.json"),
    training_section("Reward model (val_accuracy = held-out pairwise accuracy)", "reward"),
    rlhf_section,
    training_section("Code model (held-out code loss before/after fine-tuning)", "code"),
    training_section("HumanEval (pass@k of the code model, sandboxed)", "eval/humaneval"),
    insertion_section,
    manifest_section("Edit data (triples built from the corpus)", "edit_data/manifest.json"),
    edit_section,
    icl_section,
    cot_section,
    ape_section,
    training_section("SFT with tool-use conversations", "tools"),
    tools_section,
    training_section("Embeddings (contrastive pre-training)", "embed"),
    markdown_section("Embeddings: held-out retrieval and linear probe vs MiniLM and the floor",
                     "embed/eval/summary.md"),
    samples_section,
]


def timing_section(timings: dict[str, float]) -> Section:
    facts = {f"{stage} (s)": seconds for stage, seconds in timings.items()}
    facts["total (min)"] = round(sum(timings.values()) / 60, 1)
    return Section("Wall time per stage", facts=facts)


def write_report(
    run_dir: str | Path, title: str = "chatforge report card", timings: dict[str, float] | None = None
) -> Path:
    run_dir = Path(run_dir)
    built = [s for build in SECTIONS if (s := build(run_dir)) is not None]
    sections = ([timing_section(timings)] if timings else []) + built
    path = run_dir / "report.md"
    io.write_text(path, render(sections, run_dir, title))
    return path
