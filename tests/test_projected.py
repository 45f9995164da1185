"""The projected influence function (estimator 'projected'): equal to the exact fit when nothing is projected, close
to it when projected, deterministic projections, one pass sharded over processes, causal LMs per token, saved
fits that load only for their model, and auto's choices."""

import logging
import os

import pytest
import torch
from datasets import Dataset

import turnover_hf as th
from turnover_hf.estimators.projected.scorer import split_trainable
from conftest import VOCAB, tiny_bert, tiny_gpt2_lm, tiny_llama_lm, torchrun, with_bottleneck, with_lora
from test_cli import in_process, trained  # noqa: F401
from test_pipeline import setup  # noqa: F401  (the patched tiny model, tokenizer and training set)

WHOLE = 10**6  # a projection_dim no tracked layer needs: every side kept whole


def _pipe(model, tokenizer, train, **options):
    return th.InfluencePipeline(model, tokenizer, train_dataset=train, estimator="projected",
                                options={"show_progress": False, **options})


@pytest.mark.parametrize("design", ["eigen", "sketch"])
def test_without_projection_it_is_the_exact_influence_function(setup, design):
    model, tokenizer, train = setup
    exact = th.InfluencePipeline(model, tokenizer, train_dataset=train, estimator="influence")
    whole = _pipe(model, tokenizer, train, projection_dim=WHOLE, side_dim=WHOLE, design=design)
    targets = train.select(range(6))
    e, w = exact.scores(targets), whole.scores(targets)
    layers = whole.scorer.layers
    if design == "sketch":
        assert all(layer.inputs is None and layer.outputs is None for layer in layers)
    else:  # every side whole, rotated into its eigenbasis, and every Kronecker pair kept: an orthogonal change of basis
        assert all(layer.inputs.shape == (layer.in_features,) * 2 and layer.outputs.shape == (layer.out_features,) * 2
                   for layer in layers)
        assert whole.scorer.dim == sum(layer.dim for layer in layers)
    assert torch.allclose(e, w, atol=1e-5 * float(e.abs().max()))
    own_e = torch.tensor(exact.self_influence()["self_influence"])
    own_w = torch.tensor(whole.self_influence()["self_influence"])
    assert torch.allclose(own_e, own_w, atol=1e-5 * float(own_e.abs().max()))


def test_projected_scores_follow_the_exact_ones_and_improve_with_k(setup):
    model, tokenizer, train = setup
    targets = train.select(range(8))
    exact = th.InfluencePipeline(model, tokenizer, train_dataset=train, estimator="influence",
                                 influence_options={"damping_factor": 10.0}).scores(targets)

    def agreement(dim, design="eigen"):
        scores = _pipe(model, tokenizer, train, projection_dim=dim, damping_factor=10.0, design=design).scores(targets)
        return float(torch.corrcoef(torch.stack([scores.flatten(), exact.flatten()]))[0, 1])

    small, large = agreement(64), agreement(600)
    assert large > small and large > 0.5
    # the curvature's own eigenbasis keeps more of the exact fit than random signs of the same k
    assert small > agreement(64, "sketch") and large > agreement(600, "sketch")


def test_the_eigen_design_keeps_the_pairs_of_largest_curvature():
    from turnover_hf.estimators.projected.projection import LayerProjection, eigen_projections

    def layer(name, n_in, n_out):
        return LayerProjection(name, f"{name}.weight", None, n_in, n_out, None, None)

    rotation = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))[0].double()
    spectrum_in = torch.tensor([5.0, 3.0, 1.0, 0.5], dtype=torch.float64)
    moments = [(rotation @ torch.diag(spectrum_in) @ rotation.T, torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))),
               (torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64)), torch.diag(torch.tensor([10.0], dtype=torch.float64)))]
    layers, selection = eigen_projections([layer("a", 4, 2), layer("b", 2, 1)], moments, budget=4, side_dim=3)
    # sides cut to their 3 leading eigenvectors, largest first: the rotation's columns up to sign
    a, b = layers
    assert a.inputs.shape == (3, 4) and a.outputs.shape == (2, 2) and b.inputs.shape == (2, 2)
    assert torch.allclose((a.inputs.double() @ rotation[:, :3]).abs(), torch.eye(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(a.inputs.double() @ moments[0][0] @ a.inputs.double().T, torch.diag(spectrum_in[:3]), atol=1e-5)
    # products: a (out x in) = [[10, 6, 2], [5, 3, 1]], then b = [[40, 10]] after layer a's 6 coordinates
    assert selection.tolist() == [0, 1, 6, 7]
    assert eigen_projections([layer("a", 4, 2), layer("b", 2, 1)], moments, budget=2, side_dim=3)[1].tolist() == [0, 6]


def test_the_eigen_basis_comes_from_a_spread_sample(setup):
    from turnover_hf.estimators.projected.fitting import basis_batches

    assert basis_batches([8] * 10, 100) == list(range(10))
    spread = basis_batches([8] * 10, 24)
    assert spread == [0, 4, 9] and sum(8 for _ in spread) >= 24
    model, tokenizer, train = setup
    full, part = (th.InfluencePipeline(model, tokenizer, train_dataset=train, estimator="projected", batch_size=4,
                                       options={"show_progress": False, "projection_dim": 128, **more})
                  for more in ({}, {"basis_examples": 4}))
    full.fit(), part.fit()
    full, part = full.scorer, part.scorer
    assert not torch.equal(full.layers[0].inputs, part.layers[0].inputs)
    assert part.dim == full.dim == 128 and len(part.store) == len(train)


def test_projections_are_deterministic_and_sized_by_the_budget(setup):
    model = setup[0]
    specs = th.estimators.projected.scorer.linear_parameters(model)
    from turnover_hf.estimators.projected.projection import layer_projections

    a = layer_projections(model, specs, 300, seed=1)
    b = layer_projections(model, specs, 300, seed=1)
    c = layer_projections(model, specs, 300, seed=2)
    assert 0 < sum(layer.dim for layer in a) <= 300
    projected = [(x, y, z) for x, y, z in zip(a, b, c) if x.inputs is not None]
    assert projected, "the budget cuts at least one side"
    for x, y, z in projected:
        assert torch.equal(x.inputs, y.inputs) and not torch.equal(x.inputs, z.inputs)
        assert set(torch.unique(x.inputs * x.inputs.shape[0] ** 0.5).tolist()) == {-1.0, 1.0}
    with pytest.raises(th.TurnoverError, match="projection_dim"):
        layer_projections(model, specs, 2, seed=1)


def test_the_saved_fit_loads_back_only_for_its_model(setup, tmp_path):
    model, tokenizer, train = setup
    pipe = _pipe(model, tokenizer, train, projection_dim=256)
    targets = train.select(range(4))
    before = pipe.scores(targets)
    folder = tmp_path / "fit"
    pipe.scorer.save(folder)
    assert sorted(os.listdir(folder)) == ["example_ids-00000-of-00001.npy", "gradients-00000-of-00001.npy",
                                          "projected.json", "projected_curvature.safetensors"]
    loaded = th.InfluencePipeline(model, tokenizer, train_dataset=train, estimator="projected",
                                  options={"projection_dim": 256})
    loaded.scorer = th.ProjectedInfluenceScorer.load(model, folder)
    loaded._prepared = True
    assert torch.equal(loaded.scores(targets), before)
    with pytest.raises(th.TurnoverError, match="unknown|not in the training set|never"):
        loaded.scorer.scores(*_target_batch(pipe, targets), torch.tensor([0, 999]))
    os.rename(folder / "gradients-00000-of-00001.npy", tmp_path / "moved.npy")
    with pytest.raises(th.TurnoverError, match="incomplete"):
        th.ProjectedInfluenceScorer.load(model, folder)
    os.rename(tmp_path / "moved.npy", folder / "gradients-00000-of-00001.npy")
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(0.01)
    with pytest.raises(th.errors.StaleFitError, match="weights differ"):
        th.ProjectedInfluenceScorer.load(model, folder)



def test_a_store_dir_holding_a_fit_is_never_overwritten(setup, tmp_path):
    model, tokenizer, train = setup
    folder = tmp_path / "store"
    folder.mkdir()  # an existing empty folder is fine
    first = _pipe(model, tokenizer, train, projection_dim=64, store_dir=str(folder))
    first.scores(train.select([0]))
    first.scorer.save(folder)  # the fit saved where its gradients are
    kept = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    again = _pipe(model, tokenizer, train, projection_dim=128, store_dir=str(folder))
    with pytest.raises(th.TurnoverError, match="already holds a projected-gradient store.*new or empty folder"):
        again.scores(train.select([0]))
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == kept
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(th.TurnoverError, match="is a file, not a folder"):
        _pipe(model, tokenizer, train, projection_dim=64, store_dir=str(tmp_path / "a_file")).scores(train.select([0]))
    assert (tmp_path / "a_file").read_text() == "mine"

def _target_batch(pipe, targets):
    batch, labels, _ = pipe.prepare_targets(targets)
    return batch, labels


def test_the_pipeline_keeps_the_fit_beside_a_checkpoint_and_refuses_changed_options(setup, tmp_path):
    model, tokenizer, train = setup
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    first = th.InfluencePipeline(str(folder), train_dataset=train, estimator="projected", save_fit=True,
                                 options={"projection_dim": 128, "show_progress": False})
    targets = train.select([3, 5])
    scores = first.scores(targets)
    assert os.path.isfile(folder / "projected" / "projected.json")
    again = th.InfluencePipeline(str(folder), train_dataset=train, estimator="projected", options={"projection_dim": 128})
    assert again.scorer.store is not None  # loaded, not refitted
    assert torch.equal(again.scores(targets), scores)
    with pytest.raises(th.TurnoverError, match="would change it"):
        th.InfluencePipeline(str(folder), train_dataset=train, estimator="projected", options={"projection_dim": 64})


def test_relative_normalisation_divides_by_the_root_of_self_influence(setup):
    model, tokenizer, train = setup
    plain = _pipe(model, tokenizer, train, projection_dim=256).fit()
    relative = _pipe(model, tokenizer, train, projection_dim=256, normalise="relative")
    targets = train.select(range(3))
    ids = torch.tensor(train["example_id"])
    rows = plain.scorer.store.read(ids)
    own = plain.scorer._self_influence(rows)
    assert torch.allclose(relative.scores(targets), (plain.scores(targets).double() / own.sqrt()[:, None]).float(),
                          rtol=1e-5, atol=1e-7)
    with pytest.raises(th.TurnoverError, match="normalise"):
        _pipe(model, tokenizer, train, normalise="softmax")


def _lm_corpus(n=12, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(5, VOCAB, (length - i % 3,), generator=g).tolist() for i in range(n)]
    return th.add_example_ids(Dataset.from_dict({"input_ids": rows}))


def _lora_llama():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama_lm(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.eval()


def test_causal_lm_sequence_and_token_scores_with_peft_lora(caplog):
    model = _lora_llama()
    train = _lm_corpus()
    with caplog.at_level(logging.INFO, logger="turnover_hf.estimators.registry"):
        pipe = th.InfluencePipeline(model, train_dataset=train, options={"show_progress": False, "projection_dim": WHOLE})
    assert pipe.estimator == "projected" and "causal language model" in caplog.text
    assert all(".lora_" in s.name for s in pipe.fit().scorer.specs)
    targets = [{"input_ids": r} for r in _lm_corpus(3, seed=5)["input_ids"]]
    batch = th.CausalLMCollator()(targets)
    ids = torch.tensor(train["example_id"])
    scores = pipe.scorer.scores(batch, batch["labels"], ids)
    per_token = pipe.scorer.token_scores(batch, batch["labels"], ids)
    counted = (batch["labels"][:, 1:] != -100).sum(1)
    # the sequence loss is the mean over counted tokens: its influence is the tokens' sum / count
    assert torch.allclose(per_token.sum(-1) / counted, scores, atol=1e-6 * float(scores.abs().max()) + 1e-9)
    assert per_token[:, :, 0].abs().max() == 0  # the first token is never predicted
    assert len(pipe.self_influence()) == len(train)
    # through the pipeline: the per-token breakdown of an explanation adds up to its sequence score
    out = pipe({"input_ids": targets[0]["input_ids"]}, top_k=2)
    for person in out["proponents"] + out["opponents"]:
        assert person["score_sum"] == pytest.approx(sum(person["token_scores"]))
        assert person["score"] == pytest.approx(person["score_sum"] / len(person["token_scores"]), rel=1e-4, abs=1e-9)



@pytest.mark.parametrize("patched", [True, False])
def test_the_adapters_library_s_lora_matrices_are_tracked_exactly(setup, patched):
    """adapters' LoRA keeps A and B as bare parameters: each is tracked as a Linear without bias (a patched model
    masks the rank units between them); with nothing projected the scores are the exact fit's."""
    _, tokenizer, train = setup
    model = with_lora(tiny_bert())
    if patched:
        model = th.patch_model(model, th.TurnoverConfig(seed=1), freeze_leaking=True)
        model.turnover_config.num_train_examples = len(train)
    exact = th.InfluencePipeline(model, tokenizer, train_dataset=train, estimator="influence")
    whole = _pipe(model, tokenizer, train, projection_dim=WHOLE, side_dim=WHOLE)
    targets = train.select(range(5))
    e, w = exact.scores(targets), whole.scores(targets)
    names = [layer.name for layer in whole.scorer.layers]
    assert sum(name.endswith((".lora_A", ".lora_B")) for name in names) == 8  # 2 layers x query, value x A, B
    assert torch.allclose(w, e, rtol=1e-4, atol=1e-5 * float(e.abs().max()))
    own_e, own_w = (torch.tensor(p.self_influence()["self_influence"]) for p in (exact, whole))
    assert torch.allclose(own_w, own_e, rtol=1e-4, atol=1e-5 * float(own_e.abs().max()))


def test_causal_lms_with_the_adapters_library_s_lora():
    train = _lm_corpus()
    llama = th.patch_model(with_lora(tiny_llama_lm()), th.TurnoverConfig(seed=2))
    llama.turnover_config.num_train_examples = len(train)
    pipe = th.InfluencePipeline(llama, train_dataset=train, options={"show_progress": False})
    assert pipe.estimator == "projected"
    assert all(s.name.endswith((".lora_A", ".lora_B")) for s in pipe.fit().scorer.specs)
    scores = pipe.scores([{"input_ids": r} for r in _lm_corpus(2, seed=5)["input_ids"]])
    assert scores.shape == (len(train), 2) and bool(scores.abs().sum() > 0)
    # GPT-2's merged c_attn multiplies by B as a grouped convolution, never calling the LoRA module: not covered
    gpt2 = th.patch_model(with_lora(tiny_gpt2_lm()), th.TurnoverConfig(seed=2))
    gpt2.turnover_config.num_train_examples = len(train)
    covered, left = split_trainable(gpt2)
    assert not covered and all(".lora_" in name for name in left)
    assert th.InfluencePipeline(gpt2, train_dataset=train).estimator != "projected"

def test_causal_lms_invert_the_curvature_s_diagonal_in_its_eigenbasis(setup, tmp_path):
    """auto: a causal LM's curvature is the diagonal of the full matrix (the same sampled labels: each draw is fixed
    by the example's id, whatever the batches), inverted coordinate by coordinate; a classifier keeps the full one."""
    model, train, collator = _lora_llama(), _lm_corpus(), th.CausalLMCollator()

    def fit(**options):
        return th.ProjectedInfluenceScorer(model, show_progress=False, **options).fit(train, collator)

    diagonal, full = fit(batch_size=4), fit(batch_size=3, curvature="full")
    assert (diagonal.curvature_form, full.curvature_form) == ("diagonal", "full")
    assert diagonal.curvature.shape == (diagonal.dim,)
    assert torch.allclose(diagonal.curvature, torch.diagonal(full.curvature), rtol=1e-4)
    targets = collator([{"input_ids": r} for r in _lm_corpus(3, seed=5)["input_ids"]])
    ids = torch.tensor(train["example_id"])
    rows = diagonal.store.read(ids).double()
    inverse = 1 / (diagonal.curvature + diagonal.damping)
    solved = diagonal.target_gradients(targets, targets["labels"]).double() * inverse
    scores = diagonal.scores(targets, targets["labels"], ids).double()
    assert torch.allclose(scores, rows @ solved.T / len(ids), rtol=1e-4, atol=1e-6 * float(scores.abs().max()))
    assert not torch.allclose(scores.float(), full.scores(targets, targets["labels"], ids), rtol=0.05)
    own = diagonal.self_score_columns([{"example_ids": ids}])[:, 0].double()
    assert torch.allclose(own, (rows.square() * inverse).sum(1) / len(ids), rtol=1e-4)
    diagonal.save(tmp_path / "fit")
    loaded = th.ProjectedInfluenceScorer.load(model, tmp_path / "fit", show_progress=False)
    assert loaded.curvature_form == "diagonal"
    assert torch.equal(loaded.scores(targets, targets["labels"], ids), scores.float())
    classifier = setup[0]
    assert th.ProjectedInfluenceScorer(classifier, projection_dim=64).curvature_form == "full"
    for bad, match in [({"curvature": "diag"}, "curvature must be one of"),
                       ({"curvature": "diagonal", "design": "sketch"}, "needs design='eigen'")]:
        with pytest.raises(th.TurnoverError, match=match):
            th.ProjectedInfluenceScorer(classifier, projection_dim=64, **bad)


def test_training_masks_false_fits_on_the_full_network(setup):
    """A turn-over model's training gradients are taken under each example's own mask (as it was trained), or with
    training_masks=False on the full network: then a stored row is the example's full-network gradient."""
    model, tokenizer, train = setup
    rows = train.select(range(5))
    for masks in (True, False):
        pipe = _pipe(model, tokenizer, train, projection_dim=200, training_masks=masks).fit()
        batch, labels = _target_batch(pipe, rows)
        stored = pipe.scorer.store.read(torch.tensor(rows["example_id"]))
        full = pipe.scorer.target_gradients(batch, labels)
        assert pipe.scorer.masked is masks
        assert torch.allclose(stored, full, rtol=1e-4, atol=1e-6 * float(full.abs().max())) is not masks
    with pytest.raises(th.TurnoverError, match="training_masks"):
        _pipe(model, tokenizer, train, training_masks="no")


def test_two_processes_fit_and_score_as_one(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    results = {}
    for procs in (1, 2):
        result = tmp_path / f"result{procs}.safetensors"
        torchrun(script, procs, os.path.dirname(__file__), tmp_path / "tok", result, tmp_path / f"fit{procs}")
        results[procs] = load_file(result)
        assert sorted(os.listdir(tmp_path / f"fit{procs}"))[:2 * procs] == sorted(
            [f"{kind}-{r:05d}-of-{procs:05d}.npy" for r in range(procs) for kind in ("example_ids", "gradients")])
    assert int(results[2]["procs"]) == 2
    for key in ("scores", "self", "curvature"):
        a, b = results[1][key], results[2][key]
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9 * float(a.abs().max())), key


SHARDED = r"""
import sys, torch
tests, tok, result, folder = sys.argv[1:5]
sys.path.insert(0, tests)
from accelerate import PartialState
import turnover_hf as th
from conftest import text_task, word_tokenizer
from test_turnover import perturbed_top_adapter
state = PartialState(cpu=True)
model = perturbed_top_adapter(6, warn_leaking=False)
train = text_task(40)
model.turnover_config.num_train_examples = len(train)
pipe = th.InfluencePipeline(model, word_tokenizer(tok), train_dataset=train, estimator="projected", batch_size=6,
                            chunk_size=7, options={"projection_dim": 200, "store_dir": folder, "show_progress": False})
scores = pipe.scores(train.select([1, 2, 3]))
own = pipe.self_influence()
if state.is_main_process:
    from safetensors.torch import save_file
    save_file({"scores": scores.contiguous(), "self": torch.tensor(own["self_influence"]),
               "curvature": pipe.scorer.curvature.contiguous(), "procs": torch.tensor(state.num_processes)}, result)
"""


def test_auto_hands_over_to_the_projection_when_the_exact_fit_turns_out_too_large(setup, caplog, tmp_path):
    """Adapters inside the transformer see token sequences: the factorised fit the static estimate expected does not
    apply, and the per-example one exceeds the budget. 'auto' then scores with the projected estimator."""
    _, tokenizer, train = setup
    model = th.patch_model(with_bottleneck(tiny_bert(), reduction_factor=0.125), th.TurnoverConfig(seed=3),
                           freeze_leaking=True)
    model.turnover_config.num_train_examples = len(train)
    scorer = th.InfluenceFunctionScorer(model)
    estimated = scorer.fit_memory_gb(len(train), 2)
    materialised = len(train) * scorer.width * 4 / 2**30
    assert estimated < materialised
    budget = {"max_memory_gb": (estimated + materialised) / 2}
    named = th.InfluencePipeline(model, tokenizer, train_dataset=train, estimator="influence", influence_options=budget)
    with pytest.raises(th.TurnoverError, match="above max_memory_gb.*estimator='projected'"):
        named.scores(train.select([1]))  # asked for by name: refused, naming the fixes
    auto = th.InfluencePipeline(model, tokenizer, train_dataset=train, influence_dir=tmp_path / "influence",
                                influence_options={**budget, "damping_factor": 0.5})
    assert auto.estimator == "influence"  # the estimate fitted the budget
    with caplog.at_level(logging.WARNING):
        scores = auto.scores(train.select([1, 2]))
    assert auto.estimator == "projected" and "'projected' estimator instead" in caplog.text
    assert "Pass projection_dim" not in caplog.text  # the hand-over says why, not what the user could pass
    assert auto.scorer.damping_factor == 0.5  # the options both share carry over
    assert not (tmp_path / "influence").exists()  # the influence function's folder does not get another fit
    direct = th.InfluencePipeline(model, tokenizer, train_dataset=train, estimator="projected",
                                  options={"damping_factor": 0.5})
    assert torch.equal(scores, direct.scores(train.select([1, 2])))


def test_auto_projects_when_the_static_estimate_exceeds_the_budget(setup):
    _, tokenizer, train = setup
    model = tiny_bert()  # every parameter trainable, some not Linear: the projection would leave them out
    exact = th.InfluenceFunctionScorer(model).fit_memory_gb(len(train), 2)
    auto = th.InfluencePipeline(model, tokenizer, train_dataset=train, options={"max_memory_gb": exact / 2})
    assert auto.estimator == "influence"  # not projected: it would drop the embeddings and norms
    linear_only = tiny_bert()
    for name, p in linear_only.named_parameters():
        p.requires_grad_("encoder.layer" in name and ("dense" in name or "query" in name or "key" in name
                                                     or "value" in name) or name.startswith("classifier"))
    exact = th.InfluenceFunctionScorer(linear_only).fit_memory_gb(len(train), 2)
    small = th.InfluencePipeline(linear_only, tokenizer, train_dataset=train, options={"max_memory_gb": exact / 2})
    roomy = th.InfluencePipeline(linear_only, tokenizer, train_dataset=train, options={"max_memory_gb": exact * 2})
    assert small.estimator == "projected" and roomy.estimator == "influence"
    # options for whichever auto picks: a name no estimator takes is refused, not dropped
    with pytest.raises(th.TurnoverError, match=r"\['max_memory_bg'\] are options of no registered estimator"):
        th.InfluencePipeline(linear_only, tokenizer, train_dataset=train, options={"max_memory_bg": exact / 2})


def test_bad_inputs_are_named(setup):
    model, tokenizer, train = setup
    for bad, match in [({"projection_dim": 0}, "projection_dim"), ({"damping_factor": 0}, "damping_factor"),
                       ({"label_samples": 0}, "label_samples"), ({"parameters": ["bert.embeddings.word_embeddings.weight"]},
                                                                 "not the weight or bias")]:
        with pytest.raises(th.TurnoverError, match=match):
            _pipe(model, tokenizer, train, **bad)
    with pytest.raises(th.TurnoverError, match="not options of the 'projected'"):
        _pipe(model, tokenizer, train, solver="direct")
    pipe = _pipe(model, tokenizer, train, projection_dim=64)
    with pytest.raises(th.TurnoverError, match="not fitted"):
        pipe.scorer.scores(*_target_batch(pipe, train.select([0])), torch.tensor([0]))


def test_the_cli_scores_with_it_and_says_so(trained, capsys):  # noqa: F811
    root, _ = trained
    assert in_process(root, "self-influence", "--model", "out/model", "--output", "si_projected.csv",
                      "--estimator", "projected", "--projection_dim", "64", "--show_progress", "false") == 0
    out = capsys.readouterr().out
    assert "scored by the 'projected' estimator" in out
    assert os.path.isfile(os.path.join(root, "out", "model", "projected", "projected.json"))  # kept for next time
    # auto on a budget no exact fit meets: the projection answers, and says so
    assert in_process(root, "self-influence", "--model", "out/model", "--output", "si_auto.csv",
                      "--max_memory_gb", "0.000001") == 0
    assert "scored by the 'projected' estimator" in capsys.readouterr().out


def test_sampled_labels_estimate_the_per_token_gauss_newton_matrix():
    """For one sequence, the fit's curvature from sampled labels approaches sum_t sum_v p_tv g_tv g_tv^T (g_tv: the
    gradient of the summed token loss, the loss training weighs, with token t's label set to v), the Gauss-Newton
    matrix of softmax cross-entropy, computed here by brute force over the vocabulary."""
    from turnover_hf.losses import per_token_loss

    model = _lora_llama()
    sequence = torch.randint(5, VOCAB, (5,), generator=torch.Generator().manual_seed(3)).tolist()
    train = th.add_example_ids(Dataset.from_dict({"input_ids": [sequence]}))
    torch.manual_seed(0)
    # nothing projected (design="sketch" with every side whole): the curvature in the parameters' own coordinates
    scorer = th.ProjectedInfluenceScorer(model, projection_dim=WHOLE, design="sketch", label_samples=1000,
                                         show_progress=False)
    scorer.fit(train, th.CausalLMCollator())
    batch = th.CausalLMCollator()([{"input_ids": sequence}])
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    positions = range(1, len(sequence))
    with torch.no_grad():
        probs = torch.softmax(model(**inputs).logits[0, :-1].float(), -1)  # position t - 1 predicts token t
    columns = []
    for t in positions:
        for v in range(VOCAB):
            column = torch.full((1, len(sequence)), -100)
            column[0, t] = v
            columns.append(column)
    labels = torch.stack(columns, 1)  # (1, (T - 1) V, T)

    def summed_loss(logits, column):
        return per_token_loss(logits, column, shift=True).sum(-1)

    _, g = scorer.grads(inputs, lambda _: labels, summed_loss)
    weights = torch.cat([probs[t - 1] for t in positions]).double()
    exact = torch.einsum("c,cd,ce->de", weights, g[0].double(), g[0].double())
    error = float((scorer.curvature - exact).norm() / exact.norm())
    assert error < 0.25, error
    true_labels = th.ProjectedInfluenceScorer(model, projection_dim=WHOLE, design="sketch", show_progress=False)
    _, g_true = true_labels.grads(inputs, lambda _: batch["labels"][:, None], summed_loss)
    wrong = torch.outer(g_true[0, 0].double(), g_true[0, 0].double())  # the empirical Fisher: not this matrix
    assert float((wrong - exact).norm() / exact.norm()) > 2 * error


# -- classifiers with many classes: sampled labels ---------------------------------------------------------------
HEAD = ["classifier.weight", "classifier.bias", "bert.pooler.dense.weight"]  # a curvature small enough to compare


def _class_batches(num_classes, n=12, batch_size=4, seed=0):
    """Collated batches of random sequences with ``num_classes`` labels and ids 100, 101, ..."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (n, 6), generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    ids = torch.arange(100, 100 + n)
    return [{"input_ids": input_ids[s:s + batch_size], "attention_mask": torch.ones_like(input_ids[s:s + batch_size]),
             "labels": labels[s:s + batch_size], "example_ids": ids[s:s + batch_size]} for s in range(0, n, batch_size)]


def _class_fit(model, batches, **options):
    scorer = th.ProjectedInfluenceScorer(model, projection_dim=WHOLE, design="sketch", parameters=HEAD,
                                         show_progress=False, **options)
    return scorer.fit(batches)


def _stored(scorer):
    return scorer.store.read(torch.arange(100, 100 + len(scorer.store))).double()


def _perturbed(model, seed=1):
    """Larger random weights: confident, uneven predictions (a curvature far from uniform over the classes)."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def test_sampled_classes_converge_to_the_exact_curvature():
    """The sampled fit's curvature approaches the exact per-class one as draws grow (wrongly scaled or drawn
    samples would not), and its stored loss gradients are the exact fit's (the label's own column)."""
    model = _perturbed(tiny_bert(num_labels=5))
    batches = _class_batches(5, n=8, batch_size=8)
    exact = _class_fit(model, batches, curvature_classes="exact")

    def error(samples):
        sampled = _class_fit(model, batches, curvature_classes="sampled", label_samples=samples)
        assert torch.allclose(_stored(sampled), _stored(exact), atol=1e-6 * float(_stored(exact).abs().max()))
        return float((sampled.curvature - exact.curvature).norm() / exact.curvature.norm())

    few, many = error(2), error(300)
    assert many < 0.15 and many < few / 3, (few, many)
    # two classes: each class's weighted gradient is the whole matrix (the draws only pick which one)
    model, batches = _perturbed(tiny_bert()), _class_batches(2, n=8, batch_size=8)
    exact, drawn = (_class_fit(model, batches, curvature_classes=form) for form in ("exact", "sampled"))
    assert torch.allclose(drawn.curvature, exact.curvature, rtol=1e-4, atol=1e-6 * float(exact.curvature.abs().max()))


def test_sampled_classes_are_fixed_by_the_seed_and_the_example_id():
    model = tiny_bert(num_labels=7)
    fits = [_class_fit(model, _class_batches(7, batch_size=size), curvature_classes="sampled", label_samples=3)
            for size in (4, 4, 3, 12)]
    first = fits[0].curvature
    assert torch.equal(first, fits[1].curvature)  # the same fit twice: bit for bit
    for other in fits[2:]:  # other batch compositions: the same draws, so the same matrix up to rounding
        assert torch.allclose(first, other.curvature, rtol=1e-5, atol=1e-7 * float(first.abs().max()))
    reseeded = th.ProjectedInfluenceScorer(model, projection_dim=WHOLE, design="sketch", parameters=HEAD,
                                           projection_seed=1, curvature_classes="sampled", label_samples=3,
                                           show_progress=False).fit(_class_batches(7))
    assert not torch.allclose(first, reseeded.curvature, rtol=1e-3)
    # the draws themselves: one class per (seed, id, draw), whatever else is in the batch
    from turnover_hf.estimators.projected.sampled_labels import sampled_classes

    probs = torch.softmax(torch.randn(6, 7, generator=torch.Generator().manual_seed(0)).double(), -1)
    ids = torch.arange(6) * 11
    together = sampled_classes(probs, ids, 0, 0, 2)[0]
    alone = torch.cat([sampled_classes(probs[i:i + 1], ids[i:i + 1], 0, 0, 2)[0] for i in range(6)])
    assert torch.equal(together, alone) and not torch.equal(together, sampled_classes(probs, ids, 0, 1, 2)[0])


def test_curvature_classes_auto_samples_beyond_the_bound_and_bad_values_are_named():
    from turnover_hf.estimators.projected.sampled_labels import samples_classes

    assert [samples_classes("auto", c, 1) for c in (2, 3, 5, 6, 100)] == [False, False, False, True, True]
    assert not samples_classes("auto", 7, 5) and samples_classes("sampled", 2, 1) and not samples_classes("exact", 100, 1)
    for classes, sampled in ((5, False), (6, True)):
        model, batches = tiny_bert(num_labels=classes), _class_batches(classes)
        auto = _class_fit(model, batches)
        exact, drawn = (_class_fit(model, batches, curvature_classes=form) for form in ("exact", "sampled"))
        assert torch.equal(auto.curvature, (drawn if sampled else exact).curvature)
        assert not torch.allclose(exact.curvature, drawn.curvature, rtol=1e-3)
    with pytest.raises(th.TurnoverError, match="curvature_classes must be one of"):
        th.ProjectedInfluenceScorer(tiny_bert(), curvature_classes="top")
