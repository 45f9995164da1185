"""Targets of every familiar type give the same answer as a list of dicts; anything else is refused by name."""

import pandas as pd
import pytest
import torch
from datasets import Dataset

import turnover_hf as th
from turnover_hf.targets import normalize_targets

from conftest import text_task, word_tokenizer
from test_turnover import perturbed_top_adapter


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    tokenizer = word_tokenizer(tmp_path_factory.mktemp("tok"))
    train = text_task(24)
    model = perturbed_top_adapter(6, freeze_leaking=True)
    model.turnover_config.num_train_examples = len(train)
    return th.InfluencePipeline(model, tokenizer, train_dataset=train, estimator="turnover")


TEXTS, LABELS = ["w5 w7 w9", "w11 w12"], [1, 0]


def test_every_accepted_type_gives_the_answer_of_a_list_of_dicts(pipe):
    rows = [{"text": t, "label": y} for t, y in zip(TEXTS, LABELS)]
    reference = pipe.scores(rows)
    same = {
        "dict of lists": {"text": TEXTS, "label": LABELS},
        "DataFrame": pd.DataFrame({"text": TEXTS, "label": LABELS}),
        "Dataset": Dataset.from_dict({"text": TEXTS, "label": LABELS}),
        "labels by class name": [{"text": t, "label": f"LABEL_{y}"} for t, y in zip(TEXTS, LABELS)],
        "labels as integral floats (pandas with gaps)": [{"text": t, "label": float(y)} for t, y in zip(TEXTS, LABELS)],
        "extra columns": pd.DataFrame({"text": TEXTS, "label": LABELS, "note": ["a", "b"], "example_id": [9, 9]}),
    }
    for name, targets in same.items():
        assert torch.equal(pipe.scores(targets), reference), name


def test_a_one_row_dataframe_is_one_target_not_its_column_names(pipe):
    frame = pd.DataFrame({"text": ["w5 w7 w9"], "label": [1]})
    out = pipe(frame, top_k=2)
    assert isinstance(out, list) and len(out) == 1
    assert out[0]["label"] == 1 and out[0]["label_source"] == "given"
    assert out[0]["proponents"] == pipe({"text": "w5 w7 w9", "label": 1}, top_k=2)["proponents"]


def test_single_and_list_targets_return_one_dict_or_a_list(pipe):
    assert isinstance(pipe("w5 w7", top_k=1), dict)
    assert isinstance(pipe({"text": "w5 w7"}, top_k=1), dict)
    assert isinstance(pipe(["w5 w7"], top_k=1), list)
    assert isinstance(pipe({"text": ["w5 w7"]}, top_k=1), list)


def test_a_missing_label_nan_or_none_is_explained_against_the_prediction_and_says_so(pipe):
    _, predicted, _ = pipe.prepare_targets(TEXTS)
    for targets in (pd.DataFrame({"text": TEXTS, "label": [1, None]}), [{"text": TEXTS[0], "label": 1},
                    {"text": TEXTS[1], "label": float("nan")}], {"text": TEXTS, "label": [1, None]}):
        _, labels, sources = pipe.prepare_targets(targets)
        assert labels.tolist() == [1, int(predicted[1])] and sources == ["given", "predicted"]


def test_each_target_keeps_its_given_label_and_the_others_get_the_prediction(pipe):
    _, predicted, _ = pipe.prepare_targets(TEXTS)
    _, labels, sources = pipe.prepare_targets([{"text": TEXTS[0], "label": 1 - int(predicted[0])}, {"text": TEXTS[1]}])
    assert labels.tolist() == [1 - int(predicted[0]), int(predicted[1])]
    assert sources == ["given", "predicted"]


@pytest.mark.parametrize("targets, message", [
    (b"w5 w7", "targets: an unsupported type \\(got bytes\\)"),
    (3, "targets: an unsupported type \\(got int\\)"),
    (2.5, "targets: an unsupported type \\(got float\\)"),
    (None, "targets is None"),
    ([], "targets: an empty list"),
    ({}, "targets: an empty dict"),
    (pd.DataFrame({"text": []}), "targets: an empty DataFrame"),
    (Dataset.from_dict({"text": []}), "targets: an empty Dataset"),
    (["w5", {"text": "w6"}], "targets: a list mixing dict and text targets"),
    ([["w5"]], "targets: a list holding items of type list"),
    ({"text": ["w5", "w6"], "label": [1]}, "lists differ in length \\('label' has 1, 'text' has 2\\)"),
    ({"text": ["w5", "w6"], "label": 1}, "needs a list for every key, but 'label' holds a int"),
    ({"sentence": "w5"}, "target 0 has neither input_ids nor a 'text' key"),
    (pd.DataFrame({"sentence": ["w5"]}), "neither input_ids nor a 'text' column"),
    ({"text": 5}, "targets: a dict whose 'text' is neither text nor a list of texts \\(got int\\)"),
    ([{"text": 5}], "target 0 has a 'text' of type int, not text"),
    (pd.DataFrame({"text": ["w5", None]}), "row 1 has a 'text' of type NoneType"),
    ({"text": "w5", "label": 0.5}, "the label 0.5; labels are class indices"),
    ({"text": "w5", "label": True}, "a bool"),
    ({"text": "w5", "label": "positive"}, "the label 'positive', which is none of the model's classes"),
    ({"input_ids": [[1.5, 2.0]]}, "input_ids must hold integer token ids"),
    ({"input_ids": [[1, 2], [3]]}, "input_ids must be a list of token ids"),
    ({3: "w5"}, "keys must be column names"),
    ([{"input_ids": [2, 99, 3]}], "targets hold token ids \\[99\\] outside the model's vocabulary \\(0 .. 63\\)"),
    (pd.DataFrame({"input_ids": [0]}), "targets: row 0 has input_ids 0; give one non-empty list"),
    ([{"input_ids": False}], "target 0 has input_ids False; give one non-empty list of integer token ids"),
    ([{"input_ids": [2, 7, 3], "attention_mask": [1, 1]}], "target 0 has 2 attention_mask for 3 input_ids"),
])
def test_anything_else_is_refused_naming_the_argument(pipe, targets, message):
    with pytest.raises(th.TurnoverError, match=message):
        pipe(targets)


def test_the_normaliser_names_the_argument_it_checks():
    with pytest.raises(th.TurnoverError, match="validation: an unsupported type \\(got bytes\\)"):
        normalize_targets(b"x", argument="validation")
