"""Fine-tune an influence-ready classifier on your own CSV (columns: text, label) and save it.

    python examples/train_on_csv.py --csv reviews.csv --model path/or/hub-id --output-dir out
    python examples/train_on_csv.py --csv reviews.csv --push-to-hub you/reviews-influence-ready   # and upload it
Then explain predictions with examples/explain.py, or score on several processes with examples/score_sharded.py.
"""

import argparse

import adapters
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, TrainingArguments

import turnover_hf

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--csv", required=True)
parser.add_argument("--model", default=None, help="model folder or Hub id (default: the offline all-MiniLM-L6-v2)")
parser.add_argument("--output-dir", default="out")
parser.add_argument("--epochs", type=float, default=3)
parser.add_argument("--seed", type=int, default=0, help="mask seed")
parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                    help="also upload the influence-ready checkpoint (weights, turnover_config.json, model card)")
args = parser.parse_args()

model_path = args.model or turnover_hf.assets.minilm_path()
data = load_dataset("csv", data_files=args.csv)["train"]
data = turnover_hf.add_example_ids(data)  # ids before any split or shuffle: they stay with their rows
num_labels = len(set(data["label"]))
tokenizer = AutoTokenizer.from_pretrained(model_path)
model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
adapters.init(model)
model.add_adapter("task", config=adapters.SeqBnConfig(reduction_factor=8))
model.train_adapter("task")
model = turnover_hf.patch_model(model, turnover_hf.TurnoverConfig(seed=args.seed), freeze_leaking=True)

tokenized = data.map(lambda rows: tokenizer(rows["text"], truncation=True, max_length=128), batched=True)
trainer = turnover_hf.TurnoverTrainer(
    model=model,
    args=TrainingArguments(args.output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=32,
                           learning_rate=1e-3, report_to=[], save_strategy="no"),
    train_dataset=tokenized,
    data_collator=DataCollatorWithPadding(tokenizer),
)
trainer.train()
model.save_pretrained(f"{args.output_dir}/model")
tokenizer.save_pretrained(f"{args.output_dir}/model")
data.save_to_disk(f"{args.output_dir}/train")  # the training set with its ids, for explaining later
print(f"influence-ready model in {args.output_dir}/model, training data in {args.output_dir}/train")
if args.push_to_hub:  # anyone can then load it with the same masks: turnover_hf.load_influence_ready(REPO_ID)
    model.push_to_hub(args.push_to_hub)
    tokenizer.push_to_hub(args.push_to_hub)
    print(f"pushed to {args.push_to_hub}")
