"""Property-based tests of every input surface a user touches: pipeline targets, example ids and top_k,
``TurnoverConfig(...)`` and ``turnover_config.json``, ``patch_model`` and the CLI's data files.

The property everywhere: a right answer, or a ``TurnoverError`` / ``ValueError`` whose message names the argument
(or the file); never another exception, never a silently different answer.

Profiles: ``default`` (a few dozen examples per entry point, for CI) and ``long`` (1000 per entry point):
    HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz_inputs.py -q
"""

import copy
import dataclasses
import io
import json
import math
import os
import re
import typing

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import turnover_hf as th
from turnover_hf.cli.tables import class_names, encode_labels, load_table, standard_columns
from turnover_hf.config import CONFIG_NAME, REQUIRED_FIELDS

from conftest import text_task, tiny_bert, with_bottleneck, word_tokenizer
from test_turnover import perturbed_top_adapter

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                     HealthCheck.filter_too_much], derandomize=False)
settings.register_profile("default", max_examples=40, **_COMMON)
settings.register_profile("long", max_examples=1000, **_COMMON)
FUZZ = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

N_TRAIN = 16


def named(err: BaseException, *names: str) -> bool:
    """A message naming one of ``names`` (the argument, the field, the file)."""
    return isinstance(err, ValueError) and any(n in str(err) for n in names)


# -- pipeline targets --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    tokenizer = word_tokenizer(tmp_path_factory.mktemp("tok"))
    train = text_task(N_TRAIN)
    model = perturbed_top_adapter(6, freeze_leaking=True)
    model.turnover_config.num_train_examples = N_TRAIN
    return th.InfluencePipeline(model, tokenizer, train_dataset=train, estimator="turnover")


WORDS = [f"w{i}" for i in range(5, 64)]
texts = st.one_of(
    st.lists(st.sampled_from(WORDS), min_size=0, max_size=40).map(" ".join),  # incl. "" and longer than the model
    st.text(max_size=30),                                                    # any unicode (unknown words: [UNK])
)
labels = st.one_of(st.none(), st.sampled_from([0, 1]), st.sampled_from(["LABEL_0", "LABEL_1"]),
                   st.sampled_from([0.0, 1.0]))
CONTAINERS = ["str", "dict", "list of str", "list of dicts", "dict of lists", "DataFrame", "Dataset"]


def _contained(kind: str, items: list[tuple[str, typing.Any]]):
    """The targets ``items`` (text, label or None) written as ``kind``."""
    rows = [{"text": t} if y is None else {"text": t, "label": y} for t, y in items]
    if kind == "str":
        return items[0][0]
    if kind == "dict":
        return rows[0]
    if kind == "list of str":
        return [t for t, _ in items]
    if kind == "list of dicts":
        return rows
    column = {"text": [t for t, _ in items]}
    if any(y is not None for _, y in items):
        column["label"] = [y for _, y in items]
    if kind == "dict of lists":
        return column
    if kind == "DataFrame":
        return pd.DataFrame(column)
    return Dataset.from_dict(column)


def _class(y):
    return None if y is None else int(y[-1]) if isinstance(y, str) else int(y)


@FUZZ
@given(kind=st.sampled_from(CONTAINERS), items=st.lists(st.tuples(texts, labels), min_size=1, max_size=4))
def test_targets_in_any_container_get_each_targets_own_answer(pipe, kind, items):
    if kind in ("str", "dict"):
        items = items[:1]
    if kind in ("str", "list of str"):
        items = [(t, None) for t, _ in items]
    if kind in ("DataFrame", "Dataset", "dict of lists") and any(isinstance(y, str) for _, y in items):
        items = [(t, _class(y)) for t, y in items]  # one type per column
    targets = _contained(kind, items)
    try:
        got = pipe.scores(targets)
    except ValueError as err:
        # well-formed targets are never refused
        assert named(err, "target"), err
        raise
    # the right answer: each target alone, given as a plain dict with its class index
    alone = [pipe.scores({"text": t} if y is None else {"text": t, "label": _class(y)}) for t, y in items]
    assert got.shape == (N_TRAIN, len(items))
    assert torch.allclose(got, torch.cat(alone, dim=1), atol=1e-5)
    out = pipe(targets, top_k=2)
    assert isinstance(out, dict) == (kind in ("str", "dict"))
    for result, (_, y) in zip([out] if isinstance(out, dict) else out, items):
        assert result["label_source"] == ("predicted" if y is None else "given")
        if y is not None:
            assert result["label"] == _class(y)


json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(),
              st.text(max_size=8), st.binary(max_size=4)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner, inner),
                            st.dictionaries(st.one_of(st.sampled_from(["text", "label", "labels", "input_ids",
                                                                       "attention_mask", "example_id"]),
                                                      st.text(max_size=4), st.integers()), inner, max_size=3)),
    max_leaves=8,
)


def _frame(columns: dict) -> typing.Any:
    n = min((len(v) for v in columns.values()), default=0)
    return pd.DataFrame({k: v[:n] for k, v in columns.items()})


frames = st.dictionaries(
    st.sampled_from(["text", "label", "labels", "sentence", "note", "example_id", "input_ids", 0]),
    st.lists(st.one_of(st.none(), st.text(max_size=6), st.integers(-2, 3), st.floats(), st.sampled_from(WORDS),
                       st.lists(st.integers(-2, 100), max_size=3)), max_size=3),
    max_size=4,
).map(_frame)
def _as_dataset(frame):
    try:
        return Dataset.from_pandas(frame, preserve_index=False)
    except Exception:  # noqa: BLE001 - pyarrow cannot hold a column of mixed types: keep the DataFrame
        return frame


junk_targets = st.one_of(json_like, frames, frames.map(_as_dataset))


@FUZZ
@given(junk=junk_targets)
def test_any_other_target_is_a_right_answer_or_refused_by_name(pipe, junk):
    try:
        got = pipe.scores(junk)
    except ValueError as err:
        assert named(err, "target"), err
        return
    except Exception as err:  # noqa: BLE001 - the property: nothing else
        raise AssertionError(f"{type(err).__name__} for targets={junk!r}: {err}") from err
    assert got.shape[0] == N_TRAIN and torch.isfinite(got).all()


# -- example ids and top_k ---------------------------------------------------------------------------------------
ids_like = st.one_of(
    st.lists(st.integers(min_value=-3, max_value=N_TRAIN + 3), max_size=6),
    st.lists(st.integers(min_value=-(2**70), max_value=2**70), max_size=3),
    st.lists(st.floats(allow_nan=True), max_size=3),
    st.lists(st.sampled_from([0, 1, 2, 1.0, "1", None, True]), max_size=4),
    st.integers(), st.floats(), st.text(max_size=3), st.none(),
    st.lists(st.integers(0, N_TRAIN - 1), min_size=1, max_size=5).map(torch.tensor),
    st.lists(st.integers(0, N_TRAIN - 1), min_size=1, max_size=5).map(lambda v: torch.tensor(v).float()),
    st.lists(st.lists(st.integers(0, N_TRAIN - 1), min_size=2, max_size=2), min_size=1, max_size=2),
    st.lists(st.integers(0, N_TRAIN - 1), min_size=1, max_size=5, unique=True).map(np.array),
    st.lists(st.integers(0, N_TRAIN - 1), min_size=1, max_size=5, unique=True).map(pd.Series),
    st.lists(st.integers(0, N_TRAIN - 1), min_size=1, max_size=5, unique=True).map(
        lambda v: Dataset.from_dict({"example_id": v})["example_id"]),
    st.builds(range, st.integers(0, 3), st.integers(0, N_TRAIN + 2)),
    st.sets(st.integers(0, N_TRAIN - 1), max_size=3),
)


@FUZZ
@given(ids=ids_like, top_k=st.one_of(st.none(), st.integers(-2, N_TRAIN + 3), st.floats(), st.booleans(),
                                      st.text(max_size=2)))
def test_example_ids_and_top_k_give_the_rows_asked_for_or_are_refused_by_name(pipe, ids, top_k):
    full = pipe.scores("w5 w7 w9")
    try:
        got = pipe.scores("w5 w7 w9", example_ids=ids)
    except ValueError as err:
        assert named(err, "example_ids", "example id"), err
    else:
        wanted = torch.as_tensor(list(ids)) if ids is not None else torch.arange(N_TRAIN)
        assert wanted.dtype in (torch.int64, torch.int32) and len(set(wanted.tolist())) == len(wanted)
        assert torch.allclose(got, full[wanted], atol=1e-6)  # ids are the row index of text_task's example_id column
    try:
        out = pipe("w5 w7 w9", top_k=top_k)
    except ValueError as err:
        assert named(err, "top_k"), err
    else:
        k = pipe.top_k if top_k is None else top_k
        assert isinstance(k, int) and not isinstance(k, bool) and k >= 1
        assert len(out["proponents"]) == len(out["opponents"]) == min(k, N_TRAIN)
        best = torch.topk(full[:, 0], min(k, N_TRAIN))
        assert [p["example_id"] for p in out["proponents"]] == best.indices.tolist()


# -- TurnoverConfig(...) and turnover_config.json ----------------------------------------------------------------
FIELDS = {f.name: f for f in dataclasses.fields(th.TurnoverConfig)}
HINTS = typing.get_type_hints(th.TurnoverConfig)
field_values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(),
    st.sampled_from([0.5, 0.1, 0.9, 1, 3, 64, "independent", "hashed", "classifier", ".*", "(", "example_id"]),
    st.text(max_size=6), st.lists(st.sampled_from(["classifier", "bert.pooler.dense", "(", 3, None]), max_size=3),
    st.dictionaries(st.text(max_size=4), st.one_of(st.integers(), st.text(max_size=3),
                                                   st.dictionaries(st.sampled_from(["side", "units", "channels"]),
                                                                   st.one_of(st.integers(-1, 40), st.sampled_from(
                                                                       ["input", "output", "rank", "x"])))),
                    max_size=2),
)


def has_type(value, kind) -> bool:
    """``value`` is of the declared type ``kind`` (Optional, Union, list[...], dict[...] followed)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is typing.Any:
        return True
    if origin is typing.Union:
        return any(has_type(value, a) for a in args)
    if kind is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(has_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(has_type(k, args[0]) and has_type(v, args[1]) for k, v in value.items())
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_config(config, name, value):
    """An accepted field keeps the value given (as its type) and the config survives its own JSON file."""
    kept = getattr(config, name)
    assert has_type(kept, HINTS[name]), (name, value, kept)
    if name == "target_module_types" and isinstance(value, str):
        assert kept == [value]
    elif name in ("target_modules", "exclude_modules", "mask_inputs_of") and isinstance(value, tuple):
        assert list(kept) == list(value)
    else:
        assert kept == value or (isinstance(value, float) and math.isnan(value) and math.isnan(kept)), (name, value)
    again = th.TurnoverConfig.from_dict(json.loads(config.to_json_string()))
    assert again.to_dict() == json.loads(config.to_json_string())


@FUZZ
@given(name=st.sampled_from(sorted(FIELDS)), value=field_values)
def test_config_arguments_are_kept_or_refused_naming_the_field(name, value):
    try:
        config = th.TurnoverConfig(**{name: value})
    except ValueError as err:
        assert named(err, name), (name, value, err)
        return
    except Exception as err:  # noqa: BLE001
        raise AssertionError(f"{type(err).__name__} for TurnoverConfig({name}={value!r}): {err}") from err
    check_config(config, name, value)


@pytest.fixture(scope="module")
def saved_config():
    model = th.patch_model(with_bottleneck(tiny_bert()), th.TurnoverConfig(seed=3), freeze_leaking=True)
    return json.loads(model.turnover_config.to_json_string())


@FUZZ
@given(edit=st.one_of(
    st.tuples(st.just("set"), st.sampled_from(sorted(FIELDS) + ["unknown_field"]), field_values),
    st.tuples(st.just("drop"), st.sampled_from(sorted(FIELDS)), st.none()),
    st.tuples(st.just("file"), st.none(), st.one_of(json_like, st.binary(max_size=12))),
))
def test_a_config_file_loads_as_written_or_is_refused_naming_file_and_field(tmp_path_factory, saved_config, edit):
    action, name, value = edit
    folder = tmp_path_factory.mktemp("cfg")
    data = copy.deepcopy(saved_config)
    if action == "set":
        data[name] = value
    elif action == "drop":
        del data[name]
    if action == "file":
        raw = value if isinstance(value, bytes) else json.dumps(value, default=repr).encode()
    else:
        raw = json.dumps(data).encode()
    (folder / CONFIG_NAME).write_bytes(raw)
    try:
        config = th.TurnoverConfig.from_pretrained(folder)
    except th.ConfigMismatchError as err:
        assert CONFIG_NAME in str(err), err
        if action != "file":
            assert named(err, name) or (name == "format_version" and "format version" in str(err)), err
        return
    except Exception as err:  # noqa: BLE001
        raise AssertionError(f"{type(err).__name__} loading {raw[:200]!r}: {err}") from err
    assert action != "file" and not (action == "drop" and name in REQUIRED_FIELDS)
    if action == "set":
        check_config(config, name, value)
    else:
        assert config.to_dict()[name] == FIELDS[name].default or FIELDS[name].default is dataclasses.MISSING


# -- patch_model -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_model():
    return with_bottleneck(tiny_bert())


NAMES = ["classifier", "bert.pooler.dense", "adapter_up", "adapter_down.0", "dense", "query", "nothing"]
patterns = st.one_of(st.none(), st.sampled_from([".*classifier", ".*adapter_up", ".*", "classifier|.*pooler.dense", "(",
                                                 "x"]),
                     st.lists(st.sampled_from(NAMES), max_size=3), st.text(max_size=4))


def _matches(name, spec):
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == p or name.endswith("." + p) for p in spec)


@FUZZ
@given(target=patterns, exclude=patterns, freeze=st.one_of(st.booleans(), st.none(), st.integers(0, 2), st.text(max_size=2)),
       p=st.one_of(st.floats(), st.integers(-1, 2)), seed=st.one_of(st.integers(-1, 2**64), st.floats()))
def test_patch_model_patches_what_was_asked_or_refuses_naming_the_argument(base_model, target, exclude, freeze, p, seed):
    model = copy.deepcopy(base_model)
    try:
        config = th.TurnoverConfig(target_modules=target, exclude_modules=exclude, p=p, seed=seed)
        patched = th.patch_model(model, config, freeze_leaking=freeze, warn_leaking=False)
    except ValueError as err:
        assert named(err, "target_modules", "exclude_modules", "p (the drop ratio)", "seed", "freeze_leaking",
                     "matched"), err
        return
    except Exception as err:  # noqa: BLE001
        raise AssertionError(f"{type(err).__name__} patching with target={target!r} exclude={exclude!r} "
                             f"freeze={freeze!r}: {err}") from err
    assert isinstance(freeze, bool)
    assert th.is_patched(patched) and patched.turnover_config.mask_sites
    if target is not None:
        for name in patched.turnover_config.mask_sites:
            assert _matches(name, target) and (exclude is None or not _matches(name, exclude)), name


# -- CLI data files ----------------------------------------------------------------------------------------------
cells = st.one_of(st.none(), st.text(max_size=12), st.integers(-5, 5), st.sampled_from(["NA", "null", "nan", "007", "1e5", "", " ", "a,b",
                                                                     "\"q\"", "line\nbreak", "caf\u00e9", "\u2603"]))
label_cells = st.one_of(st.none(), st.sampled_from(["pos", "neg", "NA", ""]), st.integers(0, 3))


@FUZZ
@given(rows=st.lists(st.tuples(cells, label_cells), max_size=3), fmt=st.sampled_from(["csv", "tsv", "json", "jsonl", "parquet"]),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"]), columns=st.sampled_from(
           [("text", "label"), ("text",), ("label",), ("review", "label"), ("text", "label", "extra")]),
       int_labels=st.booleans())
def test_data_files_load_as_written_or_are_refused_naming_the_file(tmp_path_factory, rows, fmt, encoding, columns,
                                                                    int_labels):
    if int_labels:
        rows = [(t, y if not isinstance(y, str) else None) for t, y in rows]
    else:
        rows = [(t, y if not isinstance(y, int) else str(y)) for t, y in rows]
    frame = pd.DataFrame({c: [t if c != "label" else y for t, y in rows] if c != "extra" else [1] * len(rows)
                          for c in columns})
    if "label" in frame and int_labels and frame["label"].notna().all() and len(frame):
        frame["label"] = frame["label"].astype("int64")
    path = str(tmp_path_factory.mktemp("data") / f"train.{fmt}")
    if fmt == "parquet":
        try:
            frame.to_parquet(path)
        except (TypeError, ValueError):  # pyarrow: a column mixing types cannot be written
            assume(False)
    else:
        buffer = io.StringIO()
        if fmt in ("csv", "tsv"):
            frame.to_csv(buffer, index=False, sep="\t" if fmt == "tsv" else ",")
        else:
            frame.to_json(buffer, orient="records", lines=fmt == "jsonl", force_ascii=False)
        try:
            raw = buffer.getvalue().encode(encoding)
        except UnicodeEncodeError:
            assume(False)
        with open(path, "wb") as handle:
            handle.write(raw)
    try:
        data = standard_columns(load_table(path, "--train_file", text_column="text"), "text", "label",
                                "the training data", need_label=True, path=path)
        names = class_names(data)
        data = encode_labels(data, names, "the training data")
    except ValueError as err:
        assert named(err, path, "the training data"), err
        return
    except Exception as err:  # noqa: BLE001
        raise AssertionError(f"{type(err).__name__} reading {fmt} ({encoding}) {frame.to_dict('list')}: {err}") from err
    # the right answer: every row, its text as written, its label as written
    assert len(data) == len(rows) > 0 and all(isinstance(t, str) and t for t in data["text"])
    written = [str(t) if fmt in ("csv", "tsv") else t for t, _ in rows]  # a CSV cell is text as written
    if encoding in ("utf-8", "utf-8-sig") or fmt == "parquet" or all(str(t).isascii() for t in written):
        assert data["text"] == written
    assert [names[i] for i in data["label"]] == [str(y) for _, y in rows]


# -- the named cases of docs/guides/bad-inputs.md that the properties above cover only by chance --------------------
def test_named_config_and_patch_model_cases(base_model):
    for kwargs, message in [
        ({"id_column": 3}, "id_column must be str, got 3"),
        ({"num_train_examples": -5}, "num_train_examples must be at least 1"),
        ({"codebook_size": "64"}, "codebook_size must be int, got '64'"),
        ({"active_adapters": "bn"}, "active_adapters must be a list of str or None"),
        ({"mask_sites": {"classifier": "input"}}, "mask_sites must be"),
        ({"mask_sites": {"classifier": {"side": "input", "units": "32"}}}, "mask_sites['classifier'] is malformed"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            th.TurnoverConfig(**kwargs)
    for kwargs, message in [({"freeze_leaking": "yes"}, "freeze_leaking must be True or False, got 'yes'"),
                            ({"config": {"p": 0.5}}, "config must be a TurnoverConfig")]:
        with pytest.raises(th.TurnoverError, match=re.escape(message)):
            th.patch_model(copy.deepcopy(base_model), **kwargs)
    with pytest.raises(th.TurnoverError, match="model must be a torch.nn.Module"):
        th.patch_model("bert-base-uncased")


def test_named_example_id_cases(pipe):
    for ids, message in [(3, "example_ids must be a list \\(or 1-D tensor / array\\) of training ids, got int"),
                         ([[0, 1]], "must be a list \\(or 1-D tensor / array\\)|must be 1-D"),
                         ([0, 0], "duplicates"), ([-1], "non-negative"), ([2**64], "non-negative integers"),
                         ([0.0, 1.0], "integer"), ([N_TRAIN + 5], "not in the training set")]:
        with pytest.raises(th.ExampleIdError, match=message):
            pipe.scores("w5", example_ids=ids)
    assert len(pipe("w5", top_k=N_TRAIN + 10)["proponents"]) == N_TRAIN  # top_k > N: all N
    for top_k in (0, -1, 1.5, True):
        with pytest.raises(th.TurnoverError, match="top_k must be a positive integer"):
            pipe("w5", top_k=top_k)
