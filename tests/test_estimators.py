"""The estimator registry: a new estimator is one class and one register_estimator call, and the pipeline, the CLI
and the report use it with no other change."""

import csv

import pytest
import torch
from datasets import load_from_disk

import turnover_hf as th
from turnover_hf import cli, report
from turnover_hf.errors import TurnoverError
from turnover_hf.estimators import (
    Estimator, EstimatorContext, estimator_names, get_estimator, resolve_estimator, unregister_estimator,
)

from conftest import tiny_bert, token_task
from test_cli import in_process, trained  # noqa: F401 - the CLI's trained model fixture


class SameLabel(Estimator):
    """A toy estimator: +1 when the training example's label equals the target's, else -1 (a class prior)."""

    def __init__(self, model):
        self.model, self.device, self.labels = model, next(model.parameters()).device, None

    def prepare(self, train, collator):
        self.labels = dict(zip(train["example_id"], train["labels"]))
        return True

    def scores(self, targets, labels, example_ids):
        own = torch.tensor([self.labels[int(i)] for i in example_ids])
        return (own[:, None] == torch.as_tensor(labels)[None, :]).float() * 2 - 1

    def self_scores(self, batch, labels, example_ids):
        return torch.ones(len(example_ids))


@pytest.fixture(scope="module", autouse=True)
def same_label():
    th.register_estimator("same-label", description="+1 for the target's class, -1 for the others.",
                          definition="whether the example shares the target's label (+1) or not (-1).")(
        lambda context: SameLabel(context.model))
    yield
    unregister_estimator("same-label")


def test_a_registered_estimator_scores_through_the_pipeline():
    train = th.add_example_ids(token_task(12, seed=0))
    pipe = th.InfluencePipeline(tiny_bert(), train_dataset=train, estimator="same-label", chunk_size=5)
    targets = token_task(3, seed=1)
    expected = (torch.tensor(train["labels"])[:, None] == torch.tensor(targets["labels"])[None]).float() * 2 - 1
    assert pipe.estimator == "same-label" and torch.equal(pipe.scores(targets), expected)
    assert pipe.self_influence()["self_influence"] == [1.0] * 12
    top = pipe(targets, top_k=2)[0]
    assert all(row["labels"] == targets["labels"][0] for row in top["proponents"])
    assert "same-label" in estimator_names() and "auto" in estimator_names()


def test_a_registered_estimator_runs_from_the_cli_and_the_report(trained, capsys, tmp_path):  # noqa: F811
    root, _ = trained
    assert in_process(root, "self-influence", "--model", "out/model", "--estimator", "same-label", "--output",
                      tmp_path / "si.csv") == 0
    with open(tmp_path / "si.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 40 and {float(r["self_influence"]) for r in rows} == {1.0}
    pipe = th.InfluencePipeline(str(root / "out" / "model"), train_dataset=load_from_disk(root / "out" / "train"),
                                estimator="same-label")
    page = report.render_report(explanations=pipe(["w5 w9 w17"], top_k=2), suspects=pipe.self_influence(),
                                estimator=pipe.estimator)
    assert "whether the example shares the target" in page


def test_unknown_names_and_misplaced_options_are_refused():
    with pytest.raises(TurnoverError, match="estimator must be one of .*same-label"):
        get_estimator("no-such-estimator")
    train = th.add_example_ids(token_task(8, seed=0))
    with pytest.raises(TurnoverError, match="takes no options"):
        th.InfluencePipeline(tiny_bert(), train_dataset=train, estimator="same-label", options={"x": 1})
    with pytest.raises(TurnoverError, match="options of the .influence. estimator were given"):
        th.InfluencePipeline(tiny_bert(), train_dataset=train, estimator="same-label", influence_options={"solver": "direct"})


def test_auto_asks_the_registered_rules_in_priority_order():
    model = tiny_bert()
    spec, reason = resolve_estimator("auto", EstimatorContext([model], None, 8))
    assert spec.name == "influence" and "classifier" in reason
    spec, reason = resolve_estimator("auto", EstimatorContext([model, tiny_bert(seed=1)], None, 8))
    assert spec.name == "turnover" and "ensemble" in reason
    spec, _ = resolve_estimator("auto", EstimatorContext([model], None, 8, state_dirs={"hydra": "somewhere"}))
    assert spec.name == "hydra"


def test_an_options_dataclass_picks_its_estimator_and_the_cli_makes_flags_of_it(trained, capsys):  # noqa: F811
    train = th.add_example_ids(token_task(8, seed=0))
    with pytest.raises(TurnoverError, match="options of the 'influence' estimator were given.*'turnover'"):
        th.InfluencePipeline([tiny_bert(), tiny_bert(seed=1)], train_dataset=train, options=th.InfluenceOptions(solver="direct"))
    pipe = th.InfluencePipeline(tiny_bert(), train_dataset=train, options=th.InfluenceOptions(projection_dim=16))
    assert pipe.estimator == "influence" and pipe.scorer.projection_dim == 16
    root, _ = trained
    assert in_process(root, "explain", "--model", "out/model", "--text", "w5 w6", "--estimator", "turnover",
                      "--damping_factor", "0.5") == 1
    assert "options of the 'influence' estimator" in capsys.readouterr().err
