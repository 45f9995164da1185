import json
import subprocess
import sys

import pytest
import torch

from turnover_hf.masks import _fmix32, _mul32, flip, keep_bits, mask_for


def test_mul32_matches_python_modular_arithmetic():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2**32, (1000,), generator=g, dtype=torch.int64)
    for c in (0x85EBCA6B, 0xC2B2AE35, 0x9E3779B9, 1, 2**32 - 1):
        expected = torch.tensor([(int(v) * c) % 2**32 for v in x], dtype=torch.int64)
        assert torch.equal(_mul32(x, c), expected)
        assert _mul32(int(x[0]), c) == int(expected[0])


def test_fmix32_is_a_bijection_on_a_sample():
    x = torch.arange(0, 2**16, dtype=torch.int64) * 65537
    assert len(torch.unique(_fmix32(x))) == len(x)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
@pytest.mark.parametrize("scheme", ["independent", "hashed"])
def test_kept_fraction_is_one_minus_p(p, scheme):
    bits = keep_bits(torch.arange(4000), "layer", 256, p=p, seed=3, scheme=scheme, codebook_size=64, codebook_picks=3)
    # 1,024,000 bits: the binomial standard error is < 0.0005; the hashed scheme's rows add correlation, so allow 0.01.
    assert abs(bits.float().mean().item() - (1 - p)) < (0.005 if scheme == "independent" else 0.01)
    if scheme == "independent":
        # Every unit is kept at about the expected rate (no stuck columns). The hashed scheme cannot promise this:
        # a unit that all K codebook rows keep is kept by every example.
        per_unit = bits.float().mean(0)
        assert per_unit.min() > (1 - p) - 0.05 and per_unit.max() < (1 - p) + 0.05


def test_masks_of_different_examples_and_layers_are_independent():
    a = keep_bits(torch.arange(0, 2000), "layer.a", 512)
    b = keep_bits(torch.arange(2000, 4000), "layer.a", 512)
    c = keep_bits(torch.arange(0, 2000), "layer.b", 512)
    # Two independent masks with keep rate 1/2 agree on half the units.
    assert abs((a == b).float().mean().item() - 0.5) < 0.005
    assert abs((a == c).float().mean().item() - 0.5) < 0.005
    seed_1 = keep_bits(torch.arange(0, 2000), "layer.a", 512, seed=1)
    assert abs((a == seed_1).float().mean().item() - 0.5) < 0.005


def test_same_ids_same_masks_whatever_the_batch():
    ids = torch.tensor([5, 17, 2**40 + 3, 0, 999])
    full = mask_for(ids, "x.y", 33, seed=11)
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.equal(mask_for(ids[perm], "x.y", 33, seed=11), full[perm])
    for i in range(len(ids)):
        assert torch.equal(mask_for(ids[i : i + 1], "x.y", 33, seed=11), full[i : i + 1])
    # Large ids use their high 32 bits too.
    assert not torch.equal(keep_bits(torch.tensor([3]), "x.y", 64), keep_bits(torch.tensor([2**40 + 3]), "x.y", 64))


def test_same_masks_in_a_separate_process():
    code = (
        "import json, torch; from turnover_hf.masks import keep_bits;"
        "b = keep_bits(torch.tensor([9, 1, 4, 2**35]), 'bert.encoder.layer.1.output.adapters.a.adapter_up', 40, seed=5,"
        " scheme='{scheme}'); print(json.dumps(b.int().tolist()))"
    )
    for scheme in ("independent", "hashed"):
        out = subprocess.run([sys.executable, "-c", code.format(scheme=scheme)], capture_output=True, text=True, check=True)
        here = keep_bits(torch.tensor([2**35, 4, 1, 9]), "bert.encoder.layer.1.output.adapters.a.adapter_up", 40,
                         seed=5, scheme=scheme).flip(0)
        assert json.loads(out.stdout) == here.int().tolist()


def test_flip_is_the_complement_and_scaling_follows_p():
    for p in (0.5, 0.25):
        m = mask_for(torch.arange(50), "k", 20, p=p)
        scale = torch.tensor(1 / (1 - p), dtype=torch.float32).item()
        assert set(m.unique().tolist()) <= {0.0, scale}
        f = flip(m, p)
        assert torch.equal(f, mask_for(torch.arange(50), "k", 20, p=p, flipped=True))
        assert torch.equal((m > 0) ^ (f > 0), torch.ones_like(m, dtype=torch.bool))
        assert torch.allclose(m + f, torch.full_like(m, scale))


def test_per_row_flip_and_dtype_and_device():
    ids = torch.tensor([1, 1, 2])
    m = mask_for(ids, "k", 10, flipped=torch.tensor([False, True, False]), dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16 and m.device == ids.device
    assert torch.equal(m[0] + m[1], torch.full((10,), 2.0, dtype=torch.bfloat16))


def test_hashed_scheme_picks_distinct_rows_and_differs_from_independent():
    from turnover_hf.masks import _pick_rows

    rows = _pick_rows(torch.arange(5000, dtype=torch.int64) * 2654435761 % 2**32, 8, 8)
    assert torch.equal(rows.sort(1).values, torch.arange(8).expand(5000, 8))  # all 8 of 8, each once
    ids = torch.arange(300)
    hashed = keep_bits(ids, "k", 64, scheme="hashed", codebook_size=16, codebook_picks=2)
    # Only C(16, 2) = 120 distinct masks exist for 300 examples.
    assert len(torch.unique(hashed, dim=0)) <= 120
    assert not torch.equal(hashed, keep_bits(ids, "k", 64))


@pytest.mark.parametrize("p", [0, 1, -0.1, 1.5, True, "0.5"])
def test_bad_drop_ratio_is_refused(p):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        mask_for(torch.arange(3), "k", 4, p=p)


def test_bad_ids_are_refused():
    with pytest.raises(ValueError, match="non-negative"):
        keep_bits(torch.tensor([1, -2]), "k", 4)
    with pytest.raises(ValueError, match="integer"):
        keep_bits(torch.tensor([1.0, 2.0]), "k", 4)
    with pytest.raises(ValueError, match="1-D"):
        keep_bits(torch.tensor([[1, 2]]), "k", 4)
