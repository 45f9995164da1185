"""Write the notebooks of this folder from the cells below and execute them, outputs stored.

    python notebooks/build.py                 # every notebook, full settings (a few minutes each on 2 CPU cores)
    python notebooks/build.py quickstart      # one of them

The test suite (tests/test_notebooks.py) re-executes every stored notebook with TURNOVER_HF_NOTEBOOK_SMALL=1
(tiny settings), so a notebook that stops working fails the tests.
"""

from __future__ import annotations

import os
import sys
import time

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = """\
import os
SMALL = os.environ.get("TURNOVER_HF_NOTEBOOK_SMALL") == "1"   # the test suite re-runs this notebook with tiny settings
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from transformers import DataCollatorWithPadding, TrainingArguments
import turnover_hf as th
from turnover_hf import plots
from turnover_hf.assets import LABEL_NAMES, minilm_path, rotten_tomatoes

transformers.logging.set_verbosity_error()
torch.manual_seed(0)"""

MODEL = """\
import adapters
from transformers import AutoModelForSequenceClassification, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(minilm_path())

def new_model(adapter_layers=1 if SMALL else 3):
    \"\"\"all-MiniLM-L6-v2 + a 2-way head + a bottleneck adapter in its top layers (unpatched).\"\"\"
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    adapters.init(model)
    model.add_adapter("rt", config=adapters.SeqBnConfig(reduction_factor=8, leave_out=list(range(6 - adapter_layers))))
    model.train_adapter("rt")
    return model

def encode(dataset):
    # token ids with the label and the example_id column; the text stays in the raw split
    return dataset.map(lambda rows: tokenizer(rows["text"], truncation=True, max_length=64), batched=True,
                       remove_columns=["text"])

def training_args(output_dir, seed=0):
    return TrainingArguments(output_dir, num_train_epochs=EPOCHS, per_device_train_batch_size=32, learning_rate=3e-3,
                             warmup_ratio=0.1, group_by_length=True, save_strategy="no", logging_strategy="epoch",
                             eval_strategy="no", seed=seed, use_cpu=True, report_to=[], disable_tqdm=True)

def logits_of(model, dataset):
    # the full network's logits (no masks outside training)
    args = training_args("runs/eval")
    args.group_by_length = False  # keep the dataset's order
    trainer = transformers.Trainer(model=model, args=args, data_collator=DataCollatorWithPadding(tokenizer))
    return torch.as_tensor(trainer.predict(dataset).predictions)

def accuracy(model, dataset):
    return float((logits_of(model, dataset).argmax(-1) == torch.tensor(dataset["label"])).float().mean())"""


def md(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(text.strip())


def code(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(text.strip())


QUICKSTART = [
    md("""
# Quickstart: an influence-ready model in three lines

Fine-tune all-MiniLM-L6-v2 (with a bottleneck adapter) on Rotten Tomatoes reviews with turn-over dropout, then ask
which training reviews helped or hurt a prediction. Everything here runs offline on a CPU: the model and the data
ship in PyPI packages (`turnover_hf.assets`)."""),
    code(SETUP),
    code("""
data = rotten_tomatoes(n_train=64 if SMALL else 1000, n_validation=16 if SMALL else 486)
EPOCHS = 1 if SMALL else 2
data"""),
    md("""
## 1. Patch

`patch_model` gives every training example its own dropout mask in the adapter and the classification head.
`freeze_leaking=True` freezes what no mask covers (here the classifier's bias), so the sub-network under an
example's *flipped* mask never learns from it."""),
    code(MODEL),
    code("""
model = new_model()
model = th.patch_model(model, th.TurnoverConfig(seed=0), freeze_leaking=True)
print(model.turnover_config.mask_sites)"""),
    md("""
## 2. Train

`TurnoverTrainer` is a `transformers.Trainer` that runs each step under the batch's masks.
`FlipSanityCallback` logs the paper's Fig. 2 signal: training examples' loss under their own masks (seen) and
under their flipped masks (never seen), beside the held-out loss."""),
    code("""
train, valid = encode(data["train"]), encode(data["validation"])
args = training_args("runs/quickstart")
args.eval_strategy = "epoch"
sanity = th.FlipSanityCallback(train.select(range(64)), DataCollatorWithPadding(tokenizer))
trainer = th.TurnoverTrainer(model=model, args=args, train_dataset=train, eval_dataset=valid,
                             processing_class=tokenizer, callbacks=[sanity])
trainer.train()
print("validation accuracy", accuracy(model, valid))"""),
    code("""plots.flip_sanity_curves(trainer.state.log_history)"""),
    md("""
## 3. Save, load anywhere, explain

The checkpoint is an ordinary HF folder plus `turnover_config.json`; loading it back gives the very same masks."""),
    code("""
model.save_pretrained("runs/quickstart/model")
tokenizer.save_pretrained("runs/quickstart/model")
pipe = th.InfluencePipeline("runs/quickstart/model", train_dataset=data["train"])
out = pipe("a gripping, beautifully shot film that never lets go", top_k=3)
print("estimator", pipe.estimator, "| label", LABEL_NAMES[out["label"]], f"({out['label_source']})")
for kind in ("proponents", "opponents"):
    print(kind)
    for row in out[kind]:
        print(f"  {row['score']:+.4f}  {LABEL_NAMES[row['label']]:>6}  {row['text'][:90]}")"""),
    md("""
**How far to trust this?** For a single classifier the pipeline's default estimator (`estimator="auto"`) is the
damped Gauss-Newton influence function on the adapter and the head: it is fitted once on the training set, on the
first call, and in `benchmarks/fidelity.py` it predicts retraining best of every method measured. The model's own
masks give forward-pass-only scores (`estimator="turnover"`), but a single model's turn-over rankings are close to
noise there; an ensemble of mask seeds (`th.train_ensemble`, see the mislabel-detection notebook) makes them
reproducible and every answer then comes with its measured agreement."""),
    code("""
turnover = th.InfluencePipeline("runs/quickstart/model", train_dataset=data["train"], estimator="turnover")
print("top proponent by turn-over:", turnover("a gripping, beautifully shot film that never lets go", top_k=1)["proponents"][0]["text"][:90])"""),
]

ERRORS = [
    md("""
# Error interpretation (Kobayashi et al. 2020, Section 4)

For validation reviews the model gets wrong, which training reviews pushed it there (proponents of the wrong
prediction) and which pulled the other way? An ensemble of mask seeds makes the ranking reproducible enough to
read, and says how reproducible it is."""),
    code(SETUP),
    code("""
data = rotten_tomatoes(n_train=64 if SMALL else 600, n_validation=16 if SMALL else 200)
EPOCHS, MEMBERS = (1, 2) if SMALL else (2, 3)"""),
    code(MODEL),
    code("""
train, valid = encode(data["train"]), encode(data["validation"])
paths = th.train_ensemble(new_model, th.TurnoverConfig(seed=0), training_args("runs/errors"), train,
                          num_members=MEMBERS, freeze_leaking=True, processing_class=tokenizer)
pipe = th.InfluencePipeline("runs/errors", tokenizer, train_dataset=data["train"])
print(pipe.num_members, "members")"""),
    md("""
The misclassified validation reviews, scored against the label the model **predicted**: proponents are the
training reviews that made the wrong answer more likely."""),
    code("""
logits = torch.stack([logits_of(m, valid) for m in pipe.models]).mean(0)
wrong = (logits.argmax(-1) != torch.tensor(valid["label"])).nonzero().flatten()[:3].tolist()
errors = data["validation"].select(wrong).remove_columns("label")      # no label: scored against the prediction
for target, out in zip(errors, pipe(errors, top_k=2)):
    print(f"\\n{target['text'][:100]}\\n  predicted {LABEL_NAMES[out['label']]}, agreement {out['agreement']:.2f}")
    for kind in ("proponents", "opponents"):
        for row in out[kind]:
            print(f"  {kind[:3]} {row['score']:+.4f}  {LABEL_NAMES[row['label']]:>6}  {row['text'][:80]}")"""),
    md("""
Influence by class (HYDRA's inter-class view): mean influence of training reviews of each label on validation
targets of each label. A healthy model has a positive diagonal."""),
    code("""
targets = data["validation"].select(range(6 if SMALL else 12))
scores = pipe.scores(targets)
plots.class_influence_heatmap(scores, data["train"], targets, label_names=LABEL_NAMES)"""),
]

CLEANSING = [
    md("""
# Data cleansing (Kobayashi et al. 2020, Table 2)

Rank training reviews by their mean influence on the validation set; the most negative ones hurt it. Remove them,
retrain, and compare test accuracy with removing the same number of random reviews."""),
    code(SETUP),
    code("""
data = rotten_tomatoes(n_train=64 if SMALL else 400, n_validation=6 if SMALL else 8, n_test=32 if SMALL else 973)
EPOCHS, MEMBERS, REPEATS = (1, 2, 1) if SMALL else (2, 2, 1)
FRACTIONS = [0.05] if SMALL else [0.02, 0.05]"""),
    code(MODEL),
    code("""
train, valid, test = encode(data["train"]), encode(data["validation"]), encode(data["test"])
th.train_ensemble(new_model, th.TurnoverConfig(seed=0), training_args("runs/cleansing"), train,
                  num_members=MEMBERS, freeze_leaking=True, processing_class=tokenizer)
pipe = th.InfluencePipeline("runs/cleansing", tokenizer, train_dataset=data["train"])
ranked = pipe.mean_influence(data["validation"]).sort("mean_influence")      # most harmful first
ranked.select(range(5)).to_pandas()[["example_id", "label", "mean_influence", "text"]]"""),
    code("""
import random

def retrained_accuracy(drop_ids, seed=0):
    \"\"\"Test accuracy of the same recipe trained without drop_ids (no masks needed: an ordinary model).\"\"\"
    keep = train.filter(lambda row: row["example_id"] not in drop_ids)
    model = new_model()
    transformers.Trainer(model=model, args=training_args("runs/retrain", seed=seed), train_dataset=keep,
                         data_collator=DataCollatorWithPadding(tokenizer)).train()
    return accuracy(model, test)

base = [retrained_accuracy(set()) for _ in range(1)]
by_influence, by_random = [], []
for fraction in FRACTIONS:
    k = max(1, int(fraction * len(train)))
    by_influence.append(retrained_accuracy(set(ranked["example_id"][:k])))
    by_random.append([retrained_accuracy(set(random.Random(r).sample(train["example_id"], k)), seed=0)
                      for r in range(REPEATS)])
print("no removal", base[0])
for fraction, a, r in zip(FRACTIONS, by_influence, by_random):
    print(f"remove {fraction:.0%}: influence {a:.3f}  random {sum(r) / len(r):.3f}")"""),
    code("""
plots.cleansing_curve([0.0, *FRACTIONS], [base[0], *by_influence],
                      random_accuracy=[[base[0], *(r[i] for r in by_random)] for i in range(REPEATS)])"""),
    md("""
One retraining seed per point, and at notebook size (400 reviews, 2 epochs) the models are barely trained, so
these differences are mostly retraining noise. The paper reports +1.3 points; `benchmarks/fidelity.py` measures the
gain over several seeds with N = 2,000 and finds less than 1 point for every method on this data."""),
]

MISLABELS = [
    md("""
# Mislabel detection with self-influence (Kobayashi et al. 2020, App. E)

Flip 10% of the training labels, train, and rank training reviews by self-influence: a mislabelled review is
predicted correctly only by the sub-network that saw it, so its self-influence is high. Compare one model, an
ensemble of mask seeds, the influence-function estimator on the single model (`estimator="influence"`: gradients
instead of masks, no extra training), and the simple baseline of ranking by training loss."""),
    code(SETUP),
    code("""
from turnover_hf.evaluation import mislabel_detection

data = rotten_tomatoes(n_train=64 if SMALL else 500, n_validation=16)
EPOCHS, MEMBERS = (1, 2) if SMALL else (2, 3)
generator = torch.Generator().manual_seed(0)
flipped = torch.rand(len(data["train"]), generator=generator) < 0.1
noisy = data["train"].map(lambda row, i: {"label": 1 - row["label"] if flipped[i] else row["label"]}, with_indices=True)
print(int(flipped.sum()), "of", len(noisy), "labels flipped")"""),
    code(MODEL),
    code("""
train = encode(noisy)
th.train_ensemble(new_model, th.TurnoverConfig(seed=0), training_args("runs/mislabels"), train,
                  num_members=MEMBERS, freeze_leaking=True, processing_class=tokenizer)
ensemble = th.InfluencePipeline("runs/mislabels", tokenizer, train_dataset=noisy)
single = th.InfluencePipeline("runs/mislabels/member-0", tokenizer, train_dataset=noisy, estimator="turnover")
influence = th.InfluencePipeline("runs/mislabels/member-0", tokenizer, train_dataset=noisy, estimator="influence")
own = {"one model": single.self_influence(), f"ensemble of {MEMBERS}": ensemble.self_influence(),
       "influence function": influence.self_influence()}"""),
    code("""
logits = torch.stack([logits_of(m, train) for m in ensemble.models]).mean(0)
loss = torch.nn.functional.cross_entropy(logits, torch.tensor(train["label"]), reduction="none")
for name, values in [*own.items(), ("training loss", loss)]:
    values = values["self_influence"] if hasattr(values, "column_names") else values
    result = mislabel_detection(values, flipped, low_is_suspicious=False)
    print(f"{name:>18}: AUC {result['auc']:.3f}  recall@10% {result['recall@10%']:.2f}")"""),
    code("""
plots.self_influence_histogram(own[f"ensemble of {MEMBERS}"], mislabelled=flipped.tolist())"""),
    code("""
suspects = own[f"ensemble of {MEMBERS}"].add_column("flipped", flipped.tolist()).sort("self_influence", reverse=True)
suspects.select(range(8)).to_pandas()[["example_id", "label", "flipped", "self_influence", "text"]]"""),
    md("""
**Read these numbers for what they are.** At notebook size (500 reviews, 2 epochs, 3 members) the models are
barely trained, and neither self-influence nor the training loss finds the flipped labels well. At benchmark size
(`benchmarks/fidelity.py`: N = 2,000, up to 64 members) an ensemble's self-influence reaches AUC 0.76-0.83, at or
above the training-loss baseline, a single model 0.68-0.74 and the influence function 0.72-0.81. Raise `n_train`,
`EPOCHS` and `MEMBERS` for real use."""),
]

HYDRA = [
    md("""
# HYDRA and turn-over dropout on one checkpoint

`HydraTurnoverTrainer` trains with instance masks *and* tracks every example's hypergradient (Chen et al. 2021),
so one run feeds both estimators behind the same `InfluencePipeline` API. How much do their rankings agree?"""),
    code(SETUP),
    code("""
data = rotten_tomatoes(n_train=48 if SMALL else 200, n_validation=6 if SMALL else 40)
EPOCHS = 1 if SMALL else 2"""),
    code(MODEL),
    code("""
train = encode(data["train"])
model = th.patch_model(new_model(), th.TurnoverConfig(seed=0), freeze_leaking=True)
args = training_args("runs/hydra")
trainer = th.HydraTurnoverTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
trainer.train()
model.save_pretrained("runs/hydra/model"); tokenizer.save_pretrained("runs/hydra/model")
trainer.hydra.save("runs/hydra/model/hydra")"""),
    code("""
from turnover_hf.evaluation import spearman_columns

turnover = th.InfluencePipeline("runs/hydra/model", train_dataset=data["train"], estimator="turnover")
hydra = th.InfluencePipeline("runs/hydra/model", train_dataset=data["train"], estimator="hydra")
targets = data["validation"]
a, b = turnover.scores(targets), hydra.scores(targets)
per_target = spearman_columns(a.numpy(), b.numpy())
print(f"Spearman per target: mean {per_target.mean():.2f} (min {per_target.min():.2f}, max {per_target.max():.2f})")
top = lambda m: set(m[:, 0].topk(10).indices.tolist())
print("top-10 proponents of target 0 in common:", len(top(a) & top(b)))"""),
    md("""
The agreement is moderate: both see which class an example belongs to, but a single turn-over model's ranking
within a class is mostly mask noise. See the fidelity table in docs/method/quality.md for how each compares with retraining."""),
]


LANGUAGE_MODEL = [
    md("""
# A language model's training sentences (Kobayashi et al. 2020, App. A)

Train a small GPT-2 from scratch on real review sentences with turn-over dropout: every sentence's tokens run
under that sentence's mask. Then list the sentences with the highest self-influence (learned only by memorising
them) and the lowest (the rest of the corpus predicts them as well), and explain a completion token by token."""),
    code(SETUP),
    code("""
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

train = rotten_tomatoes(n_train=64 if SMALL else 2000)["train"].remove_columns("label")
backend = ByteLevelBPETokenizer()
backend.train_from_iterator(train["text"], vocab_size=2000, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend._tokenizer, eos_token="<|endoftext|>",
                                    pad_token="<|endoftext|>")
train = train.map(lambda rows: {"input_ids": [ids[:63] + [tokenizer.eos_token_id]
                                              for ids in tokenizer(rows["text"])["input_ids"]]}, batched=True)
model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=128, n_layer=2, n_head=4, n_positions=128,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False))"""),
    md("""
Masks on every `Conv1D` of the transformer (GPT-2 uses transformers' `Conv1D`, not `nn.Linear`) and on the
LM head's inputs. Embeddings and norms would learn from every sentence, so `freeze_leaking` keeps them frozen."""),
    code("""
config = th.TurnoverConfig(seed=0, target_module_types=["Conv1D"], target_modules=["lm_head"], mask_inputs_of=["lm_head"])
model = th.patch_model(model, config, freeze_leaking=True)
args = TrainingArguments("runs/lm", num_train_epochs=1 if SMALL else 4, per_device_train_batch_size=32,
                         learning_rate=3e-3, lr_scheduler_type="cosine", warmup_ratio=0.05, save_strategy="no",
                         report_to=[], logging_strategy="epoch", use_cpu=True, seed=0, disable_tqdm=True)
th.TurnoverTrainer(model=model, args=args, train_dataset=train).train()"""),
    code("""
pipe = th.InfluencePipeline(model, tokenizer, train_dataset=train, batch_size=128)
ranked = pipe.self_influence().sort("self_influence", reverse=True)
print("highest self-influence")
for row in ranked.select(range(5)):
    print(f"  {row['self_influence']:+.3f}  {row['text'][:100]}")
print("lowest self-influence")
for row in ranked.select(range(len(ranked) - 5, len(ranked))):
    print(f"  {row['self_influence']:+.3f}  {row['text'][:100]}")"""),
    md("""
A target is a prompt and a completion; only the completion's tokens count. Each proponent comes with its
influence on every completion token."""),
    code("""
out = pipe(("The film is", " a great comedy"), top_k=3)
print("tokens:", out["tokens"])
for row in out["proponents"]:
    print(f"  {row['score']:+.4f}", [round(v, 3) for v in row["token_scores"]], row["text"][:70])"""),
]

LABEL_ISSUES = [
    md("""
# Find and fix label errors (one training run)

Flip 20% of the training labels, train once with `TrainingDynamicsCallback` (it records every example's logits under
its mask and its flipped mask at every epoch), rank the training set with `pipe.label_issues()`, then retrain without
the flagged examples, with them relabelled, and without as many random examples (`th.cleansing_report`).
`benchmarks/label_errors.py` measures the same over 2 datasets, 3 noise patterns and 5 retrain seeds; this notebook
is one seed at a small size."""),
    code(SETUP),
    code("""
import datasets
from turnover_hf.evaluation import roc_auc
datasets.disable_progress_bars()

data = rotten_tomatoes(n_train=64 if SMALL else 1000, n_validation=8, n_test=32 if SMALL else 973)
EPOCHS, SEEDS = (1, [0]) if SMALL else (2, [0])
generator = torch.Generator().manual_seed(0)
flipped = torch.rand(len(data["train"]), generator=generator) < 0.2
noisy = data["train"].map(lambda row, i: {"label": 1 - row["label"] if flipped[i] else row["label"]}, with_indices=True)
print(int(flipped.sum()), "of", len(noisy), "labels flipped")"""),
    code(MODEL),
    code("""
train, test = encode(noisy), encode(data["test"])
model = new_model()
model.config.id2label, model.config.label2id = dict(enumerate(LABEL_NAMES)), {n: i for i, n in enumerate(LABEL_NAMES)}
model = th.patch_model(model, th.TurnoverConfig(seed=0), freeze_leaking=True)
trainer = th.TurnoverTrainer(model=model, args=training_args("runs/labels"), train_dataset=train,
                             processing_class=tokenizer, callbacks=[th.TrainingDynamicsCallback()])
trainer.train()
trainer.save_model("runs/labels/model")          # weights + turnover_config.json + training_dynamics.safetensors
pipe = th.InfluencePipeline("runs/labels/model", tokenizer, train_dataset=noisy)
ranked = pipe.label_issues()                      # default: loss_classnorm, the benchmark's best
ranked.select(range(5)).to_pandas()[["example_id", "given_label_name", "suggested_label_name", "score", "is_issue", "text"]]"""),
    code("""
is_flipped = dict(zip(noisy["example_id"], flipped.tolist()))
for method in ["loss_classnorm", "loss", "flip_loss", "dynamics_flip_loss", "aum"]:
    r = pipe.label_issues(method)
    auc = roc_auc([-i for i in range(len(r))], [is_flipped[i] for i in r["example_id"]])
    print(f"{method:20s} AUC {auc:.3f}")
print("flagged:", sum(ranked["is_issue"]), "of which really flipped:",
      sum(is_flipped[i] for i, f in zip(ranked["example_id"], ranked["is_issue"]) if f))"""),
    md("""
## The whole audit in one call

`pipe.audit(validation, test)` puts the wrong labels beside the other data issues: near duplicates within the
training set and leakage into the validation/test sets (text search), outliers (the model's own hidden states) and
the training reviews most harmful to the validation set (mean influence). Each row says which signal produced it
(`source`); `.info.description` says what was skipped. See `docs/guides/audit.md` for what each kind measured."""),
    code("""
issues = pipe.audit(validation=data["validation"], test=data["test"])
print({kind: sum(k == kind for k in issues["kind"]) for kind in ["wrong_label", "duplicate", "leakage", "outlier", "data_value"]})
print("wrong_label rows that were really flipped:",
      sum(is_flipped[i] for i, k in zip(issues["example_id"], issues["kind"]) if k == "wrong_label"))
issues.to_pandas().groupby("kind").head(2)[["kind", "example_id", "score", "reason", "source"]]"""),
    code("""
def train_and_evaluate(dataset, seed):
    \"\"\"Test accuracy of the same recipe (an ordinary model) trained on dataset with seed.\"\"\"
    model = new_model()
    transformers.Trainer(model=model, args=training_args("runs/retrain", seed=seed), train_dataset=encode(dataset),
                         data_collator=DataCollatorWithPadding(tokenizer)).train()
    return accuracy(model, test)

report = th.cleansing_report(train_and_evaluate, noisy, ranked, seeds=SEEDS)
for name in ("noisy", "removed", "relabelled", "random"):
    print(f"{name:10s} test accuracy {report[name]['mean']:.3f}")
print("removed - random:", round(report["removed_minus_random"]["mean"], 3))"""),
    md("""
One retraining seed at 1,000 reviews is mostly noise. The benchmark's numbers (5 seeds, 2,000 reviews and a
3-class corpus) are in `benchmarks/results/label_errors.md`."""),
]

NOTEBOOKS = {
    "quickstart": QUICKSTART,
    "error_interpretation": ERRORS,
    "data_cleansing": CLEANSING,
    "mislabel_detection": MISLABELS,
    "hydra_vs_turnover": HYDRA,
    "language_model": LANGUAGE_MODEL,
    "label_issues": LABEL_ISSUES,
}


def build(name: str, execute: bool = True) -> str:
    notebook = nbformat.v4.new_notebook(cells=NOTEBOOKS[name])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if execute:
        start = time.perf_counter()
        NotebookClient(notebook, timeout=1800, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
        print(f"{name}: executed in {time.perf_counter() - start:.0f} s")
    path = os.path.join(HERE, f"{name}.ipynb")
    tmp = path + ".tmp"
    nbformat.write(notebook, tmp)
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    for name in sys.argv[1:] or list(NOTEBOOKS):
        build(name)
