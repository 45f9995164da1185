"""Train-test leakage: planted near duplicates found by ``turnover_hf.duplicates`` against exact-match baselines.

Data: Rotten Tomatoes as ``turnover_hf.assets.rotten_tomatoes`` ships it offline (3,404 training and 973 test
reviews, exact repeats already removed by the loader). Planted: 400 copies of training reviews of at least
``MIN_WORDS`` words added to the test set, 100 of each kind:

* ``exact``: the review as it is;
* ``case/space``: case changed (lower, upper or title), whitespace doubled or trimmed, final punctuation dropped;
* ``1 word``, ``2-3 words``: that many word edits (a word replaced by a random corpus word, inserted or deleted;
  ``2-3 words`` is 50 with two edits and 50 with three).

A found train-test pair is right when it links a planted copy to its source. Precision counts every other pair as
wrong, including pairs of reviews the corpus itself holds twice in near-identical form (listed, so you can judge).
Rows: ``identical text`` (the baseline: the same string), ``normalised`` (the same after NFKC, case folding,
punctuation and whitespace removal), ``normalised + near`` at Jaccard thresholds on character 5-grams (MinHash
LSH candidates, exact similarity), and the embedding peer: cleanlab's ``Datalab`` near-duplicate check (its
default: neighbours closer than 0.13 x the median nearest-neighbour distance) on pretrained MiniLM sentence
embeddings (mean over tokens, L2-normalised), the features cleanlab's text tutorial uses. The default threshold
is chosen on planting seed 0 and confirmed on seed 1.
Time: the within-set search on N synthetic reviews (random words drawn by the corpus's word frequencies, with real
review lengths), at a few N, with the log-log slope of time against N.

Run from the repository root (about three minutes on one thread):

    PYTHONPATH=. python benchmarks/duplicates.py

Results: ``benchmarks/results/duplicates.{json,md}``.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

from turnover_hf.assets import rotten_tomatoes
from turnover_hf.duplicates import DEFAULT_THRESHOLD, DuplicateOptions, find_duplicates, normalise
from turnover_hf.files import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
MIN_WORDS = 8
PER_KIND = 100
THRESHOLDS = (0.3, 0.35, 0.4, 0.5, 0.6)
SIZES = (10_000, 40_000, 160_000)


def case_space(text: str, rng: random.Random) -> str:
    changed = rng.choice([str.lower, str.upper, str.title])(text)
    words = changed.split()
    changed = rng.choice(["  ".join(words), " " + " ".join(words) + "  ", "\t".join(words)])
    return changed.rstrip(".!?") if rng.random() < 0.5 else changed


def word_edits(text: str, k: int, vocabulary: list[str], rng: random.Random) -> str:
    words = text.split()
    for _ in range(k):
        operation = rng.choice(["replace", "insert", "delete"])
        i = rng.randrange(len(words))
        if operation == "replace":
            words[i] = rng.choice(vocabulary)
        elif operation == "insert":
            words.insert(i, rng.choice(vocabulary))
        else:
            del words[i]
    return " ".join(words)


def planted_split(train: list[str], test: list[str], seed: int) -> tuple[list[str], dict[int, tuple[int, str]]]:
    """The test texts plus planted copies; planted test position -> (source training position, kind)."""
    rng = random.Random(seed)
    vocabulary = sorted({w for t in train for w in t.split()})
    eligible = [i for i, t in enumerate(train) if len(t.split()) >= MIN_WORDS]
    sources = rng.sample(eligible, 4 * PER_KIND)
    out, truth = list(test), {}
    for n, source in enumerate(sources):
        kind = ("exact", "case/space", "1 word", "2-3 words")[n // PER_KIND]
        text = train[source]
        if kind == "case/space":
            text = case_space(text, rng)
        elif kind == "1 word":
            text = word_edits(text, 1, vocabulary, rng)
        elif kind == "2-3 words":
            text = word_edits(text, 2 + n % 2, vocabulary, rng)
        truth[len(out)] = (source, kind)
        out.append(text)
    return out, truth


def score(pairs: list[dict], truth: dict[int, tuple[int, str]], train: list[str], test: list[str]) -> dict:
    """Recall and precision of the train-test pairs. A pair counts as right when its two texts are, after
    normalisation, those of a planted copy and its source (a planted copy whose text the test set already holds
    may be reported through that older row: the same leak)."""
    key = lambda i, j: (normalise(train[i]), normalise(test[j]))
    found = {(p["index"], p["other_index"]) for p in pairs if p["other_split"] == "test"}
    found_keys = {key(i, j) for i, j in found}
    right_keys = {key(s, t) for t, (s, _) in truth.items()}
    by_kind = {}
    for kind in ("exact", "case/space", "1 word", "2-3 words"):
        wanted = [key(s, t) for t, (s, k) in truth.items() if k == kind]
        by_kind[kind] = sum(w in found_keys for w in wanted) / len(wanted)
    hits = sum(key(s, t) in found_keys for t, (s, _) in truth.items())
    wrong = sorted(pair for pair in found if key(*pair) not in right_keys)
    return {"recall": hits / len(truth), "precision": (len(found) - len(wrong)) / len(found) if found else float("nan"),
            "found": len(found), "wrong": wrong, "recall_by_kind": by_kind}


def identical_pairs(train: list[str], test: list[str]) -> list[dict]:
    where: dict[str, list[int]] = {}
    for i, t in enumerate(train):
        where.setdefault(t, []).append(i)
    return [{"index": i, "other_index": j, "other_split": "test"} for j, t in enumerate(test) for i in where.get(t, [])]


def accuracy(train: list[str], test: list[str], seed: int) -> tuple[list[dict], list]:
    planted, truth = planted_split(train, test, seed)
    rows = []
    start = time.perf_counter()
    result = score(identical_pairs(train, planted), truth, train, planted)
    rows.append({"method": "identical text (baseline)", **result, "seconds": time.perf_counter() - start})
    start = time.perf_counter()
    result = score(find_duplicates(train, {"test": planted}, near=False), truth, train, planted)
    rows.append({"method": "normalised (exact only)", **result, "seconds": time.perf_counter() - start})
    examples = []
    if importlib.util.find_spec("cleanlab") is not None:
        start = time.perf_counter()
        pairs = datalab_pairs(train, planted, minilm_embeddings(train + planted))
        rows.append({"method": "Datalab near_duplicate on MiniLM embeddings (peer)",
                     **score(pairs, truth, train, planted), "seconds": time.perf_counter() - start})
    for threshold in THRESHOLDS:
        start = time.perf_counter()
        pairs = find_duplicates(train, {"test": planted}, options=DuplicateOptions(threshold=threshold))
        result = score(pairs, truth, train, planted)
        rows.append({"method": f"normalised + near, Jaccard >= {threshold:g}", "threshold": threshold, **result,
                     "seconds": time.perf_counter() - start})
        if threshold == DEFAULT_THRESHOLD:
            similarity = {(p["index"], p["other_index"]): p["similarity"] for p in pairs if p["other_split"] == "test"}
            examples = [{"similarity": round(similarity[pair], 3), "train": train[pair[0]], "test": planted[pair[1]],
                         "planted": pair[1] in truth} for pair in result["wrong"]]
    return rows, examples


def minilm_embeddings(texts: list[str]) -> np.ndarray:
    """Pretrained MiniLM sentence embeddings (the label-error benchmark's cookbook features)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from label_errors import encoder_embeddings

    return encoder_embeddings(texts, max_length=128)[0].numpy()


def datalab_pairs(train: list[str], test: list[str], embeddings: np.ndarray) -> list[dict]:
    """Train-test pairs of cleanlab Datalab's near-duplicate sets (default settings) on ``embeddings``."""
    from cleanlab import Datalab

    lab = Datalab(data={"text": train + test}, verbosity=0)
    lab.find_issues(features=embeddings, issue_types={"near_duplicate": {}})
    issues = lab.get_issues("near_duplicate")
    pairs = []
    for i in range(len(train)):
        if issues["is_near_duplicate_issue"][i]:
            for j in issues["near_duplicate_sets"][i]:
                if j >= len(train):
                    pairs.append({"index": i, "other_index": int(j) - len(train), "other_split": "test"})
    return pairs


def synthetic(n: int, texts: list[str], seed: int) -> list[str]:
    """``n`` reviews of random words (drawn by the corpus's word frequencies, with its lengths): no duplicates but
    chance ones, so the time is that of the search itself."""
    rng = np.random.default_rng(seed)
    words = [w for t in texts for w in t.split()]
    lengths = rng.choice([len(t.split()) for t in texts], size=n)
    drawn = rng.integers(0, len(words), size=int(lengths.sum()))
    out, start = [], 0
    for length in lengths.tolist():
        out.append(" ".join(words[k] for k in drawn[start:start + length]))
        start += length
    return out


def timing(texts: list[str]) -> list[dict]:
    find_duplicates(synthetic(2_000, texts, seed=1))  # warm-up
    rows = []
    for n in SIZES:
        corpus = synthetic(n, texts, seed=n)
        start = time.perf_counter()
        pairs = find_duplicates(corpus)
        near_seconds = time.perf_counter() - start
        start = time.perf_counter()
        find_duplicates(corpus, near=False)
        rows.append({"n": n, "seconds": near_seconds, "exact_only_seconds": time.perf_counter() - start,
                     "pairs": len(pairs)})
        print(f"  N = {n:>6}: {near_seconds:6.2f} s ({len(pairs)} pairs)", flush=True)
    slope = np.polyfit(np.log([r["n"] for r in rows]), np.log([r["seconds"] for r in rows]), 1)[0]
    return rows, float(slope)


def render(results: dict) -> str:
    intro = (f"3,404 training and 973 test reviews; {4 * PER_KIND} copies of training reviews of at least "
             f"{MIN_WORDS} words planted in the test set ({PER_KIND} per kind). Default threshold: "
             f"{DEFAULT_THRESHOLD:g} (Jaccard of character 5-grams).")
    lines = ["# Train-test near duplicates on Rotten Tomatoes (planted)", "",
             f"Command: `PYTHONPATH=. python benchmarks/duplicates.py`. {results['machine']}.", "", intro, ""]
    for seed, block in results["accuracy"].items():
        lines += [f"## Planting seed {seed}", "",
                  "| method | recall | precision | found pairs | exact | case/space | 1 word | 2-3 words | seconds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in block["rows"]:
            kinds = row["recall_by_kind"]
            lines.append(
                f"| {row['method']} | {row['recall']:.3f} | {row['precision']:.3f} | {row['found']} | "
                f"{kinds['exact']:.2f} | {kinds['case/space']:.2f} | {kinds['1 word']:.2f} | {kinds['2-3 words']:.2f} "
                f"| {row['seconds']:.2f} |")
        wrong = (f"Pairs found at the default threshold that are not a planted copy and its source "
                 f"({len(block['wrong_examples'])}):")
        lines += ["", wrong, ""]
        for example in block["wrong_examples"][:10]:
            note = "(planted copy, other source) " if example["planted"] else ""
            lines.append(f"- {example['similarity']:.3f} {note}"
                         f"train: {example['train'][:90]!r} / test: {example['test'][:90]!r}")
        lines.append("")
    lines += ["## Time of the within-set search", "", "| N | near + exact (s) | exact only (s) | pairs |", "|---|---|---|---|"]
    for row in results["timing"]:
        lines.append(f"| {row['n']:,} | {row['seconds']:.2f} | {row['exact_only_seconds']:.2f} | {row['pairs']} |")
    lines += ["", f"Log-log slope of time against N: {results['slope']:.2f}.", ""]
    return "\n".join(lines)


def main() -> None:
    data = rotten_tomatoes(seed=0)
    train, test = list(data["train"]["text"]), list(data["test"]["text"])
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, Python {sys.version.split()[0]}, "
                                "one thread", "accuracy": {}}
    for seed in (0, 1):
        rows, examples = accuracy(train, test, seed)
        results["accuracy"][seed] = {"rows": rows, "wrong_examples": examples}
        print(f"planting seed {seed}:")
        print(f"  {'method':<40} {'recall':>7} {'precision':>9} {'found':>6}  by kind")
        for row in rows:
            kinds = " ".join(f"{v:.2f}" for v in row["recall_by_kind"].values())
            print(f"  {row['method']:<40} {row['recall']:7.3f} {row['precision']:9.3f} {row['found']:6d}  {kinds}")
    print("time of the within-set search:")
    results["timing"], results["slope"] = timing(train + test)
    print(f"  log-log slope {results['slope']:.2f}")
    for block in results["accuracy"].values():
        for row in block["rows"]:
            row["wrong"] = [list(p) for p in row["wrong"]]
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / "duplicates.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(RESULTS / "duplicates.md", render(results))
    print(f"wrote {RESULTS / 'duplicates.md'}")


if __name__ == "__main__":
    normalise("warm up")  # (imports settled before timing)
    main()
