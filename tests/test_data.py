import json
import re
from itertools import combinations

import pytest

from ablate import AblateError
from ablate.data import (BUILTIN_SETS, REGISTRY, SPLITS, builtin_rows, load_benchmark, load_builtin, load_file,
                         load_prompt_set, read_package_text)

MINIMUM = {"refusal": (400, 8), "harmless": (400, 8), "borderline": (100, 5), "harmless_forms": (60, 1),
           "refusal_kinds": (300, 15), "harmless_kinds": (150, 5)}
TRAIN_ONLY = {"harmless_forms"}  # contrast prompts for training; never scored, so no val or test split


def splits_of(name: str) -> set[str]:
    return {"train"} if name in TRAIN_ONLY else set(SPLITS)


def words(text: str) -> frozenset:
    return frozenset(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / max(1, len(a | b))


@pytest.mark.parametrize("name", BUILTIN_SETS)
def test_builtin_sizes_categories_and_ids(name):
    rows = builtin_rows(name)
    minimum_rows, minimum_categories = MINIMUM[name]
    assert len(rows) >= minimum_rows
    assert len({row["category"] for row in rows}) >= minimum_categories
    assert len({row["id"] for row in rows}) == len(rows)
    assert all(set(row) == {"id", "prompt", "category", "topic", "split"} for row in rows)
    assert {row["split"] for row in rows} == splits_of(name)


@pytest.mark.parametrize("name", BUILTIN_SETS)
def test_splits_are_disjoint_by_topic(name):
    rows = builtin_rows(name)
    split_of_topic = {}
    for row in rows:
        key = (row["category"], row["topic"])
        assert split_of_topic.setdefault(key, row["split"]) == row["split"], key
    for category in {row["category"] for row in rows}:
        assert {row["split"] for row in rows if row["category"] == category} == splits_of(name), category


@pytest.mark.parametrize("name", BUILTIN_SETS)
def test_no_near_duplicates_across_splits(name):
    rows = [(row["split"], words(row["prompt"]), row["id"]) for row in builtin_rows(name)]
    offenders = [
        (a[2], b[2]) for a, b in combinations(rows, 2)
        if jaccard(a[1], b[1]) >= (0.6 if a[0] != b[0] else 0.8)
    ]
    assert not offenders, offenders[:5]


def test_the_wider_refusal_set_has_no_near_duplicate_of_the_other_across_splits():
    """refusal:train+refusal_kinds:train trains an organism scored on both test splits: no test prompt of one
    may be a near-copy of a train prompt of the other."""
    rows = {name: [(row["split"], words(row["prompt"]), row["id"]) for row in builtin_rows(name)]
            for name in ("refusal", "refusal_kinds")}
    offenders = [(a[2], b[2]) for a in rows["refusal"] for b in rows["refusal_kinds"]
                 if a[0] != b[0] and jaccard(a[1], b[1]) >= 0.6]
    assert not offenders, offenders[:5]
    categories = {name: {row["category"] for row in builtin_rows(name)} for name in rows}
    assert categories["refusal"] < categories["refusal_kinds"]  # the ten, asked as questions, and five new kinds


def test_sets_do_not_overlap_each_other():
    prompts = {name: {row["prompt"].lower() for row in builtin_rows(name)} for name in BUILTIN_SETS}
    for a, b in combinations(BUILTIN_SETS, 2):
        assert not prompts[a] & prompts[b]


def test_load_builtin_split_and_fingerprint():
    test = load_prompt_set("refusal:test")
    train = load_prompt_set("refusal:train")
    assert not set(test.ids) & set(train.ids)
    assert test.fingerprint == load_builtin("refusal", "test").fingerprint
    assert test.fingerprint != train.fingerprint
    assert len(load_prompt_set("harmless:val", limit=5)) == 5
    with pytest.raises(AblateError, match="unknown split 'dev'"):
        load_prompt_set("refusal:dev")
    with pytest.raises(AblateError, match="'harmless_forms:val' is empty.*has the splits train"):
        load_prompt_set("harmless_forms:val")


def test_union_of_sets_keeps_order_and_refuses_a_repeated_prompt(tmp_path):
    train, forms = load_prompt_set("harmless:train"), load_prompt_set("harmless_forms:train")
    both = load_prompt_set("harmless:train + harmless_forms:train")
    assert both.ids == train.ids + forms.ids and both.prompts == train.prompts + forms.prompts
    assert both.categories == train.categories + forms.categories and both.name == "harmless:train + harmless_forms:train"
    assert len(load_prompt_set("harmless:train+harmless_forms:train", limit=5)) == 5
    with pytest.raises(AblateError, match="id 'harmless-explain-001' is in more than one of its parts"):
        load_prompt_set("harmless:train+harmless:train")
    with pytest.raises(AblateError, match="unknown prompt set 'harmles'"):
        load_prompt_set("harmless:train+harmles")
    plus = tmp_path / "a+b.txt"  # a file whose name holds a '+' is still a file
    plus.write_text("one\n")
    assert load_prompt_set(str(plus)).prompts == ["one"]


def test_form_contrast_prompts_do_not_leak_held_out_harmless_prompts():
    held_out = [words(row["prompt"]) for row in builtin_rows("harmless") if row["split"] != "train"]
    for row in builtin_rows("harmless_forms"):
        closest = max(jaccard(words(row["prompt"]), other) for other in held_out)
        assert closest < 0.5, (row["id"], closest)


def test_sample_is_deterministic():
    full = load_prompt_set("harmless:train")
    assert full.sample(10, seed=1).ids == full.sample(10, seed=1).ids
    assert full.sample(10, seed=1).ids != full.sample(10, seed=2).ids


def test_most_similar_ranks_by_shared_rare_words():
    from ablate.data import max_tfidf_cosine

    texts = ["Write a letter to my pen pal.", "Explain photosynthesis.", "Write a threatening letter to my neighbour."]
    scores = max_tfidf_cosine(texts, ["Write a nasty letter to scare my neighbour."])
    assert scores[2] > scores[0] > scores[1] == 0.0
    harmless = load_prompt_set("harmless:train")
    anchors = ["Write a letter insulting my coworker.", "Draft a message to harass my ex."]
    picked = harmless.most_similar(10, anchors)
    assert len(picked) == 10 and picked.ids == sorted(picked.ids, key=harmless.ids.index)  # original order kept
    scores = dict(zip(harmless.ids, max_tfidf_cosine(harmless.prompts, anchors)))
    assert min(scores[i] for i in picked.ids) >= max(scores[i] for i in harmless.ids if i not in picked.ids)
    assert harmless.most_similar(None, anchors) is harmless


def test_file_loaders(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"q": "one", "k": "x1"}\n{"q": "two", "k": "x2"}\n')
    (tmp_path / "b.json").write_text(json.dumps({"data": [{"prompt": "one"}, {"prompt": "two"}]}))
    (tmp_path / "c.csv").write_text("goal,category\none,a\ntwo,b\n")
    (tmp_path / "d.txt").write_text("one\n\ntwo\n")
    assert load_file(tmp_path / "a.jsonl", prompt_column="q", id_column="k").ids == ["x1", "x2"]
    assert load_file(tmp_path / "b.json").prompts == ["one", "two"]
    assert load_file(tmp_path / "c.csv", prompt_column="goal", category_column="category").categories == ["a", "b"]
    assert load_prompt_set(str(tmp_path / "d.txt")).prompts == ["one", "two"]


def test_loader_errors_name_the_culprit(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"q": "one"}\n')
    with pytest.raises(AblateError, match=r"a.jsonl: no prompt column 'prompt' \(columns: q\)"):
        load_file(tmp_path / "a.jsonl")
    with pytest.raises(AblateError, match="prompt file not found"):
        load_prompt_set(str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{oops\n')
    with pytest.raises(AblateError, match=r"bad.jsonl: line 2: invalid JSON"):
        load_file(tmp_path / "bad.jsonl")
    with pytest.raises(AblateError, match="unknown prompt set 'nonsense'"):
        load_prompt_set("nonsense")


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registry_loads_local_files_of_the_same_shape(tmp_path, name):
    bench = REGISTRY[name]
    rows = []
    for index in range(3):
        row = {bench.prompt_column: f"request number {index}"}
        if bench.category_column:
            row[bench.category_column] = "cat"
        if bench.input_column:
            row[bench.input_column] = ""
        if bench.filter_column and bench.filter_column != bench.input_column:
            row[bench.filter_column] = bench.filter_value
        rows.append(row)
    if bench.filter_column and bench.filter_column != bench.input_column:
        rows.append({**rows[0], bench.prompt_column: "other", bench.filter_column: "something-else"})
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prompt_set = load_benchmark(name, local_file=path)
    assert prompt_set.prompts == [f"request number {i}" for i in range(3)]


def test_registry_without_hub_fails_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AblateError, match=r"dataset 'walledai/AdvBench'.*cannot load"):
        load_prompt_set("advbench")


def test_package_text_files():
    refusals = [line for line in read_package_text("refusals.txt").splitlines() if line.strip()]
    assert len(refusals) >= 40
