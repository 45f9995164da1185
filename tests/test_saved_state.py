"""The registry owns every estimator's saved state: a new estimator with state is one class plus one
``register_estimator(..., saved_state=SavedState(...))`` call, and checkpoints save, carry and clear its folder with
no other change; a save never leaves any estimator's state that belongs to other weights."""

import json
import os

import pytest
import torch

import turnover_hf as th
from turnover_hf.errors import TurnoverError
from turnover_hf.estimators import (
    Estimator, SavedState, attach_fitted, fitted_of, register_estimator, saved_states, unregister_estimator,
)
from turnover_hf.fingerprints import weights_fingerprint

from conftest import tiny_bert, token_task, with_bottleneck

TOY = "token-counts"
TOY_STATE = SavedState("token_counts", "token_counts.json")


class TokenCounts(Estimator):
    """A toy estimator with state: how often each training example's tokens occur in the training set (fitted),
    shared with the target. Its fit is a JSON file; it records the weights it belongs to like every state must."""

    def __init__(self, model, counts=None, fitted_on=None):
        self.model, self.device = model, next(model.parameters()).device
        self.counts, self.fitted_on, self.fits = counts, fitted_on, 0

    def prepare(self, train, collator):
        if self.counts is not None:
            return False
        self.counts = {}
        for ids in train["input_ids"]:
            for token in set(ids):
                self.counts[str(token)] = self.counts.get(str(token), 0) + 1
        self.rows = {int(i): set(ids) for i, ids in zip(train["example_id"], train["input_ids"])}
        self.fitted_on, self.fits = weights_fingerprint(self.model), self.fits + 1
        attach_fitted(self.model, TOY, self)
        return True

    def save(self, folder):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "counts.json"), "w") as handle:
            json.dump(self.counts, handle)
        with open(os.path.join(folder, TOY_STATE.meta_name), "w") as handle:  # metadata last
            json.dump({"weights_fingerprint": self.fitted_on}, handle)

    @classmethod
    def load(cls, model, folder):
        with open(os.path.join(folder, "counts.json")) as handle:
            counts = json.load(handle)
        with open(os.path.join(folder, TOY_STATE.meta_name)) as handle:
            return cls(model, counts, json.load(handle)["weights_fingerprint"])

    def scores(self, targets, labels, example_ids):
        rows = [set(row.tolist()) for row in targets["input_ids"]]
        return torch.tensor([[float(sum(self.counts.get(str(t), 0) for t in row)) for row in rows]
                             for _ in example_ids])

    def self_scores(self, batch, labels, example_ids):
        return torch.zeros(len(example_ids))


def build(context):
    folder = context.saved_folder()
    return TokenCounts.load(context.model, folder) if folder else TokenCounts(context.model)


@pytest.fixture(scope="module", autouse=True)
def toy_with_state():
    register_estimator(TOY, description="token counts (a toy with saved state)", definition="shared token counts.",
                       saved_state=TOY_STATE)(build)
    yield
    unregister_estimator(TOY)


def patched(seed=0):
    return th.patch_model(with_bottleneck(tiny_bert(seed=seed)), th.TurnoverConfig(seed=3), freeze_leaking=True).eval()


def nudge(model):
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(0.01)


def test_a_toy_estimators_state_is_saved_loaded_carried_and_cleared_through_the_checkpoint(tmp_path):
    train = th.add_example_ids(token_task(10, seed=0))
    model = patched()
    model.save_pretrained(tmp_path / "ckpt")
    pipe = th.InfluencePipeline(str(tmp_path / "ckpt"), train_dataset=train, estimator=TOY, save_fit=True)
    pipe.fit()
    assert pipe.scorer.fits == 1 and os.path.isfile(tmp_path / "ckpt" / "token_counts" / "counts.json")

    again = th.InfluencePipeline(str(tmp_path / "ckpt"), train_dataset=train, estimator=TOY).fit()
    assert again.scorer.fits == 0 and again.scorer.counts == pipe.scorer.counts  # loaded, not fitted again

    loaded = th.load_influence_ready(tmp_path / "ckpt")
    loaded.save_pretrained(tmp_path / "copy")  # same weights: the state comes along
    assert json.loads((tmp_path / "copy" / "token_counts" / "counts.json").read_text()) == pipe.scorer.counts
    nudge(loaded)
    loaded.save_pretrained(tmp_path / "copy")  # other weights: the state that belonged to the old ones is gone
    assert not os.path.exists(tmp_path / "copy" / "token_counts")

    fitted = patched(seed=1)  # a model carrying a fit writes it, and a plain save over it clears it
    TokenCounts(fitted).prepare(th.InfluencePipeline(fitted, train_dataset=train, estimator=TOY)._train_features, None)
    assert TOY in fitted_of(fitted)
    fitted.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "token_counts" / TOY_STATE.meta_name).read_text())
    assert meta["weights_fingerprint"] == weights_fingerprint(fitted)
    patched(seed=2).save_pretrained(tmp_path / "ckpt")
    assert not os.path.exists(tmp_path / "ckpt" / "token_counts")


def _plant(folder, state, fingerprint):
    os.makedirs(folder / state.folder, exist_ok=True)
    (folder / state.folder / state.meta_name).write_text(json.dumps({"weights_fingerprint": fingerprint,
                                                                      "parameters": []}))
    (folder / state.folder / "payload.bin").write_bytes(b"x")


@pytest.mark.parametrize("name", sorted(saved_states()) + [TOY])
def test_no_estimators_state_survives_a_save_of_other_weights(name, tmp_path):
    """For every registered estimator with state (the built-in ones and the toy): a save into a folder holding a
    state of other weights removes it; a model loaded with a state of its own weights carries it to a new folder."""
    state = {**saved_states(), TOY: TOY_STATE}[name]
    model = patched()
    model.save_pretrained(tmp_path / "ckpt")
    _plant(tmp_path / "ckpt", state, "weights of another model")
    patched(seed=1).save_pretrained(tmp_path / "ckpt")
    assert not os.path.exists(tmp_path / "ckpt" / state.folder), f"{name}'s stale {state.folder}/ was kept"

    loaded = th.load_influence_ready(tmp_path / "ckpt")
    names = [] if not state.tracked_only else [n for n, p in loaded.named_parameters() if p.requires_grad]
    _plant(tmp_path / "ckpt", state, weights_fingerprint(loaded, names if state.tracked_only else None))
    if state.tracked_only:  # the metadata lists the tracked parameters its fingerprint covers
        meta_path = tmp_path / "ckpt" / state.folder / state.meta_name
        meta = json.loads(meta_path.read_text())
        meta_path.write_text(json.dumps({**meta, "parameters": [{"name": n} for n in names]}))
    loaded.save_pretrained(tmp_path / "elsewhere")
    assert (tmp_path / "elsewhere" / state.folder / "payload.bin").read_bytes() == b"x"


def test_a_saved_projected_fit_of_old_weights_is_cleared_and_the_next_pipeline_fits_again(tmp_path):
    """The class of bug the trust issue found: a stale projected/ kept by a save made the next pipeline refuse."""
    train = th.add_example_ids(token_task(12, seed=0))
    model = patched()
    model.save_pretrained(tmp_path / "ckpt")
    options = th.ProjectedOptions(projection_dim=16, show_progress=False)
    th.InfluencePipeline(str(tmp_path / "ckpt"), train_dataset=train, estimator="projected", options=options,
                         save_fit=True).fit()
    assert os.path.isfile(tmp_path / "ckpt" / "projected" / "projected.json")
    trained_further = th.load_influence_ready(tmp_path / "ckpt")
    nudge(trained_further)
    trained_further.save_pretrained(tmp_path / "ckpt")
    assert not os.path.exists(tmp_path / "ckpt" / "projected")
    pipe = th.InfluencePipeline(str(tmp_path / "ckpt"), train_dataset=train, estimator="projected", options=options)
    assert pipe.scores(token_task(2, seed=5), example_ids=range(12)).shape == (12, 2)


def test_names_and_state_folders_are_not_registered_twice():
    with pytest.raises(TurnoverError, match="registered already.*unregister_estimator"):
        register_estimator(TOY, description="again", definition="again")(build)
    with pytest.raises(TurnoverError, match="registered already"):
        register_estimator("influence", description="mine", definition="mine")(build)
    with pytest.raises(TurnoverError, match="state folder 'influence' belongs to the estimator 'influence'"):
        register_estimator("other", description="x", definition="x", saved_state=SavedState("influence", "x.json"))
    with pytest.raises(TurnoverError, match="plain file or folder name"):
        SavedState("a/b", "meta.json")
    assert TOY in saved_states() and saved_states()["influence"].folder == "influence"


def test_state_dir_names_the_folder_of_whichever_estimator_is_chosen(tmp_path):
    train = th.add_example_ids(token_task(10, seed=0))
    model = patched()
    pipe = th.InfluencePipeline(model, train_dataset=train, estimator=TOY, state_dir=tmp_path / "mine").fit()
    assert pipe.scorer.fits == 1 and os.path.isfile(tmp_path / "mine" / TOY_STATE.meta_name)
    again = th.InfluencePipeline(model, train_dataset=train, estimator=TOY, state_dir=tmp_path / "mine").fit()
    assert again.scorer.fits == 0  # loaded from the folder it was given
    with pytest.raises(TurnoverError, match="keeps no saved state"):
        th.InfluencePipeline(model, train_dataset=train, estimator="turnover", state_dir=tmp_path / "x")
    with pytest.raises(TurnoverError, match="name two folders"):
        th.InfluencePipeline(model, train_dataset=train, estimator="influence", state_dir=tmp_path / "a",
                             influence_dir=tmp_path / "b")


def test_a_fitted_estimator_given_to_save_pretrained_is_saved_by_its_registered_name(tmp_path):
    train = th.add_example_ids(token_task(10, seed=0))
    model = patched()
    scorer = TokenCounts(model)
    scorer.prepare(th.InfluencePipeline(model, train_dataset=train, estimator=TOY)._train_features, None)
    attach_fitted(model, TOY, None)  # not carried: given to this save only
    model.save_pretrained(tmp_path / "ckpt", fitted={TOY: scorer})
    assert json.loads((tmp_path / "ckpt" / "token_counts" / "counts.json").read_text()) == scorer.counts
    model.save_pretrained(tmp_path / "ckpt")  # saved again into its own folder: the state of these weights stays
    assert json.loads((tmp_path / "ckpt" / "token_counts" / "counts.json").read_text()) == scorer.counts
    nudge(model)
    model.save_pretrained(tmp_path / "ckpt")  # other weights now: the state is gone
    assert not os.path.exists(tmp_path / "ckpt" / "token_counts")
