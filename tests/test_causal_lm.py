"""Causal language models: shifted per-token losses, GPT-2 Conv1D exactness, sequence vs. token-level influence,
text targets in the pipeline, and a memorised training sentence found as its own top proponent."""

import pytest
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerFast, TrainingArguments

import turnover_hf as th
from turnover_hf.masks import keep_bits
from turnover_hf.losses import counted_tokens

from conftest import VOCAB, lm_targets, tiny_gpt2_lm, tiny_llama_lm

CONV1D = th.TurnoverConfig(seed=3, target_module_types=["Conv1D"])


def _perturb(model, scale=0.05):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
    return model


def naive_lm_influence(model, targets, ids):
    """The definition, one pair at a time, with the model's own (shifted, -100-ignoring) loss: mean over tokens."""
    out = torch.zeros(len(ids), len(targets["input_ids"]))
    with torch.no_grad():
        for t in range(len(targets["input_ids"])):
            one = {k: targets[k][t : t + 1] for k in ("input_ids", "attention_mask", "labels")}
            for i, z in enumerate(ids.tolist()):
                losses = {}
                for mode in ("train", "flip"):
                    with th.instance_masks(model, torch.tensor([z]), mode=mode):
                        losses[mode] = model(**one).loss.item()
                out[i, t] = losses["flip"] - losses["train"]
    return out


@pytest.mark.parametrize("factory", [tiny_gpt2_lm, tiny_llama_lm], ids=["gpt2", "llama"])
def test_per_token_loss_is_the_models_own_shifted_loss(factory):
    model = factory()
    batch = lm_targets()
    with torch.no_grad():
        out = model(**batch)
        trimmed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=6).logits
    per_token = th.per_token_loss(out.logits, batch["labels"], shift=True)
    counted = counted_tokens(batch["labels"], shift=True)
    # transformers averages over every counted token of the batch
    assert torch.allclose(per_token.sum() / counted.sum(), out.loss, atol=1e-6)
    assert torch.equal(per_token[batch["labels"] == -100], torch.zeros(int((batch["labels"] == -100).sum())))
    assert (per_token[:, 1:][batch["labels"][:, 1:] != -100] > 0).all()
    # logits of only the last 6 positions: the same losses where they reach (the counted tokens start at 4)
    assert torch.allclose(th.per_token_loss(trimmed, batch["labels"], shift=True), per_token, atol=1e-6)
    mean = th.per_example_loss(out.logits, batch["labels"], shift=True)
    assert torch.allclose(mean, per_token.sum(-1) / counted)
    assert torch.allclose(th.per_example_loss(out.logits, batch["labels"], shift=True, reduction="sum"), per_token.sum(-1))


def test_gpt2_conv1d_masked_off_gradients_are_exactly_zero():
    model = th.patch_model(tiny_gpt2_lm(), CONV1D, freeze_leaking=True)
    sites = model.turnover_config.mask_sites
    assert len(sites) == 8 and all(s["side"] == "output" for s in sites.values())  # c_attn, c_proj, c_fc, c_proj x 2
    assert th.leakage_report(model) == []
    batch = lm_targets(n=1)
    z = torch.tensor([11])
    model.train()
    with th.instance_masks(model, z, mode="train"):
        model(**batch).loss.backward()
    grads = dict(model.named_parameters())
    for name, site in sites.items():
        dropped = ~keep_bits(z, name, site["units"], **model.turnover_config.mask_kwargs)[0]
        weight, bias = grads[f"{name}.weight"].grad, grads[f"{name}.bias"].grad  # Conv1D weight: (in, out)
        assert dropped.any() and (~dropped).any()
        assert torch.count_nonzero(weight[:, dropped]) == 0 and torch.count_nonzero(bias[dropped]) == 0
        assert torch.count_nonzero(weight[:, ~dropped]) > 0


@pytest.mark.parametrize("factory", [tiny_gpt2_lm, tiny_llama_lm], ids=["gpt2-conv1d", "llama-linear"])
def test_flipped_lm_is_unchanged_by_a_step_on_z(factory):
    config = CONV1D if factory is tiny_gpt2_lm else th.TurnoverConfig(seed=3, target_modules=["q_proj", "v_proj", "up_proj"])
    model = th.patch_model(factory(), config, freeze_leaking=True)
    batch = lm_targets(n=4)
    z = torch.tensor([5])
    z_rows = z.repeat(4)  # z's sub-networks judged on 4 different sequences

    def logits(mode, rows):
        with torch.no_grad(), th.instance_masks(model, rows, mode=mode):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    flip_before, mask_before = logits("flip", z_rows), logits("train", z_rows)
    other_before = logits("flip", torch.tensor([6]).repeat(4))
    model.train()
    model.zero_grad()
    with th.instance_masks(model, z, mode="train"):
        model(**{k: v[:1] for k, v in batch.items()}).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1.0 * p.grad
    model.eval()
    assert torch.equal(logits("flip", z_rows), flip_before)  # bit for bit: z never reached its flipped network
    assert not torch.allclose(logits("train", z_rows), mask_before)
    assert not torch.equal(logits("flip", torch.tensor([6]).repeat(4)), other_before)


@pytest.mark.parametrize(
    "factory, config, path",
    [
        (tiny_gpt2_lm, CONV1D, "batched"),
        (lambda: tiny_gpt2_lm(n_layer=3), th.TurnoverConfig(seed=3, target_modules=r"transformer\.h\.2\.mlp\.c_fc"), "prefix"),
        (tiny_llama_lm, th.TurnoverConfig(seed=3, target_modules=["up_proj"]), "batched"),
        (lambda: tiny_llama_lm(n_layer=3), th.TurnoverConfig(seed=3, target_modules=r"model\.layers\.2\.mlp\.up_proj"), "prefix"),
    ],
    ids=["gpt2-all", "gpt2-top-layer", "llama-all", "llama-top-layer"],
)
def test_lm_scores_are_the_definition_and_tokens_add_up(factory, config, path, caplog):
    model = _perturb(th.patch_model(factory(), config, warn_leaking=False).eval())
    targets = lm_targets(n=3)
    ids = torch.tensor([4, 0, 17, 9])
    scorer = th.TurnoverScorer(model, batch_size=8)
    mean = scorer.scores(targets, targets["labels"], ids)
    assert scorer.path == path and "disagrees" not in caplog.text
    assert torch.allclose(mean, naive_lm_influence(model, targets, ids), atol=1e-5)
    total = scorer.scores(targets, targets["labels"], ids, reduction="sum")
    per_token = scorer.token_scores(targets, targets["labels"], ids)
    assert per_token.shape == (4, 3, targets["input_ids"].shape[1])
    assert torch.allclose(per_token.sum(-1), total, atol=1e-5)  # token-level scores sum to the sequence's
    assert torch.allclose(total / counted_tokens(targets["labels"], shift=True), mean, atol=1e-6)
    not_counted = (targets["labels"] == -100) | (torch.arange(targets["labels"].shape[1]) == 0)
    assert torch.count_nonzero(per_token[:, not_counted]) == 0  # prompt and padding carry no influence
    assert torch.count_nonzero(per_token[:, ~not_counted]) == per_token[:, ~not_counted].numel()
    self_ids = torch.tensor([4, 0, 17])
    assert torch.allclose(scorer.self_scores(targets, targets["labels"], self_ids),
                          naive_lm_influence(model, targets, self_ids).diag(), atol=1e-5)


def test_influence_without_labels_scores_every_real_token():
    model = _perturb(th.patch_model(tiny_gpt2_lm(), CONV1D, warn_leaking=False))
    targets = lm_targets(n=2, prompt=0)
    ids = torch.arange(5)
    unlabelled = {k: v for k, v in targets.items() if k != "labels"}
    assert torch.equal(th.influence(model, unlabelled, ids), th.influence(model, targets, ids))
    with pytest.raises(th.TurnoverError, match="per-token"):
        th.TurnoverScorer(th.patch_model(tiny_gpt2_lm(), warn_leaking=False).eval()).scores(
            targets, torch.tensor([1, 2]), ids, reduction="none")


def word_lm_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer (``tokenizers``) over w1 ... w63, id = the number; [UNK] = 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {"[UNK]": 0} | {f"w{i}": i for i in range(1, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_prompt_completion_features_and_collator():
    tok = word_lm_tokenizer()
    row = th.prompt_completion_features(tok, "w5 w6 w7", "w8 w9")
    assert row == {"input_ids": [5, 6, 7, 8, 9], "attention_mask": [1] * 5, "labels": [-100, -100, -100, 8, 9]}
    assert th.prompt_completion_features(tok, "w5 w6 w7", "w8 w9", max_length=3)["input_ids"] == [7, 8, 9]
    with pytest.raises(th.TurnoverError, match="max_length"):
        th.prompt_completion_features(tok, "w5", "w8 w9 w10", max_length=3)
    batch = th.CausalLMCollator(tok)([{"input_ids": [5, 6, 7]}, row])
    assert batch["labels"].tolist() == [[5, 6, 7, -100, -100], [-100, -100, -100, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]


def test_pipeline_explains_text_targets_token_by_token():
    tok = word_lm_tokenizer()
    model = _perturb(th.patch_model(tiny_gpt2_lm(), CONV1D, freeze_leaking=True), 0.1)
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(t)}" for t in torch.randint(1, VOCAB, (8,), generator=g)) for _ in range(12)]
    train = th.add_example_ids(Dataset.from_dict({"text": texts}))
    pipe = th.InfluencePipeline(model, tok, train_dataset=train, batch_size=16, estimator="turnover")
    out = pipe(("w5 w6 w7", "w8 w9"), top_k=3)
    assert out["tokens"] == ["w8", "w9"] and out["label"] is None
    scores = pipe.scores([("w5 w6 w7", "w8 w9")])[:, 0]
    for person in out["proponents"] + out["opponents"]:
        assert len(person["token_scores"]) == 2 and person["text"] in texts
        assert person["score_sum"] == pytest.approx(sum(person["token_scores"]))
        assert person["score"] == pytest.approx(person["score_sum"] / 2, abs=1e-6)
        assert person["score"] == pytest.approx(float(scores[person["example_id"]]), abs=1e-6)
    assert out["proponents"][0]["score"] == pytest.approx(float(scores.max()), abs=1e-6)
    per_token = pipe.token_scores(["w5 w6 w7 w8", ("w5 w6 w7", "w8 w9")])
    assert per_token.shape == (12, 2, 5)  # padded to the longer target
    assert torch.allclose(per_token[:, 1].sum(-1) / 2, scores, atol=1e-6)
    self_influence = pipe.self_influence()["self_influence"]
    rows = th.CausalLMCollator(tok)([tok(t) for t in texts])
    direct = th.TurnoverScorer(model).self_scores(rows, rows["labels"], torch.arange(12))
    assert torch.allclose(torch.tensor(self_influence), direct, atol=1e-6)


def _toy_corpus(n_regular: int = 11, length: int = 10, cycle: int = 12, seed: int = 0) -> tuple[Dataset, list[int]]:
    """Windows of one repeating cycle of tokens (each sentence is predictable from the others) and one random
    'canary' sentence of other tokens that only memorisation can predict."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, cycle, (n_regular,), generator=g).tolist()
    rows = [[(start + j) % cycle + 1 for j in range(length)] for start in starts]
    canary = torch.randint(cycle + 1, VOCAB, (length,), generator=g).tolist()
    rows.insert(4, canary)
    return th.add_example_ids(Dataset.from_dict({"input_ids": rows})), canary


def test_a_memorised_sentence_is_its_own_top_proponent(tmp_path):
    train, canary = _toy_corpus()
    # Every Conv1D and the (untied) LM head carry masks; embeddings and norms stay frozen at their random init.
    config = th.TurnoverConfig(seed=0, target_module_types=["Conv1D"], target_modules=["lm_head"], mask_inputs_of=["lm_head"])
    model = th.patch_model(tiny_gpt2_lm(n_embd=64), config, freeze_leaking=True)
    assert model.turnover_config.mask_sites["lm_head"] == {"side": "input", "units": 64}
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, num_train_epochs=60, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_strategy="no",
                             seed=0, lr_scheduler_type="constant")
    th.TurnoverTrainer(model=model, args=args, train_dataset=train).train()
    model.eval()
    target = th.CausalLMCollator()([{"input_ids": canary}])
    with torch.no_grad(), th.instance_masks(model, torch.tensor([4]), mode="train"):
        assert model(**target).loss < 0.5  # the sub-network that saw the canary knows it by heart
    scores = th.influence(model, target, example_ids=train["example_id"])[:, 0]
    assert int(scores.argmax()) == 4  # the canary itself is the top proponent of the canary
    assert scores[4] > 1.0
    rows = th.CausalLMCollator()([{"input_ids": r} for r in train["input_ids"]])
    self_influence = th.TurnoverScorer(model).self_scores(rows, rows["labels"], torch.tensor(train["example_id"]))
    assert int(self_influence.argmax()) == 4  # and the most self-influential sentence (paper App. A)


def test_a_classification_label_column_does_not_confuse_a_language_model():
    tok = word_lm_tokenizer()
    model = _perturb(th.patch_model(tiny_gpt2_lm(), CONV1D, freeze_leaking=True))
    train = th.add_example_ids(Dataset.from_dict({"text": ["w5 w6 w7", "w8 w9 w10 w11"], "label": [0, 1]}))
    pipe = th.InfluencePipeline(model, tok, train_dataset=train)
    assert len(pipe.self_influence()["self_influence"]) == 2  # the label column is shown, not used as token labels
    with pytest.raises(th.TurnoverError, match="one label .* instead of one per token"):
        th.CausalLMCollator(tok)([{"input_ids": [5, 6], "labels": 1}])


def test_flip_sanity_callback_measures_a_language_models_own_loss():
    model = th.patch_model(tiny_gpt2_lm(), th.TurnoverConfig(seed=3, target_module_types=["Conv1D"]))
    rows = [{"input_ids": [5 + (7 * i + j) % 50 for j in range(6 + i)], "example_id": i} for i in range(4)]
    sample = Dataset.from_list(rows)
    collator = th.CausalLMCollator(pad_token_id=0)
    losses = th.FlipSanityCallback(sample, collator).sample_losses(model)
    expected = {}
    with torch.no_grad():
        for mode in ("train", "flip"):
            each = []
            for r in rows:  # the model's own (shifted) loss of each row alone, under that row's mask
                with th.instance_masks(model, torch.tensor([r["example_id"]]), mode=mode):
                    ids = torch.tensor([r["input_ids"]])
                    each.append(model(input_ids=ids, labels=ids).loss)
            expected[mode] = torch.stack(each).mean().item()
    assert losses["train_sample_loss_mask"] == pytest.approx(expected["train"], rel=1e-5)
    assert losses["train_sample_loss_flip"] == pytest.approx(expected["flip"], rel=1e-5)
