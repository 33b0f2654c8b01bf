"""In-context learning: tasks done from zero, one or a few demonstrations in the prompt, no weight changed.

Every task is a list of (input, output) items built offline, split into a pool of demonstrations and the
evaluated items. A k-shot prompt is the task's description line, k demonstrations from the pool and the
item, all in one format::

    <description>

    Input: <demo input>
    Output: <demo output>

    Input: <item input>
    Output:

Two scores per task and k (as GPT-3 reports): *exact match* of the greedy continuation up to the line end,
and *multiple choice*: the gold output against three distractors (other items' outputs, or the task's fixed
label set), picked by the highest total log-likelihood; chance is 1 / number of candidates.

Built-in tasks: word -> definition and definition -> word (WordNet entries of the data stage's corpus when
present, else a built-in list), two-digit addition and subtraction, copying and reversing words, counting
letters, capitalising, and telling a snippet's kind (code / prose / Chinese). User tasks are JSONL files of
{"input", "output"} rows (optionally "candidates": the label set), one task per file, named after the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chatforge import io
from chatforge.errors import ChatforgeError
from chatforge.infer.params import SamplingParams

WORDNET_ENTRY = re.compile(r"^([a-z][a-z-]{2,14})(?:, [^(\n]*)? \((noun|verb|adj|adv)\): ([^;\n\"]{10,90})$", re.M)
BUILT_IN_WORDS = [
    ("apple", "the round fruit of a tree of the rose family"), ("river", "a large natural stream of water"),
    ("chair", "a seat for one person, with a back"), ("winter", "the coldest season of the year"),
    ("doctor", "a person who treats sick people"), ("bread", "food made of baked flour and water"),
    ("mountain", "a very high natural elevation of the earth"), ("teacher", "a person whose job is to teach"),
    ("window", "an opening in a wall that lets in light"), ("ocean", "a very large expanse of sea"),
    ("hammer", "a tool with a heavy head for driving nails"), ("clock", "a device that shows the time"),
    ("garden", "a piece of ground where plants are grown"), ("bridge", "a structure that carries a road over water"),
    ("pencil", "a thin stick of graphite in wood, used for writing"), ("horse", "a large animal ridden by people"),
]
WORDS = ["table", "garden", "pencil", "river", "window", "summer", "basket", "candle", "mirror", "rocket", "silver",
         "planet", "doctor", "butter", "forest", "island", "jacket", "kitten", "ladder", "marble", "orange", "pepper"]
# lengths 2 to 10, so counting has more than two possible answers (WORDS are all 5 or 6 letters long)
COUNTED = ["go", "up", "sun", "ink", "tree", "lamp", "apple", "river", "garden", "planet", "kitchen", "blanket",
           "elephant", "computer", "butterfly", "chocolate", "strawberry", "adventure"]
KINDS = ("code", "prose", "chinese")


@dataclass
class Task:
    name: str
    description: str
    items: list[tuple[str, str]]
    labels: list[str] = field(default_factory=list)  # a fixed candidate set (classification), else distractors


def _rng(name: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, sum(name.encode())])


def dictionary(data_dir: str | None, limit: int = 400) -> list[tuple[str, str]]:
    """(word, definition) pairs from the corpus's WordNet documents, else the built-in list."""
    pairs: dict[str, str] = {}
    for split in ("val", "test", "train"):
        path = Path(data_dir or "") / f"pretrain_{split}.jsonl"
        if not data_dir or not path.is_file():
            continue
        for _, doc in io.read_jsonl(path, "document file"):
            if doc.get("source") == "wordnet":
                for word, _, definition in WORDNET_ENTRY.findall(doc["text"]):
                    pairs.setdefault(word, definition.strip())
            if len(pairs) >= limit:
                return list(pairs.items())
    return list(pairs.items()) if len(pairs) >= 20 else list(BUILT_IN_WORDS)


def snippets(data_dir: str | None, rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """(first line of a document, its kind) from the corpus, or built-in ones."""
    found: dict[str, list[str]] = {k: [] for k in KINDS}
    path = Path(data_dir or "") / "pretrain_train.jsonl"
    if data_dir and path.is_file():
        for _, doc in io.read_jsonl(path, "document file"):
            line = next((t.strip() for t in doc["text"].splitlines() if len(t.strip()) > 20), "")[:60]
            kind = "code" if doc.get("kind") == "code" else (
                "chinese" if re.search(r"[\u4e00-\u9fff]", line) else "prose")
            if line and len(found[kind]) < count:
                found[kind].append(line)
    found["code"] += ["def area(r):", "for i in range(10):", "import os, sys", "return x + y"]
    found["prose"] += ["The weather was warm and sunny.", "She opened the door slowly."]
    found["chinese"] += ["今天天气很好。", "我喜欢学习编程。"]
    items = [(line, kind) for kind in KINDS for line in found[kind][:count]]
    return [items[i] for i in rng.permutation(len(items))]


def built_in_tasks(data_dir: str | None, size: int, seed: int) -> list[Task]:
    """The built-in suite, ``size`` items each (demonstration pool included)."""
    rng = np.random.default_rng(seed)
    words = dictionary(data_dir)
    picked = [words[i] for i in rng.permutation(len(words))[:size]]
    numbers = rng.integers(10, 100, size=(size, 2))
    ops = rng.choice(["+", "-"], size=size)
    letters = [str(rng.choice(WORDS)) for _ in range(size)]
    counted = [str(rng.choice(COUNTED)) for _ in range(size)]
    return [
        Task("define", "Give the meaning of the word.", [(w, d) for w, d in picked]),
        Task("name_the_word", "Name the word that has this meaning.", [(d, w) for w, d in picked]),
        Task("arithmetic", "Compute the result.",
             [(f"{a} {op} {b}", str(a + b if op == "+" else a - b)) for (a, b), op in zip(numbers.tolist(), ops)]),
        Task("copy", "Repeat the input exactly.", [(w, w) for w in letters]),
        Task("reverse", "Write the word backwards.", [(w, w[::-1]) for w in letters]),
        Task("count_letters", "Count the letters of the word.", [(w, str(len(w))) for w in counted]),
        Task("capitalize", "Write the words in capital letters.",
             [(f"{a} {b}", f"{a} {b}".upper()) for a, b in zip(letters, counted)]),
        Task("snippet_kind", "Say whether the text is code, prose or chinese.",
             snippets(data_dir, rng, max(size // 3, 4)), labels=list(KINDS)),
    ]


def user_task(path: str) -> Task:
    items, labels = [], []
    for number, row in io.read_jsonl(path, "ICL task file"):
        if not isinstance(row, dict) or not isinstance(row.get("input"), str) or not isinstance(row.get("output"), str):
            raise ChatforgeError(f"{path}:{number}: an ICL item needs string 'input' and 'output' fields")
        items.append((row["input"], row["output"]))
        labels = row.get("candidates") or labels
    if len(items) < 4:
        raise ChatforgeError(
            f"{path}: an ICL task needs at least 4 items (demonstrations and evaluated ones); got {len(items)}"
        )
    return Task(Path(path).stem, "", items, [str(c) for c in labels])


def demo_text(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"Input: {x}\nOutput: {y}\n\n" for x, y in pairs)


def icl_prompt(description: str, demos: list[tuple[str, str]], query: str) -> str:
    head = f"{description}\n\n" if description else ""
    return head + demo_text(demos) + f"Input: {query}\nOutput:"


def candidates(task: Task, index: int, rng: np.random.Generator, distractors: int = 3) -> list[str]:
    """The gold output first, then the label set or other items' distinct outputs."""
    gold = task.items[index][1]
    if task.labels:
        return [gold] + [label for label in task.labels if label != gold]
    others = list(dict.fromkeys(y for _, y in task.items if y != gold))
    return [gold] + [others[i] for i in rng.permutation(len(others))[:distractors]]


def score_task(engine, task: Task, shots: list[int], pool_size: int, seed: int) -> dict:
    """Exact match and multiple-choice accuracy for every k in ``shots``."""
    rng = _rng(task.name, seed)
    order = rng.permutation(len(task.items))
    pool = [task.items[i] for i in order[:pool_size]]
    evaluated = [int(i) for i in order[pool_size:]]
    if not evaluated:
        raise ChatforgeError(
            f"task {task.name}: {len(task.items)} items leave none to evaluate after {pool_size} demonstrations"
        )
    choice_sets = [candidates(task, i, rng) for i in evaluated]
    results = {"items": len(evaluated), "chance": round(float(np.mean([1 / len(c) for c in choice_sets])), 4)}
    # room for the gold answer and a little more: a longer line cannot match it, and a tiny model rarely ends
    # its line, so a fixed budget spent most of the evaluation decoding text that was already wrong
    budgets = [
        SamplingParams(
            temperature=0.0, max_tokens=len(engine.encode(" " + task.items[i][1])) + 2, stop=["\n"], truncate=True
        )
        for i in evaluated
    ]
    for k in shots:
        prompts = []
        for n, i in enumerate(evaluated):
            demos = [pool[j] for j in _rng(f"{task.name}{n}", seed).permutation(len(pool))[:k]]
            prompts.append(icl_prompt(task.description, demos, task.items[i][0]))
        written = [c.choices[0].text.strip() for c in engine.generate(prompts, budgets)]
        exact = [w == task.items[i][1].strip() for w, i in zip(written, evaluated)]
        pairs = [(p, " " + c) for p, cands in zip(prompts, choice_sets) for c in cands]
        totals = iter(sum(lps) for lps in engine.score_batch(pairs, truncate=True))
        picked = [int(np.argmax([next(totals) for _ in cands])) == 0 for cands in choice_sets]
        results[str(k)] = {
            "exact_match": round(float(np.mean(exact)), 4),
            "multiple_choice": round(float(np.mean(picked)), 4),
            "sample": {
                "input": task.items[evaluated[0]][0],
                "gold": task.items[evaluated[0]][1],
                "written": written[0],
            },
        }
    return results


def plot(results: dict, shots: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, scores in results.items():
        for ax, metric in zip(axes, ("exact_match", "multiple_choice")):
            ax.plot(shots, [scores[str(k)][metric] for k in shots], marker="o", label=name)
    for ax, title in zip(axes, ("exact match", "multiple choice (log-likelihood)")):
        ax.set_xlabel("demonstrations in the prompt (k)")
        ax.set_ylabel("accuracy")
        ax.set_title(title)
        ax.set_xticks(shots)
        ax.set_ylim(
            -0.02, 1.02
        )  # an all-zero exact-match panel otherwise gets a symmetric axis with negative accuracies
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def markdown(results: dict, shots: list[int]) -> str:
    header = "| task | items | chance (MC) | " + " | ".join(f"EM {k}-shot | MC {k}-shot" for k in shots) + " |"
    rows = [header, "|" + " --- |" * (3 + 2 * len(shots))]
    for name, s in results.items():
        cells = " | ".join(f"{s[str(k)]['exact_match']:.1%} | {s[str(k)]['multiple_choice']:.1%}" for k in shots)
        rows.append(f"| {name} | {s['items']} | {s['chance']:.1%} | {cells} |")
    return "\n".join(rows) + "\n"


def run_suite(engine, tasks: list[Task], shots: list[int], pool_size: int, seed: int, out: Path) -> dict:
    results = {}
    for task in tasks:
        results[task.name] = score_task(engine, task, shots, pool_size, seed)
        print(
            f"[icl] {task.name:>14}: "
            + "  ".join(
                f"{k}-shot EM {results[task.name][str(k)]['exact_match']:.0%} MC "
                f"{results[task.name][str(k)]['multiple_choice']:.0%}"
                for k in shots
            )
            + f"  (chance {results[task.name]['chance']:.0%})",
            flush=True,
        )
    io.write_json(out / "summary.json", {"task": "icl", "shots": shots, "results": results})
    io.write_text(out / "summary.md", markdown(results, shots))
    plot(results, shots, out / "icl.png")
    return results
