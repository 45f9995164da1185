"""Plots draw exactly the numbers a real (tiny) turn-over run produced, and save valid PNGs atomically."""

import json
import os

import numpy as np
import pytest
import torch
from transformers import TrainingArguments

import turnover_hf as th

pytest.importorskip("matplotlib")
from conftest import text_task, tiny_bert, with_bottleneck, word_tokenizer

from turnover_hf import plots

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained with turn-over dropout and the flip-sanity callback, with its pipeline."""
    folder = tmp_path_factory.mktemp("run")
    tokenizer = word_tokenizer(folder / "tok")
    train = text_task(48, seed=0)
    valid = text_task(12, seed=1).remove_columns("example_id")
    encode = lambda rows: tokenizer(rows["text"])
    model = th.patch_model(with_bottleneck(tiny_bert()), th.TurnoverConfig(seed=3), freeze_leaking=True)
    sanity = th.FlipSanityCallback(train.map(encode, batched=True).select(range(16)), batch_size=8)
    args = TrainingArguments(
        str(folder / "out"), per_device_train_batch_size=8, num_train_epochs=2, learning_rate=5e-3, report_to=[],
        use_cpu=True, eval_strategy="steps", eval_steps=4, logging_steps=2, save_strategy="no", disable_tqdm=True,
    )
    trainer = th.TurnoverTrainer(model=model, args=args, train_dataset=train.map(encode, batched=True),
                                 eval_dataset=valid.map(encode, batched=True), processing_class=tokenizer,
                                 callbacks=[sanity])
    trainer.train()
    pipe = th.InfluencePipeline(model, tokenizer, train_dataset=train)
    return {"trainer": trainer, "sanity": sanity, "pipe": pipe, "train": train, "valid": valid}


def _is_png(path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(8) == PNG


def test_self_influence_histogram_counts_every_example_in_its_group(run, tmp_path):
    si = run["pipe"].self_influence()
    flags = np.zeros(len(si), dtype=bool)
    flags[::5] = True
    fig = plots.self_influence_histogram(si, mislabelled=flags, bins=10, path=tmp_path / "si.png")
    ax = fig.axes[0]
    clean, flagged = ax.containers  # one bar container per group
    assert sum(bar.get_height() for bar in clean) == (~flags).sum()
    assert sum(bar.get_height() for bar in flagged) == flags.sum()
    # The bars cover the scores' range and the dashed line sits on their mean.
    values = np.asarray(si["self_influence"])
    assert clean[0].get_x() == pytest.approx(values.min())
    assert any(np.allclose(line.get_xdata(), values.mean()) for line in ax.lines)
    assert _is_png(tmp_path / "si.png")
    assert os.listdir(tmp_path) == ["si.png"]  # the temporary file was renamed, nothing left over
    # A column name works, as does a bare tensor without flags.
    named = plots.self_influence_histogram(si.add_column("bad", flags.tolist()), mislabelled="bad", bins=10)
    assert len(named.axes[0].containers) == 2
    single = plots.self_influence_histogram(torch.tensor(values), bins=10)
    assert sum(bar.get_height() for bar in single.axes[0].containers[0]) == len(values)


def test_class_heatmap_shows_the_blockwise_mean(run, tmp_path):
    pipe, train, valid = run["pipe"], run["train"], run["valid"]
    scores = pipe.scores(valid)
    matrix, rows, cols = plots.class_influence_matrix(scores, train, valid)
    train_labels, target_labels = np.array(train["label"]), np.array(valid["label"])
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            block = scores.numpy()[train_labels == r][:, target_labels == c]
            assert matrix[i, j] == pytest.approx(block.mean(), rel=1e-5, abs=1e-8)
    fig = plots.class_influence_heatmap(scores, train, valid, label_names=["absent", "present"],
                                        path=tmp_path / "heat.png")
    ax = fig.axes[0]
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), matrix)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["absent", "present"]
    assert _is_png(tmp_path / "heat.png")


def test_flip_sanity_curves_plot_the_logged_losses(run, tmp_path):
    trainer, sanity = run["trainer"], run["sanity"]
    assert len(sanity.history) >= 3
    fig = plots.flip_sanity_curves(trainer.state.log_history, path=tmp_path / "fig2.png")
    mask, flip, held_out = fig.axes[0].lines
    steps = [h["step"] for h in sanity.history]
    np.testing.assert_allclose(mask.get_xdata(), steps)
    np.testing.assert_allclose(mask.get_ydata(), [h["train_sample_loss_mask"] for h in sanity.history])
    np.testing.assert_allclose(flip.get_ydata(), [h["train_sample_loss_flip"] for h in sanity.history])
    np.testing.assert_allclose(held_out.get_ydata(), [h["eval_loss"] for h in sanity.history])
    assert _is_png(tmp_path / "fig2.png")
    # The Trainer itself, the callback, and trainer_state.json as saved by trainer.save_state() all work.
    trainer.save_state()
    with open(os.path.join(trainer.args.output_dir, "trainer_state.json"), encoding="utf-8") as handle:
        saved = json.load(handle)
    for source in (trainer, sanity, saved):
        np.testing.assert_allclose(plots.flip_sanity_series(source)["flip"], flip.get_ydata())


def test_flip_sanity_without_the_callback_says_what_to_add(run):
    history = [r for r in run["trainer"].state.log_history if "train_sample_loss_flip" not in r]
    assert history  # training losses and evaluations are still there
    with pytest.raises(th.TurnoverError, match="FlipSanityCallback"):
        plots.flip_sanity_curves(history)
    with pytest.raises(th.TurnoverError, match="log_history"):
        plots.flip_sanity_curves(42)


def test_cleansing_curve_draws_influence_and_random_removal(tmp_path):
    fractions = [0.0, 0.05, 0.1, 0.2]
    accuracy = [0.80, 0.83, 0.84, 0.82]
    random = np.array([[0.80, 0.80, 0.79, 0.77], [0.80, 0.79, 0.78, 0.78], [0.80, 0.81, 0.79, 0.76]])
    fig = plots.cleansing_curve(fractions, accuracy, random_accuracy=random, path=tmp_path / "clean.png")
    ax = fig.axes[0]
    ours, rand = ax.lines
    np.testing.assert_allclose(ours.get_xdata(), [0, 5, 10, 20])
    np.testing.assert_allclose(ours.get_ydata(), accuracy)
    np.testing.assert_allclose(rand.get_ydata(), random.mean(0))
    assert len(ax.collections) == 1  # the spread of the random repeats
    assert _is_png(tmp_path / "clean.png")
    with pytest.raises(th.TurnoverError, match="columns"):
        plots.cleansing_curve(fractions, accuracy, random_accuracy=random[:, :3])


def test_bad_scores_are_refused_not_plotted(run):
    train, valid = run["train"], run["valid"]
    with pytest.raises(th.TurnoverError, match="NaN"):
        plots.self_influence_histogram(torch.tensor([0.1, float("nan"), 0.2]))
    with pytest.raises(th.TurnoverError, match="training labels"):
        plots.class_influence_heatmap(torch.zeros(len(train) - 1, len(valid)), train, valid)
    with pytest.raises(th.TurnoverError, match="entries"):
        plots.self_influence_histogram(torch.zeros(5), mislabelled=[True, False])


def test_figure_png_gives_png_bytes():
    fig = plots.cleansing_curve([0.0, 0.1], [0.5, 0.6])
    assert plots.figure_png(fig).startswith(PNG)
