import csv
import random

import numpy as np
import pytest
import torch
from conftest import text_task, tiny_bert, word_tokenizer
from datasets import Dataset
from transformers import TrainingArguments

import turnover_hf as th
from turnover_hf import cli, report
from turnover_hf.audit import KINDS, audit_counts, knn_distances, model_embeddings
from turnover_hf.duplicates import DuplicateOptions, find_duplicates, normalise

SENTENCES = [
    "the director keeps every scene moving and the two leads share an easy warmth",
    "a muddled thriller whose twists arrive long after anyone has stopped caring",
    "beautifully photographed but so slow that the final hour feels like a week",
    "its jokes land more often than not thanks to a cast that clearly enjoys itself",
    "a documentary that lets its subjects speak and trusts the audience to listen",
    "nothing in this sequel justifies its existence beyond the studio's balance sheet",
    "an old fashioned romance told with enough wit to feel fresh again",
    "the script mistakes loudness for energy and volume for emotion, and the ending simply gives up on its people",
]


def _unrelated(n: int, seed: int) -> list[str]:
    """Sentences of random words: unlike each other and unlike SENTENCES."""
    rng = random.Random(seed)
    words = sorted({w for s in SENTENCES for w in s.split()} | {f"word{i}" for i in range(300)})
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 16))) for _ in range(n)]


def _edit(text: str, changes: list[tuple[int, str]]) -> str:
    words = text.split()
    for position, word in changes:
        words[position] = word
    return " ".join(words)


# -- duplicates -------------------------------------------------------------------------------------------------
PLANTED = {  # kind -> function of a sentence
    "identical": lambda s: s,
    "normalised": lambda s: "  " + s.upper().replace(" ", "   ") + "!!",
    "one word": lambda s: _edit(s, [(3, "zebra")]),
    "three words": lambda s: _edit(s, [(1, "zebra"), (5, "quietly"), (8, "orange")]),
}


def test_planted_duplicates_of_every_kind_are_found_within_train_and_across_to_test():
    train = _unrelated(40, seed=1)
    test = _unrelated(20, seed=2)
    within, across = {}, {}
    for n, (kind, make) in enumerate(PLANTED.items()):
        source = len(train)
        train.append(SENTENCES[n])
        train.append(make(SENTENCES[n]))
        within[(len(train) - 1, source)] = kind
        test.append(make(SENTENCES[4 + n]))
        train.append(SENTENCES[4 + n])
        across[(len(train) - 1, len(test) - 1)] = kind
    pairs = find_duplicates(train, {"test": test})
    found_within = {(p["index"], p["other_index"]): p for p in pairs if p["other_split"] == "train"}
    found_across = {(p["index"], p["other_index"]): p for p in pairs if p["other_split"] == "test"}
    assert set(found_within) == set(within), (found_within, within)  # all planted, and nothing unrelated
    assert set(found_across) == set(across), (found_across, across)
    for found, planted in ((found_within, within), (found_across, across)):
        for key, kind in planted.items():
            match = found[key]["match"]
            if kind in ("identical", "normalised"):
                assert match == kind and found[key]["similarity"] == 1.0
            else:
                assert match == "near" and 0.4 <= found[key]["similarity"] < 1.0
    near_only = find_duplicates(train, {"test": test}, near=False)
    assert {p["match"] for p in near_only} == {"identical", "normalised"}  # near matches need the near search


def test_normalisation_and_options_are_checked():
    assert normalise("Ｔｈｅ  FILM,\tis   GREAT!") == "the film is great"  # NFKC folds full-width letters
    assert find_duplicates(["🎬🍿", "?!", "👍"]) == []  # symbols only: not all the same empty text
    assert find_duplicates(["a film", "another"], {"test": ["nothing", "at all"]}) == []
    with pytest.raises(th.TurnoverError, match="threshold"):
        DuplicateOptions(threshold=0)
    with pytest.raises(th.TurnoverError, match="bands"):
        DuplicateOptions(bands=0)
    with pytest.raises(th.TurnoverError, match="row 1 of 'train' is a int"):
        find_duplicates(["a", 3])
    with pytest.raises(th.TurnoverError, match="named 'train'"):
        find_duplicates(["a"], {"train": ["b"]})


def test_any_texts_give_consistent_pairs_or_our_error():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=60, deadline=None)
    @hypothesis.given(st.lists(st.text(max_size=30), max_size=12), st.lists(st.text(max_size=30), max_size=6),
                      st.sampled_from([0.2, 0.4, 1.0]))
    def check(train, test, threshold):
        assert normalise(normalise(" ".join(train))) == normalise(" ".join(train))
        pairs = find_duplicates(train, {"test": test}, options=DuplicateOptions(threshold=threshold))
        for p in pairs:
            other = train if p["other_split"] == "train" else test
            a, b = train[p["index"]], other[p["other_index"]]
            if p["match"] == "near":
                assert threshold <= p["similarity"] <= 1 and normalise(a) != normalise(b)
            else:
                assert p["similarity"] == 1.0 and normalise(a) == normalise(b)
                assert (a == b) == (p["match"] == "identical")
            if p["other_split"] == "train":
                assert p["index"] > p["other_index"]
        # every test row that has an exact copy in the training set is reported
        copied = {j for j, t in enumerate(test) if any(normalise(t) == normalise(x) for x in train)}
        assert copied <= {p["other_index"] for p in pairs if p["other_split"] == "test"}

    check()


def test_groups_of_copies_give_one_pair_per_extra_copy():
    pairs = find_duplicates(["same text here"] * 5 + ["other words entirely different"])
    assert sorted((p["index"], p["other_index"]) for p in pairs) == [(1, 0), (2, 0), (3, 0), (4, 0)]
    # two large groups of near duplicates: every member named, without one pair per member of each
    one, other = SENTENCES[0], _edit(SENTENCES[0], [(3, "zebra")])
    pairs = find_duplicates([one] * 10 + [other] * 10, {"test": [other] * 3})
    near = [p for p in pairs if p["match"] == "near"]
    assert len(near) < 10 * 10 and {p["index"] for p in near} | {p["other_index"] for p in near} >= set(range(20))
    leaked = {p["other_index"] for p in pairs if p["other_split"] == "test"}
    assert leaked == {0, 1, 2}


# -- outliers ----------------------------------------------------------------------------------------------------
def test_neighbour_distance_ranks_a_planted_outlier_first():
    g = torch.Generator().manual_seed(0)
    cluster = torch.randn(1, 16, generator=g) + 0.3 * torch.randn(60, 16, generator=g)
    vectors = torch.cat([cluster[:30], -cluster[:1] * 3, cluster[30:]])
    distances = knn_distances(vectors, neighbours=5, block=7)  # blocks smaller than N: the blockwise path
    assert int(distances.argmax()) == 30
    brute = 1 - torch.nn.functional.cosine_similarity(vectors[:, None], vectors[None], dim=-1).fill_diagonal_(-2)
    torch.testing.assert_close(distances, (1 - (1 - brute).topk(5, dim=1).values).mean(1).double(),
                               atol=1e-6, rtol=1e-6)


# -- the pipeline's audit ------------------------------------------------------------------------------------------
N_FLIPPED = 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny BERT trained on the text task with planted issues: flipped labels, copies within the training set,
    copies of training rows in the test set, and one odd row."""
    root = tmp_path_factory.mktemp("audit")
    tokenizer = word_tokenizer(root / "tok")
    data = text_task(96, seed=3)
    flipped = np.zeros(len(data), dtype=bool)
    flipped[np.random.default_rng(0).permutation(len(data))[:N_FLIPPED]] = True
    rows = [dict(r) for r in data]
    for n, row in enumerate(rows):
        if flipped[n]:
            row["label"] = 1 - row["label"]
    texts = [r["text"] for r in rows]
    # within the training set: an exact copy, an upper-case copy, a copy with one word changed
    copies = [(10, texts[10]), (11, texts[11].upper()), (12, _edit(texts[12], [(2, "w60")]))]
    for source, text in copies:
        rows.append({"text": text, "label": rows[source]["label"], "example_id": len(rows)})
    rows.append({"text": " ".join(["w63"] * 20), "label": 0, "example_id": len(rows)})  # the odd one: long, one word
    train = Dataset.from_list(rows)
    test_rows = [dict(r) for r in text_task(24, seed=11)]
    leaked = [(20, texts[20]), (21, "  " + texts[21].upper()), (22, _edit(texts[22], [(4, "w61")]))]
    for source, text in leaked:
        test_rows.append({"text": text, "label": rows[source]["label"], "example_id": 1000 + len(test_rows)})
    test = Dataset.from_list(test_rows)
    validation = text_task(48, seed=12).map(lambda r: {"example_id": r["example_id"] + 5000})
    tokenized = train.map(lambda b: tokenizer(b["text"]), batched=True).rename_column("label", "labels")
    model = th.patch_model(tiny_bert(), th.TurnoverConfig(seed=5), warn_leaking=False)
    args = TrainingArguments(str(root / "run"), per_device_train_batch_size=8, num_train_epochs=8, learning_rate=3e-3,
                             report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True)
    th.TurnoverTrainer(model=model, args=args, train_dataset=tokenized, processing_class=tokenizer).train()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    train.save_to_disk(root / "train")
    validation.save_to_disk(root / "validation")
    test.save_to_disk(root / "test")
    planted = {
        "flipped": {int(i) for i in np.flatnonzero(flipped)},
        "duplicate": {(96 + k, source) for k, (source, _) in enumerate(copies)},
        "leakage": {(source, 1000 + 24 + k) for k, (source, _) in enumerate(leaked)},
        "outlier": 99,
    }
    return root, train, validation, test, planted


@pytest.fixture(scope="module")
def audited(trained):
    root, train, validation, test, _ = trained
    pipe = th.InfluencePipeline(str(root / "model"), train_dataset=train)
    return pipe, pipe.audit(validation=validation, test=test)


def test_audit_finds_every_planted_issue(trained, audited):
    planted = trained[-1]
    _, issues = audited
    assert set(issues.column_names) >= {"kind", "example_id", "score", "reason", "source", "suggested_label",
                                        "other_id", "other_split", "value", "text"}
    rows = issues.to_list()
    of = lambda kind: [r for r in rows if r["kind"] == kind]
    assert {(r["example_id"], r["other_id"]) for r in of("duplicate")} == planted["duplicate"]
    assert {(r["example_id"], r["other_id"]) for r in of("leakage")} == planted["leakage"]
    assert {r["other_split"] for r in of("leakage")} == {"test"}
    test_texts = dict(zip(trained[3]["example_id"], trained[3]["text"]))
    assert all(r["other_text"] == test_texts[r["other_id"]] for r in of("leakage"))
    assert all(r["reason"] and r["source"] for r in rows)
    # wrong labels: the flipped ones come first, with the other class suggested
    wrong = of("wrong_label")
    caught = [r for r in wrong if r["example_id"] in planted["flipped"]]
    assert len(caught) >= N_FLIPPED // 2 and all(r["suggested_label"] == 1 - r["label"] for r in caught[:3])
    # outliers: listed most distant first, all past the stated fence (which layer finds what: test below)
    outliers = of("outlier")
    assert [r["score"] for r in outliers] == sorted((r["score"] for r in outliers), reverse=True)
    assert "Q3 + 3 x IQR" in issues.info.description
    # data value: listed most harmful first, negative mean influence; the flipped labels are harmful on average
    value = of("data_value")
    assert value and all(r["value"] < 0 and r["score"] == -r["value"] for r in value)
    assert [r["score"] for r in value] == sorted((r["score"] for r in value), reverse=True)
    assert "data_value" in issues.info.description and "skipped" not in issues.info.description
    assert audit_counts(issues) == {kind: len(of(kind)) for kind in KINDS}


def test_data_value_sign_agrees_with_harmful_flipped_labels(trained, audited):
    _, train, validation, _, planted = trained
    pipe, issues = audited
    influence = pipe.mean_influence(validation)
    value = dict(zip(influence["example_id"], influence["mean_influence"]))
    flipped = [value[i] for i in planted["flipped"]]
    clean = [value[i] for i in value if i not in planted["flipped"]]
    assert np.mean(flipped) < min(0.0, np.mean(clean))  # harmful, and more than the rest
    listed = [r["example_id"] for r in issues if r["kind"] == "data_value"]
    share = len(set(listed) & planted["flipped"]) / len(listed)
    assert share >= 3 * N_FLIPPED / len(train), (share, listed)  # flipped labels: 8 % of the rows


def test_outlier_kind_ranks_the_planted_outlier_first(trained, audited):
    planted = trained[-1]
    pipe, _ = audited
    # the tiny model's upper layers are trained hard on 100 rows; its input embeddings still see the odd text (on
    # MiniLM all layers together did best: benchmarks/outliers.py)
    issues = pipe.audit(kinds=["outlier"], outlier_layer=0)
    assert issues["example_id"][0] == planted["outlier"]
    assert "input embeddings" in issues["source"][0]
    with pytest.raises(th.TurnoverError, match="outlier_layer"):
        pipe.audit(kinds=["outlier"], outlier_layer="last")


def test_audit_without_held_out_sets_skips_those_kinds_with_a_note(trained, audited):
    pipe, _ = audited
    issues = pipe.audit(kinds=["leakage", "data_value", "duplicate"])
    assert set(issues["kind"]) == {"duplicate"}
    assert "leakage skipped: no validation or test set" in issues.info.description
    assert "data_value skipped: no validation set" in issues.info.description


def test_bad_audit_inputs_are_named(trained, audited):
    _, _, validation, test, _ = trained
    pipe, _ = audited
    with pytest.raises(th.TurnoverError, match="validation set is empty"):
        pipe.audit(validation=validation.select([]))
    with pytest.raises(th.TurnoverError, match="test set has no 'text' column.*text_column"):
        pipe.audit(test=test.rename_column("text", "sentence"), kinds=["leakage"])
    with pytest.raises(th.TurnoverError, match="unknown audit kinds \\['typo'\\]"):
        pipe.audit(kinds=["typo"])
    with pytest.raises(th.TurnoverError, match="harmful_fraction"):
        pipe.audit(validation=validation, harmful_fraction=0)
    with pytest.raises(th.TurnoverError, match="must be a datasets.Dataset"):
        pipe.audit(validation=["a text"])
    unlabelled = validation.remove_columns("label")
    assert "no 'label' column" in pipe.audit(validation=unlabelled, kinds=["data_value"]).info.description


def test_a_training_set_without_text_skips_duplicates_with_a_note(trained, audited):
    pipe, _ = audited
    tokenized = th.InfluencePipeline(pipe.model, pipe.tokenizer, train_dataset=pipe._train_features,
                                     estimator="turnover")
    issues = tokenized.audit(kinds=["duplicate", "outlier"])
    assert "duplicate skipped: the training set has no 'text' column" in issues.info.description
    assert set(issues["kind"]) <= {"outlier"}


@pytest.mark.parametrize("layer", [0, -1, None])
def test_embeddings_are_the_mean_of_hidden_states(audited, layer):
    pipe, _ = audited
    rows = pipe._train_features.select(range(3))
    vectors = model_embeddings(pipe.model, rows, pipe.collator, batch_size=2, layer=layer)
    batch = pipe.collator([rows[0]])
    with torch.no_grad():
        states = pipe.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_hidden_states=True).hidden_states
    if layer is None:  # every layer, each normalised
        expected = torch.cat([torch.nn.functional.normalize(h[0].mean(0), dim=0) for h in states])
    else:
        expected = states[layer][0].mean(0)
    torch.testing.assert_close(vectors[0], expected, atol=1e-5, rtol=1e-4)


def test_report_has_an_audit_section_with_counts_and_rows(audited):
    _, issues = audited
    page = report.render_report(audit=issues, label_names=["no", "yes"])
    assert 'id="audit"' in page
    for kind, count in audit_counts(issues).items():
        assert f'data-kind="{kind}" data-count="{count}"' in page
    first = issues.filter(lambda r: r["kind"] == "leakage")[0]
    assert report._e(first["reason"]) in page


def test_cli_audit_writes_issues_and_a_report(trained, capsys):
    root = trained[0]
    code = cli.main(["audit", "--model", str(root / "model"), "--train", str(root / "train"), "--test",
                     str(root / "test"), "--output", str(root / "issues.csv"), "--html", str(root / "audit.html"),
                     "--kinds", "duplicate", "leakage", "outlier"])
    assert code == 0
    out = capsys.readouterr().out
    with open(root / "issues.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["kind"] for r in rows} == {"duplicate", "leakage", "outlier"}
    assert "3 duplicate" in out and "3 leakage" in out
    assert 'id="audit"' in (root / "audit.html").read_text(encoding="utf-8")
    assert cli.main(["audit", "--model", str(root / "model"), "--output", str(root / "issues.csv")]) == 1  # exists


def test_cli_report_adds_the_audit_section_when_asked(trained, capsys):
    root = trained[0]
    args = ["report", "--model", str(root / "model"), "--train", str(root / "train"), "--targets",
            str(root / "validation"), "--explain", "0", "--estimator", "turnover"]
    assert cli.main([*args, "--output", str(root / "plain.html")]) == 0
    assert 'id="audit"' not in (root / "plain.html").read_text(encoding="utf-8")
    assert cli.main([*args, "--output", str(root / "audited.html"), "--audit"]) == 0
    page = (root / "audited.html").read_text(encoding="utf-8")
    assert 'id="audit"' in page and 'data-kind="duplicate" data-count="3"' in page
