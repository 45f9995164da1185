
import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

import turnover_hf as th
from turnover_hf.masks import keep_bits

from conftest import tiny_bert, token_task, with_bottleneck


def _id_coded_task(n=48, seed=0) -> Dataset:
    """The token task, with the example id written into token 1 so a hook can tell which example a row is."""
    ds = token_task(n, seed=seed)
    ids = list(range(100, 100 + n))  # ids that are not row indices

    def code(row, i):
        row["input_ids"] = [row["input_ids"][0], 6 + (i % 50), *row["input_ids"][2:]]
        return row

    ds = ds.map(code, with_indices=True)
    return ds.add_column("example_id", ids).add_column("unused_text", ["x"] * n)


class MaskRecorder:
    """Records, for every forward in training mode, which example each row is and which classifier units it kept."""

    def __init__(self, model):
        self.rows: list[tuple[int, torch.Tensor]] = []
        self._tokens = None
        model.register_forward_pre_hook(self._top, with_kwargs=True)
        model.classifier.register_forward_pre_hook(self._head)  # after the mask hook: sees masked features

    def _top(self, module, args, kwargs):
        self._tokens = kwargs["input_ids"][:, 1].clone() if module.training else None

    def _head(self, module, args):
        if self._tokens is not None:
            for token, features in zip(self._tokens.tolist(), args[0].detach()):
                self.rows.append((100 + token - 6, features != 0))


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=3,
        num_train_epochs=2, learning_rate=5e-3, report_to=[], use_cpu=True, logging_steps=2, save_strategy="no",
        remove_unused_columns=True, seed=3, disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def test_each_example_trains_under_its_own_mask(tmp_path):
    model = th.patch_model(with_bottleneck(tiny_bert()), th.TurnoverConfig(seed=5), freeze_leaking=True)
    recorder = MaskRecorder(model)
    train = _id_coded_task()
    trainer = th.TurnoverTrainer(model=model, args=_args(tmp_path, dataloader_num_workers=2), train_dataset=train)
    trainer.train()
    assert len(recorder.rows) == 2 * len(train)  # two epochs, every row seen under a mask
    assert {i for i, _ in recorder.rows} == set(range(100, 148))
    for example_id, kept in recorder.rows:
        expected = keep_bits(torch.tensor([example_id]), "classifier", 32, seed=5)[0]
        assert torch.equal(kept, expected), f"example {example_id} trained under another example's mask"
    assert model.turnover_config.num_train_examples == len(train)


def test_resume_from_checkpoint_gives_the_same_masks_and_weights(tmp_path):
    def run(out, resume=None, max_steps=8, recorder=True):
        model = th.patch_model(with_bottleneck(tiny_bert()), th.TurnoverConfig(seed=5), freeze_leaking=True)
        rec = MaskRecorder(model) if recorder else None
        args = _args(tmp_path, output_dir=str(out), max_steps=max_steps, save_strategy="steps", save_steps=4,
                     gradient_accumulation_steps=1)
        trainer = th.TurnoverTrainer(model=model, args=args, train_dataset=_id_coded_task())
        trainer.train(resume_from_checkpoint=resume)
        return model, rec

    straight, rec_straight = run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-4"
    assert (checkpoint / th.CONFIG_NAME).is_file()  # Trainer checkpoints are influence-ready too
    resumed, rec_resumed = run(tmp_path / "b", resume=str(checkpoint))
    assert [i for i, _ in rec_resumed.rows] == [i for i, _ in rec_straight.rows][-len(rec_resumed.rows):]
    for (i, a), (j, b) in zip(rec_resumed.rows, rec_straight.rows[-len(rec_resumed.rows):]):
        assert i == j and torch.equal(a, b)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_sanity_callback_logs_mask_and_flip_losses(tmp_path):
    model = th.patch_model(with_bottleneck(tiny_bert()), th.TurnoverConfig(seed=5), freeze_leaking=True)
    train = th.add_example_ids(token_task(48))
    sanity = th.FlipSanityCallback(train.select(range(16)), batch_size=8)
    args = _args(tmp_path, eval_strategy="epoch", num_train_epochs=2, learning_rate=2e-2)
    trainer = th.TurnoverTrainer(model=model, args=args, train_dataset=train, eval_dataset=token_task(16, seed=9),
                                 callbacks=[sanity])
    trainer.train()
    assert [r["step"] for r in sanity.history] == [4, 8]
    last = sanity.history[-1]
    assert {"train_sample_loss_mask", "train_sample_loss_flip", "eval_loss"} <= set(last)
    assert last["train_sample_loss_mask"] != last["train_sample_loss_flip"]
    assert any("train_sample_loss_flip" in entry for entry in trainer.state.log_history)
    # The callback's numbers are the definition: mean loss under each example's (flipped) mask.
    direct = sanity.sample_losses(model)
    assert direct["train_sample_loss_mask"] == pytest.approx(last["train_sample_loss_mask"], rel=1e-6)


def test_trainer_refuses_bad_training_data(tmp_path):
    model = th.patch_model(with_bottleneck(tiny_bert()), freeze_leaking=True)
    with pytest.raises(th.MissingExampleIdsError, match="add_example_ids"):
        th.TurnoverTrainer(model=model, args=_args(tmp_path), train_dataset=token_task(8))
    dup = token_task(8).add_column("example_id", [0, 1, 2, 3, 4, 5, 6, 6])
    with pytest.raises(th.ExampleIdError, match="duplicate"):
        th.TurnoverTrainer(model=model, args=_args(tmp_path), train_dataset=dup)
    with pytest.raises(th.NotPatchedError):
        th.TurnoverTrainer(model=tiny_bert(), args=_args(tmp_path), train_dataset=th.add_example_ids(token_task(8)))
    trainer = th.TurnoverTrainer(model=model, args=_args(tmp_path), train_dataset=th.add_example_ids(token_task(8)))
    batch = th.InstanceIdCollator()([token_task(2)[i] for i in range(2)])
    with pytest.raises(th.MissingExampleIdsError, match="no example ids"):
        trainer.training_step(model, batch)
