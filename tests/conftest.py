"""Shared fixtures: tiny random models built from configs (CPU, offline) and a small learnable token task."""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from datasets import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import turnover_hf as th

# Tiny models run fastest on one thread, and a busy machine then does not slow the suite down by spinning.
torch.set_num_threads(1)

VOCAB = 64
SEQ = 8


def tiny_bert(num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=32, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_roberta(seed: int = 0) -> RobertaForSequenceClassification:
    torch.manual_seed(seed)
    cfg = RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=40, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        pad_token_id=1,
    )
    return RobertaForSequenceClassification(cfg).eval()


def tiny_distilbert(seed: int = 0) -> DistilBertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=37, max_position_embeddings=32,
                           num_labels=2, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)
    return DistilBertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32, num_labels=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)
    return GPT2ForSequenceClassification(cfg).eval()


def with_bottleneck(model, name: str = "bn", reduction_factor: int = 2):
    import adapters

    adapters.init(model)
    model.add_adapter(name, config=adapters.SeqBnConfig(reduction_factor=reduction_factor, init_weights="bert"))
    model.train_adapter(name)
    return model


def with_lora(model, name: str = "lo", r: int = 4):
    import adapters

    adapters.init(model)
    model.add_adapter(name, config=adapters.LoRAConfig(r=r, alpha=8, init_weights="bert"))
    model.train_adapter(name)
    return model


def token_task(n: int = 64, seed: int = 0) -> Dataset:
    """Sequences of random tokens; the label says whether token 5 appears. Learnable by a tiny model."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, VOCAB, (n, SEQ), generator=g)
    has = torch.rand(n, generator=g) < 0.5
    pos = torch.randint(1, SEQ, (n,), generator=g)
    ids[has, pos[has]] = 5
    ids[:, 0] = 2
    return Dataset.from_dict({
        "input_ids": ids.tolist(),
        "attention_mask": [[1] * SEQ] * n,
        "labels": has.long().tolist(),
    })


def batch_of(dataset: Dataset, rows=None) -> dict[str, torch.Tensor]:
    rows = range(len(dataset)) if rows is None else rows
    return th.InstanceIdCollator()([dataset[int(i)] for i in rows])


@pytest.fixture
def train_set() -> Dataset:
    return th.add_example_ids(token_task(64, seed=0))


@pytest.fixture
def bert_bottleneck():
    return th.patch_model(with_bottleneck(tiny_bert()), th.TurnoverConfig(seed=7), freeze_leaking=True)


def word_tokenizer(folder) -> "PreTrainedTokenizerBase":
    """A BERT word-piece tokenizer over the words w5 ... w63 (ids 5 ... 63), written to ``folder``."""
    from transformers import BertTokenizerFast

    os.makedirs(folder, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(5, VOCAB)]
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=path)


def text_task(n: int = 64, seed: int = 0) -> Dataset:
    """The token task as text with ids: 'w17 w5 w40 ...' and a label."""
    ds = token_task(n, seed)
    texts = [" ".join(f"w{t}" for t in row[1:]) for row in ds["input_ids"]]
    return th.add_example_ids(Dataset.from_dict({"text": texts, "label": ds["labels"]}))


def tiny_gpt2_lm(seed: int = 0, n_layer: int = 2, n_embd: int = 32):
    """A tiny GPT-2 language model (transformers' Conv1D layers), untied head, no dropout."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=n_embd, n_layer=n_layer, n_head=2, n_positions=32, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama_lm(seed: int = 0, n_layer: int = 2):
    """A tiny Llama-style language model (RMSNorm, rotary positions, gated MLP)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=n_layer,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def lm_targets(n: int = 3, length: int = 9, prompt: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random token sequences of different lengths (right-padded) whose first ``prompt`` tokens do not count."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(5, VOCAB, (length - i,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return th.CausalLMCollator(pad_token_id=0)(rows)


def free_port() -> int:
    """A TCP port nothing listens on right now, for a torchrun rendezvous (fixed ports collide on busy machines)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(script, processes: int, *args, timeout: int = 300) -> None:
    """Run ``script`` under ``torch.distributed.run`` with ``processes`` CPU processes (gloo); fail with its stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
           str(free_port()), str(script), *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
