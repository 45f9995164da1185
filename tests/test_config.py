"""turnover_config.json: what decides the masks must be spelled out, newer formats are refused, damage is named."""

import json

import pytest

import turnover_hf as th
from turnover_hf.config import FORMAT_VERSION, REQUIRED_FIELDS

from conftest import tiny_bert


@pytest.fixture
def saved(tmp_path):
    model = th.patch_model(tiny_bert(), th.TurnoverConfig(seed=11, p=0.3), warn_leaking=False)
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _edit(folder, change):
    path = folder / th.CONFIG_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("field", REQUIRED_FIELDS)
def test_a_deleted_field_that_decides_the_masks_is_refused(saved, field):
    _edit(saved, lambda data: data.pop(field))
    with pytest.raises(th.ConfigMismatchError, match=rf"lacks \['{field}'\], which decide the masks"):
        th.load_influence_ready(saved)


def test_fields_added_later_may_be_missing(saved):
    """Configs written before channels / trainable_parameters / training_set / format_version existed still load."""
    _edit(saved, lambda data: [data.pop(k) for k in ("channels", "trainable_parameters", "training_set", "format_version")])
    model = th.load_influence_ready(saved)
    assert model.turnover_config.seed == 11 and model.turnover_config.p == 0.3


def test_a_newer_format_is_refused_with_an_upgrade_message(saved):
    _edit(saved, lambda data: data.update(format_version=FORMAT_VERSION + 1, library_version="9.0.0"))
    with pytest.raises(th.ConfigMismatchError, match=r"format version 2 \(written by turnover-hf 9\.0\.0\).*pip install -U"):
        th.load_influence_ready(saved)
    _edit(saved, lambda data: data.update(format_version=FORMAT_VERSION, new_option=True))
    with pytest.raises(th.ConfigMismatchError, match=r"does not know: \['new_option'\]; upgrade"):
        th.load_influence_ready(saved)


@pytest.mark.parametrize("content, message", [
    ("{ not json", "is not readable JSON"),
    ("", "is not readable JSON"),
    ("[1, 2]", "holds a JSON list"),
    (b"\xff\xfe\x00", "is not readable JSON"),
])
def test_unreadable_json_names_the_file(saved, content, message):
    path = saved / th.CONFIG_NAME
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(th.ConfigMismatchError, match=message) as err:
        th.load_influence_ready(saved)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(seed="seven"), "seed"),
    (lambda d: d.update(p=1.5), r"p \(the drop ratio\) must be"),
    (lambda d: d.update(scheme="random"), "scheme must be one of"),
    (lambda d: d.update(mask_sites={"classifier": {"side": "sideways", "units": 32}}), "malformed"),
])
def test_invalid_values_are_refused_naming_the_file(saved, change, message):
    _edit(saved, change)
    with pytest.raises(th.ConfigMismatchError, match=message):
        th.load_influence_ready(saved)


def test_an_invalid_target_modules_regex_is_refused_up_front():
    with pytest.raises(ValueError, match=r"target_modules='classifier\(' is not a valid regular expression"):
        th.TurnoverConfig(target_modules="classifier(")
    with pytest.raises(ValueError, match="exclude_modules must be a regex string or a list"):
        th.TurnoverConfig(exclude_modules=3)
