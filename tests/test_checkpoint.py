import json
import os

import pytest
import torch
from huggingface_hub import ModelCard

import turnover_hf as th

from conftest import batch_of, tiny_bert, tiny_gpt2, tiny_roberta, with_bottleneck, with_lora


@pytest.mark.parametrize(
    "factory",
    [
        lambda: with_bottleneck(tiny_bert()),
        lambda: with_lora(tiny_bert()),
        lambda: tiny_roberta(),
        lambda: with_bottleneck(tiny_gpt2()),
    ],
    ids=["bert-bottleneck", "bert-lora", "roberta-head", "gpt2-bottleneck"],
)
def test_save_load_gives_identical_scores(factory, tmp_path, train_set):
    model = th.patch_model(factory(), th.TurnoverConfig(seed=21, p=0.4), freeze_leaking=True).eval()
    with torch.no_grad():  # move the adapters off their initialisation so a failed load would show
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    targets = batch_of(train_set, range(3))
    targets["labels"] = targets["labels"] % model.config.num_labels
    before = th.influence(model, targets, example_ids=torch.arange(20))
    model.save_pretrained(tmp_path / "ckpt")
    files = set(os.listdir(tmp_path / "ckpt"))
    assert {"config.json", "model.safetensors", th.CONFIG_NAME, "README.md"} <= files
    assert not any(f.startswith(".") for f in files)  # no temporary files left behind
    loaded = th.load_influence_ready(tmp_path / "ckpt")
    assert type(loaded).__name__ == type(model).__name__
    assert loaded.turnover_config.mask_sites == model.turnover_config.mask_sites
    assert torch.equal(th.influence(loaded, targets, example_ids=torch.arange(20)), before)


def test_checkpoint_files_are_plain_and_the_card_says_how(tmp_path):
    model = th.patch_model(with_bottleneck(tiny_bert()), th.TurnoverConfig(seed=4), freeze_leaking=True)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "README.md").write_text("---\nlicense: mit\n---\n# My model\n\nNotes the user wrote.\n")
    model.save_pretrained(out)
    model.save_pretrained(out)  # saving twice refreshes our section, keeps the user's text once
    saved = json.loads((out / th.CONFIG_NAME).read_text())
    assert saved["seed"] == 4 and saved["p"] == 0.5 and saved["scheme"] == "independent"
    assert saved["active_adapters"] == ["bn"]
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit" and "influence-ready" in card.data.tags
    assert card.text.count("Notes the user wrote.") == 1 and card.text.count("turnover-hf:start") == 1
    assert "load_influence_ready" in card.text


def test_loading_with_a_mismatched_config_refuses(tmp_path):
    model = th.patch_model(with_bottleneck(tiny_bert()), th.TurnoverConfig(seed=4), freeze_leaking=True)
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(th.ConfigMismatchError, match="seed: 4 vs 5"):
        th.load_influence_ready(tmp_path / "ckpt", config=th.TurnoverConfig(seed=5))
    th.load_influence_ready(tmp_path / "ckpt", config=th.TurnoverConfig(seed=4, mask_sites=model.turnover_config.mask_sites))
    # Masks wider than the layer: a config that records 16 units where the model has 32.
    path = tmp_path / "ckpt" / th.CONFIG_NAME
    data = json.loads(path.read_text())
    data["mask_sites"]["classifier"]["units"] = 16
    path.write_text(json.dumps(data))
    with pytest.raises(th.ConfigMismatchError, match="16 units of 'classifier' but that layer has 32"):
        th.load_influence_ready(tmp_path / "ckpt")
    data["mask_sites"]["bert.pooler.no_such_module"] = {"side": "output", "units": 32}
    path.write_text(json.dumps(data))
    with pytest.raises(th.NoTargetMatchedError, match="no_such_module"):
        th.load_influence_ready(tmp_path / "ckpt")


def test_a_recorded_trainable_parameter_the_model_lacks_is_refused(tmp_path):
    model = th.patch_model(with_bottleneck(tiny_bert()), th.TurnoverConfig(seed=4), freeze_leaking=True)
    model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / th.CONFIG_NAME
    data = json.loads(path.read_text())
    assert data["trainable_parameters"] == [n for n, p in model.named_parameters() if p.requires_grad]
    data["trainable_parameters"].append("bert.no_such.weight")
    path.write_text(json.dumps(data))
    with pytest.raises(th.ConfigMismatchError, match="lacks: \\['bert.no_such.weight'\\]"):
        th.load_influence_ready(tmp_path / "ckpt")


def test_plain_checkpoints_are_refused_clearly(tmp_path):
    tiny_bert().save_pretrained(tmp_path / "plain")
    with pytest.raises(th.ConfigMismatchError, match="not an influence-ready checkpoint"):
        th.load_influence_ready(tmp_path / "plain")
    model = th.patch_model(tiny_bert(), warn_leaking=False)
    model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert not (tmp_path / "pickled" / "model.safetensors").exists()
    with pytest.raises(OSError, match="safetensors"):
        th.load_influence_ready(tmp_path / "pickled")  # a pickled checkpoint is never unpickled


def test_push_to_hub_uploads_the_influence_ready_folder(tmp_path, monkeypatch):
    """Everything up to the network call: push_to_hub saves through our save_pretrained and uploads that folder."""
    model = th.patch_model(with_bottleneck(tiny_bert()), th.TurnoverConfig(seed=8), freeze_leaking=True)
    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        return repo_id

    def upload(self, working_dir, repo_id, files_timestamps, **kwargs):
        uploaded["repo"] = repo_id
        uploaded["files"] = sorted(os.listdir(working_dir))
        uploaded["config"] = json.loads(open(os.path.join(working_dir, th.CONFIG_NAME)).read())
        uploaded["card"] = open(os.path.join(working_dir, "README.md")).read()

    # The network boundary of transformers' PushToHubMixin, replaced (no Hub here); the save path runs for real.
    monkeypatch.setattr(type(model), "_create_repo", create_repo)
    monkeypatch.setattr(type(model), "_upload_modified_files", upload)
    model.push_to_hub("someone/tiny-influence-ready")
    assert uploaded["repo"] == "someone/tiny-influence-ready"
    assert {"config.json", "model.safetensors", th.CONFIG_NAME, "README.md"} <= set(uploaded["files"])
    assert uploaded["config"]["seed"] == 8
    assert 'load_influence_ready("someone/tiny-influence-ready")' in uploaded["card"]


def test_written_files_are_ordinary_readable_files(tmp_path):
    import stat

    model = th.patch_model(tiny_bert(), warn_leaking=False)
    model.save_pretrained(tmp_path / "ckpt")
    umask = os.umask(0)
    os.umask(umask)
    for name in (th.CONFIG_NAME, "README.md", "model.safetensors", "config.json"):
        mode = stat.S_IMODE(os.stat(tmp_path / "ckpt" / name).st_mode)
        assert mode == 0o666 & ~umask, (name, oct(mode))


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_weights(model, expected):
    return all(torch.equal(v, expected[k]) for k, v in model.state_dict().items() if k in expected)


def test_saving_over_another_model_leaves_exactly_the_new_checkpoint(tmp_path):
    """Model A saved in shards with an influence fit beside it, then model B (unsharded, other masks) into the same
    folder: only B's files remain, and loading gives B."""
    out = tmp_path / "ckpt"
    a = th.patch_model(tiny_bert(seed=1), th.TurnoverConfig(seed=1), warn_leaking=False)
    a.save_pretrained(out, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").exists()
    (out / "influence").mkdir()
    (out / "influence" / "influence.json").write_text("{}")  # a fit of A
    (out / "tokenizer_config.json").write_text("{}")  # not part of a model: kept
    b = th.patch_model(tiny_bert(seed=2), th.TurnoverConfig(seed=2), warn_leaking=False)
    b.save_pretrained(out)
    names = sorted(os.listdir(out))
    assert names == sorted(["README.md", "config.json", "model.safetensors", th.CONFIG_NAME, "tokenizer_config.json"])
    loaded = th.load_influence_ready(out)
    assert loaded.turnover_config.seed == 2 and _same_weights(loaded, _weights(b))
    assert not [n for n in os.listdir(tmp_path) if n != "ckpt"]  # no staging folder left beside it


def test_a_save_that_fails_before_it_is_complete_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    a = th.patch_model(tiny_bert(seed=1), th.TurnoverConfig(seed=1), warn_leaking=False)
    a.save_pretrained(out)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    b = th.patch_model(tiny_bert(seed=2), th.TurnoverConfig(seed=2), warn_leaking=False)

    def crash(self, *args, **kwargs):  # the process dies after B's weights are written, before its config
        raise KeyboardInterrupt

    monkeypatch.setattr(th.TurnoverConfig, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        b.save_pretrained(out)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before  # A, untouched
    monkeypatch.undo()
    loaded = th.load_influence_ready(out)
    assert loaded.turnover_config.seed == 1 and _same_weights(loaded, _weights(a))


def test_a_save_interrupted_while_moving_in_is_completed_by_the_next_load(tmp_path, monkeypatch):
    from turnover_hf.checkpoint import save as save_module

    out = tmp_path / "ckpt"
    a = th.patch_model(tiny_bert(seed=1), th.TurnoverConfig(seed=1), warn_leaking=False)
    a.save_pretrained(out, max_shard_size="20KB")
    b = th.patch_model(tiny_bert(seed=2), th.TurnoverConfig(seed=2), warn_leaking=False)
    real_move = save_module._move_in

    def dies_after_one_file(staging, folder, names):  # the power fails after the first file was moved in
        real_move(staging, folder, names[:1])
        raise SystemExit

    monkeypatch.setattr(save_module, "_move_in", dies_after_one_file)
    with pytest.raises(SystemExit):
        b.save_pretrained(out)
    monkeypatch.undo()
    assert (out / save_module.JOURNAL).exists()  # a mix of A and B on disk, and the journal that says so
    loaded = th.load_influence_ready(out)
    assert loaded.turnover_config.seed == 2 and _same_weights(loaded, _weights(b))
    assert not (out / save_module.JOURNAL).exists() and not (out / "model.safetensors.index.json").exists()
    assert not [n for n in os.listdir(tmp_path) if n != "ckpt"]


def test_a_folder_with_two_sets_of_weights_is_refused(tmp_path):
    """What earlier versions left after saving an unsharded model over a sharded one."""
    out = tmp_path / "ckpt"
    model = th.patch_model(tiny_bert(), th.TurnoverConfig(seed=1), warn_leaking=False)
    model.save_pretrained(out, max_shard_size="20KB")
    model.save_pretrained(tmp_path / "single")
    os.replace(tmp_path / "single" / "model.safetensors", out / "model.safetensors")
    with pytest.raises(th.ConfigMismatchError, match="holds two sets of weights"):
        th.load_influence_ready(out)


def test_patched_models_keep_their_class_name_and_unpatching_restores_the_class(tmp_path):
    model = tiny_bert()
    cls = type(model)
    th.patch_model(model, warn_leaking=False)
    assert type(model).__name__ == cls.__name__ and isinstance(model, cls)
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["architectures"] == [cls.__name__]
    th.unpatch_model(model)
    assert type(model) is cls
    model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / th.CONFIG_NAME).exists()


def test_the_checkpoint_package_does_not_import_back_from_the_patcher():
    """patcher.py is below checkpoint/: it must not import it (the old lazy import made a cycle)."""
    import ast
    import inspect

    import turnover_hf.patcher as patcher

    tree = ast.parse(inspect.getsource(patcher))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any("checkpoint" in (name or "") for name in imported)


def test_adapters_come_back_in_the_dtype_the_model_was_loaded_in(tmp_path):
    model = th.patch_model(with_bottleneck(tiny_bert()), th.TurnoverConfig(seed=3), freeze_leaking=True)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = th.load_influence_ready(tmp_path / "ckpt", torch_dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    with torch.no_grad(), th.instance_masks(loaded, torch.tensor([0, 1]), mode="flip"):
        logits = loaded(input_ids=torch.tensor([[2, 7, 8], [2, 9, 5]])).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("path, message", [
    ("./does/not/exist", "does not exist"),
    ("someone/not-downloadable", "neither a local folder nor a Hub repository"),
])
def test_a_path_that_does_not_exist_is_named(path, message):
    with pytest.raises(th.ConfigMismatchError, match=message):
        th.load_influence_ready(path)


def test_a_plain_folder_without_config_json_is_named(tmp_path):
    model = th.patch_model(tiny_bert(), warn_leaking=False)
    model.save_pretrained(tmp_path / "ckpt")
    os.remove(tmp_path / "ckpt" / "config.json")
    with pytest.raises(th.ConfigMismatchError, match="has no config.json"):
        th.load_influence_ready(tmp_path / "ckpt")
