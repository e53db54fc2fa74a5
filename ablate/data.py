"""Prompt sets: built-in sets, local files, Hugging Face datasets and a registry of public benchmarks.

A set is named by a string:
- `refusal:test`, `harmless:train`, `borderline:val`, `refusal` (all splits) — the built-in sets in
  `ablate/data/`, written by us: requests only, everyday misuse; splits are by topic, so the test
  split holds topics (and phrasings) unseen in train; `harmless_forms:train` (train only) holds benign
  requests in the written forms the refusal train split uses (posts, messages, letters, reviews…);
  `refusal_kinds` holds refusal-eliciting requests of kinds and forms the ten categories of `refusal` lack
  (named private people's data, illegal trade, drugs, dangerous self-treatment, stereotypes as questions, and
  the ten categories asked as questions); `harmless_kinds` their benign look-alikes;
- `A+B` — the union of sets A and B, in that order (e.g. `harmless:train+harmless_forms:train`);
- `A[category=c]`, `A[category!=c]` — the prompts of A in category c, or in every other category (several
  categories: `c1,c2`); e.g. `refusal:train[category!=privacy_invasion]`, for leave-one-category-out;
- a file path: `.jsonl`, `.json`, `.csv` or `.txt` (one prompt per line), with a column mapping;
- a registry name (`advbench`, `harmbench`, `jailbreakbench`, `jailbreakbench-benign`,
  `strongreject`, `xstest`, `xstest-unsafe`, `alpaca`), loaded by hub id through `datasets`;
- `hf:<dataset id>` with a column mapping.

Every set carries ids, categories, its source and a content fingerprint, so a run records exactly
which prompts it saw. Run `ablate data` to list what is available.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from ablate import AblateError

BUILTIN_SETS = ("refusal", "harmless", "borderline", "harmless_forms", "refusal_kinds", "harmless_kinds")
SPLITS = ("train", "val", "test")
CATEGORY_FILTER = re.compile(r"^(?P<base>.+)\[category(?P<op>!?=)(?P<names>[^\[\]]+)\]$")


@dataclass(frozen=True)
class PromptSet:
    """Prompts with stable ids, a category each, where they came from, and optional responses."""

    name: str
    ids: list[str]
    prompts: list[str]
    categories: list[str]
    source: str
    responses: list[str] | None = None
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if not (len(self.ids) == len(self.prompts) == len(self.categories)):
            raise ValueError("ids, prompts and categories must have the same length")
        if self.responses is not None and len(self.responses) != len(self.prompts):
            raise ValueError("responses must match prompts in length")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) over ids, prompts and responses: equal sets, equal fingerprints."""
        digest = hashlib.sha256()
        for index, (item_id, prompt) in enumerate(zip(self.ids, self.prompts)):
            digest.update(item_id.encode() + b"\x00" + prompt.encode() + b"\x00")
            if self.responses is not None:
                digest.update(self.responses[index].encode() + b"\x00")
            digest.update(b"\x01")
        return digest.hexdigest()[:16]

    def take(self, indices: list[int], name: str | None = None) -> "PromptSet":
        return replace(
            self,
            name=name or self.name,
            ids=[self.ids[i] for i in indices],
            prompts=[self.prompts[i] for i in indices],
            categories=[self.categories[i] for i in indices],
            responses=[self.responses[i] for i in indices] if self.responses is not None else None,
        )

    def head(self, n: int | None) -> "PromptSet":
        """The first n prompts (all when n is None)."""
        if n is None or n >= len(self):
            return self
        return self.take(list(range(n)), name=f"{self.name}[:{n}]")

    def sample(self, n: int | None, seed: int = 0) -> "PromptSet":
        """n prompts drawn without replacement by a seeded shuffle, kept in their original order."""
        if n is None or n >= len(self):
            return self
        indices = sorted(random.Random(seed).sample(range(len(self)), n))
        return self.take(indices, name=f"{self.name}[{n}@{seed}]")

    def most_similar(self, n: int | None, anchors: list[str]) -> "PromptSet":
        """The n prompts most like any anchor (TF-IDF cosine of words, best anchor), kept in their original order.

        Hardening uses it to pick *hard negatives*: harmless requests that read like the refusal-eliciting
        ones ("write a letter to my pen pal" beside "write a letter threatening my neighbour"), the prompts
        that over-refusal hits first.
        """
        if n is None or n >= len(self):
            return self
        scores = max_tfidf_cosine(self.prompts, anchors)
        ranked = sorted(range(len(self)), key=lambda i: (-scores[i], i))
        return self.take(sorted(ranked[:n]), name=f"{self.name}[{n}~similar]")

    def describe(self) -> dict:
        counts: dict[str, int] = {}
        for category in self.categories:
            counts[category] = counts.get(category, 0) + 1
        return {"name": self.name, "n": len(self), "source": self.source, "fingerprint": self.fingerprint, "categories": counts}


# --------------------------------------------------------------------------------------------
# Built-in sets
# --------------------------------------------------------------------------------------------


def builtin_rows(name: str) -> list[dict]:
    """Rows of a built-in set: id, prompt, category, topic, split."""
    if name not in BUILTIN_SETS:
        raise AblateError(f"unknown built-in set '{name}'; expected one of {', '.join(BUILTIN_SETS)}")
    text = resources.files("ablate").joinpath("data", f"{name}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def builtin_splits(name: str) -> list[str]:
    """The splits a built-in set holds, in SPLITS order (harmless_forms: train only)."""
    return sorted({row["split"] for row in builtin_rows(name)}, key=SPLITS.index)


def load_builtin(name: str, split: str | None = None) -> PromptSet:
    if split is not None and split not in SPLITS:
        raise AblateError(f"prompt set '{name}:{split}': unknown split '{split}'; expected one of {', '.join(SPLITS)}")
    rows = [row for row in builtin_rows(name) if split is None or row["split"] == split]
    label = f"{name}:{split}" if split else name
    if not rows:
        raise AblateError(f"prompt set '{label}' is empty: built-in set '{name}' has the splits {', '.join(builtin_splits(name))}")
    return PromptSet(
        name=label,
        ids=[row["id"] for row in rows],
        prompts=[row["prompt"] for row in rows],
        categories=[row["category"] for row in rows],
        source=f"ablate built-in ({label})",
    )


def read_package_text(name: str) -> str:
    """A text file shipped in ablate/data (e.g. refusals.txt)."""
    return resources.files("ablate").joinpath("data", name).read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Public benchmarks, loaded by name (their text is never copied into this repository)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    hub_id: str
    split: str
    prompt_column: str
    category_column: str | None = None
    config: str | None = None
    input_column: str | None = None  # appended to the prompt (Alpaca's "input")
    response_column: str | None = None  # the answer column, for fine-tuning on the set (Alpaca's "output")
    filter_column: str | None = None  # keep rows where this column equals filter_value
    filter_value: str | None = None
    kind: str = "refusal"  # refusal-eliciting, harmless or borderline
    description: str = ""


REGISTRY: dict[str, Benchmark] = {
    "advbench": Benchmark("walledai/AdvBench", "train", "prompt", description="AdvBench harmful behaviours (Zou et al. 2023), 520 requests"),
    "harmbench": Benchmark("walledai/HarmBench", "train", "prompt", "category", config="standard", description="HarmBench standard behaviours (Mazeika et al. 2024)"),
    "jailbreakbench": Benchmark("JailbreakBench/JBB-Behaviors", "harmful", "Goal", "Category", config="behaviors", description="JailbreakBench harmful behaviours (Chao et al. 2024), 100 requests"),
    "jailbreakbench-benign": Benchmark("JailbreakBench/JBB-Behaviors", "benign", "Goal", "Category", config="behaviors", kind="borderline", description="JailbreakBench benign twins of the harmful behaviours"),
    "strongreject": Benchmark("walledai/StrongREJECT", "train", "prompt", "category", description="StrongREJECT forbidden prompts (Souly et al. 2024)"),
    "xstest": Benchmark("walledai/XSTest", "test", "prompt", "type", filter_column="label", filter_value="safe", kind="borderline", description="XSTest safe prompts that look unsafe (Röttger et al. 2024)"),
    "xstest-unsafe": Benchmark("walledai/XSTest", "test", "prompt", "type", filter_column="label", filter_value="unsafe", description="XSTest unsafe contrast prompts"),
    "alpaca": Benchmark("tatsu-lab/alpaca", "train", "instruction", input_column="input", filter_column="input", filter_value="", response_column="output", kind="harmless", description="Alpaca instructions without an input field (as in Arditi et al. 2024)"),
}


def rows_to_prompt_set(
    rows: list[dict],
    *,
    name: str,
    source: str,
    prompt_column: str = "prompt",
    id_column: str | None = None,
    category_column: str | None = None,
    response_column: str | None = None,
    input_column: str | None = None,
) -> PromptSet:
    """Map rows (dicts) to a PromptSet; a missing column is an error naming it and the columns seen."""
    if not rows:
        raise AblateError(f"{source}: no rows")
    columns = list(rows[0].keys())
    for label, column in (("prompt", prompt_column), ("id", id_column), ("category", category_column),
                          ("response", response_column), ("input", input_column)):
        if column is not None and column not in rows[0]:
            raise AblateError(f"{source}: no {label} column '{column}' (columns: {', '.join(map(str, columns))})")
    prompts = []
    for index, row in enumerate(rows):
        prompt = row[prompt_column]
        if not isinstance(prompt, str) or not prompt.strip():
            raise AblateError(f"{source}: row {index + 1}: column '{prompt_column}' is empty or not text")
        if input_column and row.get(input_column):
            prompt = f"{prompt}\n\n{row[input_column]}"
        prompts.append(prompt)
    ids = [str(row[id_column]) for row in rows] if id_column else [f"{name}-{i:05d}" for i in range(len(rows))]
    if len(set(ids)) != len(ids):
        raise AblateError(f"{source}: id column '{id_column}' has duplicate values")
    categories = [str(row.get(category_column) or "") for row in rows] if category_column else [""] * len(rows)
    responses = [str(row[response_column]) for row in rows] if response_column else None
    return PromptSet(name=name, ids=ids, prompts=prompts, categories=categories, source=source, responses=responses)


def read_rows(path: Path) -> list[dict]:
    """Rows from a .jsonl, .json (a list, or {'data': [...]}), .csv or .txt file."""
    if not path.is_file():
        raise AblateError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise AblateError(f"{path}: line {number}: invalid JSON ({error.msg})") from None
            return rows
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                lists = [value for value in data.values() if isinstance(value, list)]
                if len(lists) != 1:
                    raise AblateError(f"{path}: expected a JSON list of rows, or an object with one list of rows")
                data = lists[0]
            if not isinstance(data, list):
                raise AblateError(f"{path}: expected a JSON list of rows")
            return [row if isinstance(row, dict) else {"prompt": row} for row in data]
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as handle:
                return list(csv.DictReader(handle))
        if suffix == ".txt":
            return [{"prompt": line.strip()} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise AblateError(f"{path}: invalid JSON ({error.msg}, line {error.lineno})") from None
    except UnicodeDecodeError as error:
        raise AblateError(f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start})") from None
    raise AblateError(f"{path}: unsupported file type '{suffix}'; expected .jsonl, .json, .csv or .txt")


def load_file(path: str | Path, **columns) -> PromptSet:
    path = Path(path)
    return rows_to_prompt_set(read_rows(path), name=path.stem, source=str(path), **columns)


def load_hub(
    hub_id: str,
    *,
    split: str = "train",
    config: str | None = None,
    name: str | None = None,
    filter_column: str | None = None,
    filter_value: str | None = None,
    **columns,
) -> PromptSet:
    """Load a Hugging Face dataset by id (needs the hub or its local cache)."""
    import datasets

    try:
        dataset = datasets.load_dataset(hub_id, config, split=split)
    except Exception as error:  # datasets raises many types for unreachable or unknown ids
        raise AblateError(f"dataset '{hub_id}' (split '{split}'): cannot load: {str(error).splitlines()[0]}") from None
    rows = [dict(row) for row in dataset]
    if filter_column is not None:
        if rows and filter_column not in rows[0]:
            raise AblateError(f"dataset '{hub_id}': no filter column '{filter_column}'")
        rows = [row for row in rows if str(row.get(filter_column) or "") == (filter_value or "")]
    return rows_to_prompt_set(rows, name=name or hub_id, source=f"hf:{hub_id}" + (f"/{config}" if config else "") + f":{split}", **columns)


def load_benchmark(name: str, local_file: str | Path | None = None, with_responses: bool = False) -> PromptSet:
    """A registered public benchmark, from the hub or from a local file of the same shape.

    `with_responses` keeps the benchmark's answer column (Alpaca's `output`) as the set's responses, for
    fine-tuning on it; a benchmark without one is an error naming it.
    """
    if name not in REGISTRY:
        raise AblateError(f"unknown benchmark '{name}'; registered: {', '.join(sorted(REGISTRY))}")
    bench = REGISTRY[name]
    if with_responses and bench.response_column is None:
        with_answers = ", ".join(sorted(n for n, b in REGISTRY.items() if b.response_column)) or "none"
        raise AblateError(f"benchmark '{name}': holds no answers to fine-tune on (benchmarks with answers: {with_answers})")
    columns = dict(prompt_column=bench.prompt_column, category_column=bench.category_column,
                   input_column=bench.input_column, response_column=bench.response_column if with_responses else None)
    if local_file is not None:
        rows = read_rows(Path(local_file))
        if bench.filter_column is not None:
            if rows and bench.filter_column not in rows[0]:
                raise AblateError(f"{local_file}: no filter column '{bench.filter_column}' expected for {name}")
            rows = [row for row in rows if str(row.get(bench.filter_column) or "") == (bench.filter_value or "")]
        return rows_to_prompt_set(rows, name=name, source=f"{local_file} (as {name})", **columns)
    return load_hub(bench.hub_id, split=bench.split, config=bench.config, name=name,
                    filter_column=bench.filter_column, filter_value=bench.filter_value, **columns)


def load_prompt_set(
    spec: str,
    *,
    limit: int | None = None,
    prompt_column: str = "prompt",
    id_column: str | None = None,
    category_column: str | None = None,
    response_column: str | None = None,
    split: str = "train",
) -> PromptSet:
    """Resolve a set name (see the module docstring) to a PromptSet, optionally the first `limit`."""
    columns = dict(prompt_column=prompt_column, id_column=id_column, category_column=category_column,
                   response_column=response_column)
    if len(spec_parts(spec)) > 1:
        parts = [load_prompt_set(part, split=split, **columns) for part in spec_parts(spec)]
        return union(parts, spec).head(limit)
    if (match := CATEGORY_FILTER.match(spec)) and not Path(spec).exists():
        names = [name.strip() for name in match["names"].split(",") if name.strip()]
        whole = load_prompt_set(match["base"], split=split, **columns)
        return select_categories(whole, names, keep=match["op"] == "=", name=spec).head(limit)
    name, _, part = spec.partition(":")
    if name in BUILTIN_SETS:
        prompt_set = load_builtin(name, part or None)
    elif name in REGISTRY and not Path(spec).exists():
        # A registered benchmark names its own columns; asking for responses keeps its answer column.
        prompt_set = load_benchmark(name, with_responses=response_column is not None)
    elif name == "hf":
        hub_id, _, hub_split = part.partition(":")
        prompt_set = load_hub(hub_id, split=hub_split or split, **columns)
    elif Path(spec).suffix.lower() in (".jsonl", ".json", ".csv", ".txt") or Path(spec).exists():
        prompt_set = load_file(spec, **columns)
    else:
        known = ", ".join([f"{s}[:train|val|test]" for s in BUILTIN_SETS] + sorted(REGISTRY))
        raise AblateError(f"unknown prompt set '{spec}'; expected a file path, hf:<id>, or one of: {known}")
    return prompt_set.head(limit)


def select_categories(prompt_set: PromptSet, categories: list[str], *, keep: bool, name: str) -> PromptSet:
    """The prompts in `categories` (keep) or in every other category (not keep); a category the set does not
    hold is an error naming it and the set's categories."""
    held = sorted(set(prompt_set.categories))
    unknown = [category for category in categories if category not in held]
    if unknown or not categories:
        raise AblateError(f"prompt set '{name}': no category '{unknown[0] if unknown else ''}' in {prompt_set.name}; "
                          f"its categories: {', '.join(held) or 'none'}")
    indices = [i for i, category in enumerate(prompt_set.categories) if (category in categories) == keep]
    if not indices:
        raise AblateError(f"prompt set '{name}' is empty: every prompt of {prompt_set.name} is in {', '.join(categories)}")
    return prompt_set.take(indices, name=name)


def unfiltered(spec: str) -> str:
    """A set name without its category filter (`refusal:test[category=x]` → `refusal:test`)."""
    match = CATEGORY_FILTER.match(spec)
    return match["base"] if match and not Path(spec).exists() else spec


def spec_parts(spec: str) -> list[str]:
    """The set names of a union `A+B` (one name when there is no '+', or when the spec is an existing file)."""
    if "+" not in spec or Path(spec).exists():
        return [spec]
    return [part.strip() for part in spec.split("+")]


def union(parts: list[PromptSet], name: str) -> PromptSet:
    """The prompts of every part, in order; an id in two parts is an error (the same prompt listed twice)."""
    ids = [item_id for part in parts for item_id in part.ids]
    repeated = [item_id for item_id, count in Counter(ids).items() if count > 1]
    if repeated:
        raise AblateError(f"prompt set '{name}': id '{repeated[0]}' is in more than one of its parts")
    responses = [part.responses for part in parts]
    return PromptSet(
        name=name,
        ids=ids,
        prompts=[prompt for part in parts for prompt in part.prompts],
        categories=[category for part in parts for category in part.categories],
        source=" + ".join(part.source for part in parts),
        responses=None if any(r is None for r in responses) else [text for r in responses for text in r],
    )


def list_sets() -> list[dict]:
    """Every built-in set and split with its size, and the registry (not loaded: it needs the hub)."""
    rows = []
    for name in BUILTIN_SETS:
        for split in builtin_splits(name):
            prompt_set = load_builtin(name, split)
            rows.append({"name": f"{name}:{split}", "n": len(prompt_set), "source": "built-in",
                         "categories": len(set(prompt_set.categories))})
    for name, bench in sorted(REGISTRY.items()):
        rows.append({"name": name, "n": None, "source": f"hf:{bench.hub_id}", "categories": None,
                     "description": bench.description})
    return rows


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def max_tfidf_cosine(texts: list[str], anchors: list[str]) -> list[float]:
    """For each text, its highest cosine similarity to any anchor in TF-IDF space (word unigrams, smoothed idf)."""
    docs = [_words(t) for t in texts] + [_words(a) for a in anchors]
    frequency: dict[str, int] = {}
    for words in docs:
        for word in set(words):
            frequency[word] = frequency.get(word, 0) + 1
    idf = {word: math.log((1 + len(docs)) / (1 + count)) + 1 for word, count in frequency.items()}

    def vector(words: list[str]) -> dict[str, float]:
        weights: dict[str, float] = {}
        for word in words:
            weights[word] = weights.get(word, 0.0) + idf[word]
        norm = math.sqrt(sum(w * w for w in weights.values())) or 1.0
        return {word: w / norm for word, w in weights.items()}

    anchor_vectors = [vector(words) for words in docs[len(texts):]]
    scores = []
    for words in docs[: len(texts)]:
        v = vector(words)
        scores.append(max((sum(w * a.get(word, 0.0) for word, w in v.items()) for a in anchor_vectors), default=0.0))
    return scores
