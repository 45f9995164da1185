import os

import pytest
import torch
from transformers import TrainingArguments

import turnover_hf as th
from turnover_hf.dynamics import DYNAMICS_WEIGHTS, DynamicsRecorder, TrainingDynamics, TrainingDynamicsCallback

from conftest import batch_of, tiny_bert, with_bottleneck


def _model(top_only: bool = False):
    if not top_only:
        return th.patch_model(with_bottleneck(tiny_bert()), th.TurnoverConfig(seed=7), freeze_leaking=True)
    import adapters

    model = tiny_bert()
    adapters.init(model)  # the adapter in the top layer only: the flipped forward replays layer 0's outputs
    model.add_adapter("bn", config=adapters.SeqBnConfig(reduction_factor=2, init_weights="bert", leave_out=[0]))
    model.train_adapter("bn")
    return th.patch_model(model, th.TurnoverConfig(seed=7), freeze_leaking=True)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_train_epochs=2,
                learning_rate=5e-3, report_to=[], use_cpu=True, save_strategy="no", seed=3, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


@pytest.mark.parametrize("top_only", [False, True], ids=["every-layer", "top-layer-replayed"])
def test_recorded_logits_are_the_mask_and_flip_logits_of_each_example(tmp_path, train_set, top_only):
    model = _model(top_only)
    callback = TrainingDynamicsCallback()
    # lr 0: the weights never move, so what was recorded must equal a fresh forward under each mask afterwards
    trainer = th.TurnoverTrainer(model=model, args=_args(tmp_path, learning_rate=0.0), train_dataset=train_set,
                                 callbacks=[callback])
    trainer.train()
    assert callback._handles == []  # the replay's hooks are gone after training
    dyn = callback.dynamics()
    assert dyn.mask_logits.shape == (2, len(train_set), 2)
    assert dyn.example_ids.tolist() == sorted(train_set["example_id"])
    assert dyn.labels.tolist() == [train_set[i]["labels"] for i in dyn.example_ids.tolist()]
    batch = batch_of(train_set)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "example_ids")}
    model.eval()
    for mode, recorded in (("train", dyn.mask_logits), ("flip", dyn.flip_logits)):
        with torch.no_grad(), th.instance_masks(model, batch["example_ids"], mode=mode):
            expected = model(**inputs).logits
        order = torch.argsort(batch["example_ids"])
        for epoch in range(2):
            torch.testing.assert_close(recorded[epoch], expected[order], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(dyn.mask_logits, dyn.flip_logits)


def test_dynamics_are_saved_with_every_checkpoint_and_reload(tmp_path, train_set):
    callback = TrainingDynamicsCallback()
    trainer = th.TurnoverTrainer(model=_model(), args=_args(tmp_path, save_strategy="epoch"), train_dataset=train_set,
                                 callbacks=[callback])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    checkpoints = sorted((d for d in os.listdir(tmp_path / "out") if d.startswith("checkpoint-")),
                         key=lambda d: int(d.split("-")[1]))
    assert len(checkpoints) == 2
    first = TrainingDynamics.load(tmp_path / "out" / checkpoints[0])
    final = TrainingDynamics.load(tmp_path / "final")
    assert first.num_epochs == 1 and final.num_epochs == 2
    torch.testing.assert_close(first.flip_logits[0], final.flip_logits[0])
    assert torch.isfinite(final.flip_loss()).all() and (final.mask_loss() >= 0).all()


def test_training_is_unchanged_and_nothing_written_without_the_callback(tmp_path, train_set):
    def trained(callbacks, out):
        model = _model()
        th.TurnoverTrainer(model=model, args=_args(tmp_path, output_dir=str(out)), train_dataset=train_set,
                           callbacks=callbacks).train()
        return model

    plain = trained([], tmp_path / "plain")
    recorded = trained([TrainingDynamicsCallback()], tmp_path / "recorded")
    for (name, a), b in zip(plain.state_dict().items(), recorded.state_dict().values()):
        assert torch.equal(a, b), name
    th.TurnoverTrainer(model=plain, args=_args(tmp_path, output_dir=str(tmp_path / "plain")),
                       train_dataset=train_set).save_model(str(tmp_path / "saved"))
    assert not os.path.exists(tmp_path / "saved" / DYNAMICS_WEIGHTS)
    with pytest.raises(th.TurnoverError, match="TrainingDynamicsCallback"):
        TrainingDynamics.load(tmp_path / "saved")


def test_recorder_marks_unseen_examples_and_round_trips(tmp_path):
    recorder = DynamicsRecorder()
    recorder.start_epoch()
    recorder.record(torch.tensor([5, 2]), torch.tensor([1, 0]), torch.tensor([[0.0, 1.0], [2.0, 0.0]]),
                    torch.tensor([[1.0, 0.0], [0.0, 0.5]]))
    recorder.record(torch.tensor([9]), torch.tensor([0]), torch.tensor([[0.3, 0.1]]), torch.tensor([[0.2, 0.2]]))
    recorder.start_epoch()  # a fractional last epoch: only example 2
    recorder.record(torch.tensor([2]), torch.tensor([0]), torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    dyn = recorder.dynamics()
    assert dyn.example_ids.tolist() == [2, 5, 9] and dyn.labels.tolist() == [0, 1, 0]
    assert torch.isnan(dyn.flip_logits[1, 1:]).all() and not torch.isnan(dyn.flip_logits[1, 0]).any()
    assert dyn.mask_margin()[0].tolist() == pytest.approx([2.0, 1.0, 0.2])
    # the last epoch each example was seen in: epoch 2 for example 2, epoch 1 for the others
    torch.testing.assert_close(dyn.flip_probabilities()[0], torch.softmax(torch.tensor([0.0, 1.0]), -1))
    torch.testing.assert_close(dyn.flip_probabilities()[1], torch.softmax(torch.tensor([1.0, 0.0]), -1))
    dyn.save(tmp_path)
    again = TrainingDynamics.load(tmp_path)
    assert torch.equal(again.example_ids, dyn.example_ids)
    torch.testing.assert_close(again.flip_logits, dyn.flip_logits, equal_nan=True)
    with pytest.raises(th.TurnoverError, match="classifier logits"):
        recorder.record(torch.tensor([1]), torch.tensor([0]), torch.zeros(1, 3, 2), torch.zeros(1, 3, 2))
    with pytest.raises(th.TurnoverError, match="no training batch"):
        DynamicsRecorder().dynamics()
