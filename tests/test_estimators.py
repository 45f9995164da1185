"""The estimator registry: a new estimator is one class and one register_estimator call, and the pipeline, the CLI
and the report use it with no other change."""

import csv

import pytest
import torch
from datasets import load_from_disk

import turnover_hf as th
from turnover_hf import report
from turnover_hf.cli import parsers
from turnover_hf.errors import TurnoverError
from turnover_hf.estimators import (
    Estimator, EstimatorContext, estimator_names, get_estimator, resolve_estimator, unregister_estimator,
)

from conftest import tiny_bert, token_task
from test_cli import in_process, trained  # noqa: F401 - the CLI's trained model fixture


class TokenOverlap(Estimator):
    """A toy: how many distinct token ids a training example shares with the target (a lexical baseline)."""

    def __init__(self, model):
        self.model, self.device, self.tokens = model, next(model.parameters()).device, None

    def prepare(self, train, collator):
        self.tokens = {int(i): set(ids) for i, ids in zip(train["example_id"], train["input_ids"])}
        return True

    def scores(self, targets, labels, example_ids):
        rows = [set(row.tolist()) for row in targets["input_ids"]]
        return torch.tensor([[float(len(self.tokens[int(i)] & row)) for row in rows] for i in example_ids])

    def self_scores(self, batch, labels, example_ids):
        return torch.tensor([float(len(self.tokens[int(i)])) for i in example_ids])


def overlaps(train, targets):
    return torch.tensor([[float(len(set(a) & set(b))) for b in targets["input_ids"]] for a in train["input_ids"]])


@pytest.fixture(scope="module", autouse=True)
def same_label():
    th.register_estimator("token-overlap", description="distinct token ids shared with the target.",
                          definition="how many distinct tokens the example shares with the target.")(
        lambda context: TokenOverlap(context.model))
    yield
    unregister_estimator("token-overlap")


def test_a_registered_estimator_scores_through_the_pipeline():
    train = th.add_example_ids(token_task(12, seed=0)).shuffle(seed=3)  # rows out of id order
    pipe = th.InfluencePipeline(tiny_bert(), train_dataset=train, estimator="token-overlap", chunk_size=5)
    targets = token_task(3, seed=1)
    expected = overlaps(train, targets)[torch.argsort(torch.tensor(train["example_id"]))]  # rows by training id
    assert pipe.estimator == "token-overlap" and torch.equal(pipe.scores(targets, example_ids=range(12)), expected)
    own = pipe.self_influence()
    assert own["self_influence"] == [float(len(set(ids))) for ids in own["input_ids"]]
    top = pipe(targets, top_k=2)[0]
    assert [p["score"] for p in top["proponents"]] == sorted(expected[:, 0].tolist(), reverse=True)[:2]
    assert "token-overlap" in estimator_names() and "auto" in estimator_names()


def test_a_registered_estimator_runs_from_the_cli_and_the_report(trained, capsys, tmp_path):  # noqa: F811
    root, _ = trained
    assert in_process(root, "self-influence", "--model", "out/model", "--estimator", "token-overlap", "--output",
                      tmp_path / "si.csv") == 0
    with open(tmp_path / "si.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 40 and all(float(r["self_influence"]) >= 1 for r in rows)
    pipe = th.InfluencePipeline(str(root / "out" / "model"), train_dataset=load_from_disk(root / "out" / "train"),
                                estimator="token-overlap")
    page = report.render_report(explanations=pipe(["w5 w9 w17"], top_k=2), suspects=pipe.self_influence(),
                                estimator=pipe.estimator)
    assert "how many distinct tokens the example shares" in page


def test_unknown_names_and_misplaced_options_are_refused():
    with pytest.raises(TurnoverError, match="estimator must be one of .*token-overlap"):
        get_estimator("no-such-estimator")
    train = th.add_example_ids(token_task(8, seed=0))
    with pytest.raises(TurnoverError, match="takes no options"):
        th.InfluencePipeline(tiny_bert(), train_dataset=train, estimator="token-overlap", options={"x": 1})
    with pytest.raises(TurnoverError, match="options of the .influence. estimator were given"):
        th.InfluencePipeline(tiny_bert(), train_dataset=train, estimator="token-overlap", influence_options={"solver": "direct"})


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
    pipe = th.InfluencePipeline(tiny_bert(), train_dataset=train, options=th.InfluenceOptions(sketch_dim=16))
    assert pipe.estimator == "influence" and pipe.scorer.sketch_dim == 16
    with pytest.warns(DeprecationWarning, match="sketch_dim"):  # the old name still works, and says the new one
        old = th.InfluencePipeline(tiny_bert(), train_dataset=train, influence_options={"projection_dim": 16})
    assert old.scorer.sketch_dim == 16
    root, _ = trained
    assert in_process(root, "explain", "--model", "out/model", "--text", "w5 w6", "--estimator", "turnover",
                      "--damping_factor", "0.5") == 1
    assert "'turnover' takes no options" in (err := capsys.readouterr().err) and "'influence' and 'projected'" in err
    flags = {action.dest: action.help for action in parsers()[1]["explain"]._actions}
    assert "projection_seed" in flags and "sketch_dim" in flags  # one meaning per flag: no deprecated name
    assert "InfluenceOptions default 0.1" in flags["damping_factor"] and "ProjectedOptions default 0.1" in flags["damping_factor"]
    assert "ProjectedOptions default 4096" in flags["projection_dim"] and "InfluenceOptions" not in flags["projection_dim"]
