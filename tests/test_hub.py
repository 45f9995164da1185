"""From the Hub in one line: a checkpoint that names its training data and carries its fitted influence function,
tested on local folders standing in for repositories (a save_to_disk dataset, and a Hugging Face cache snapshot
that huggingface_hub resolves offline). Pushing itself needs the network and is not run here."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from datasets import load_from_disk

import turnover_hf as th
from turnover_hf.errors import StaleFitError

from conftest import text_task, word_tokenizer
from test_training_set import _train

TARGET = "w5 w9 w12 w30"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    tokenizer = word_tokenizer(root / "tok")
    text_task(32).save_to_disk(str(root / "data"))
    _, trained = _train(root, load_from_disk(str(root / "data")), tokenizer)
    tokenizer.save_pretrained(trained)
    pipe = th.InfluencePipeline(trained)  # no train_dataset: loaded from the recorded folder
    assert pipe.estimator == "influence" and pipe.scorer.factors is None
    first = pipe(TARGET, top_k=3)  # fits the influence function
    pipe.model.save_pretrained(root / "published")  # carries the fit
    tokenizer.save_pretrained(root / "published")
    return root, first


def test_the_saved_checkpoint_carries_the_fit_and_the_card_says_so(published):
    root, _ = published
    assert os.path.isfile(root / "published" / "influence" / "influence.json")
    card = (root / "published" / "README.md").read_text()
    assert "Included: the fitted state of the influence estimator (`influence/`)" in card and str(root / "data") in card


def test_a_downstream_user_explains_without_refitting(published):
    root, first = published
    pipe = th.InfluencePipeline(str(root / "published"))
    assert pipe.scorer.factors is not None  # loaded, not fitted
    again = pipe(TARGET, top_k=3)
    assert [p["example_id"] for p in again["proponents"]] == [p["example_id"] for p in first["proponents"]]
    assert again["proponents"][0]["score"] == pytest.approx(first["proponents"][0]["score"], rel=1e-5)


def test_three_lines_from_a_hub_repository(published, tmp_path):
    """huggingface_hub resolves 'someone/tiny-influence-ready' from its cache (offline): the real snapshot code path."""
    root, first = published
    repo = tmp_path / "cache" / "models--someone--tiny-influence-ready"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(root / "published", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = ("import turnover_hf as th\n"
            "pipe = th.InfluencePipeline('someone/tiny-influence-ready')\n"
            f"print(pipe({TARGET!r}, top_k=1)['proponents'][0]['example_id'])\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.path.dirname(os.path.dirname(th.__file__))}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.strip().splitlines()[-1]) == first["proponents"][0]["example_id"]


def test_a_fit_of_other_weights_is_refused(published, tmp_path):
    root, _ = published
    other = th.load_influence_ready(root / "published")
    with torch.no_grad():
        other.classifier.weight.add_(0.1)
    other.save_pretrained(tmp_path / "other")
    shutil.copytree(root / "published" / "influence", tmp_path / "other" / "influence")  # a foreign fit beside it
    with pytest.raises(StaleFitError, match="weights differ from those the influence function"):
        th.InfluencePipeline(str(tmp_path / "other"), tokenizer=word_tokenizer(tmp_path / "tok"))


def test_a_fit_of_another_training_set_is_refused(published, tmp_path):
    root, _ = published
    shutil.copytree(root / "published", tmp_path / "ckpt")
    meta_path = tmp_path / "ckpt" / "influence" / "influence.json"
    meta = json.loads(meta_path.read_text())
    meta["training_set_fingerprint"] = "f" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StaleFitError, match="fitted on another training set"):
        th.InfluencePipeline(str(tmp_path / "ckpt"))


def test_a_fit_made_stale_by_further_training_is_not_saved(published, tmp_path, caplog):
    root, _ = published
    pipe = th.InfluencePipeline(str(root / "published"))
    with torch.no_grad():
        pipe.model.classifier.weight.mul_(1.5)  # "training" after the fit
    with caplog.at_level(logging.WARNING, logger="turnover_hf.checkpoint.save"):
        pipe.model.save_pretrained(tmp_path / "later")
    assert not (tmp_path / "later" / "influence").exists() and "weights changed since" in caplog.text
    with pytest.raises(StaleFitError, match="weights changed since"):
        pipe.scorer.save(tmp_path / "fit")


def test_a_loaded_model_saved_elsewhere_keeps_its_fit_unless_trained_further(published, tmp_path):
    root, _ = published
    model = th.load_influence_ready(root / "published")
    model.save_pretrained(tmp_path / "mine")  # e.g. before push_to_hub("me/...")
    assert (tmp_path / "mine" / "influence" / "influence.json").exists()
    with torch.no_grad():
        model.classifier.weight.add_(0.01)
    model.save_pretrained(tmp_path / "trained-further")
    assert not (tmp_path / "trained-further" / "influence").exists()
