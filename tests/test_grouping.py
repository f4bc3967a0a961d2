"""The per-key batch layout (store/grouping.py) against a plain-Python reference."""
import torch

from feda2v.store.grouping import Grouping


def _reference(key_idx: list[int], num_keys: int):
    active = sorted(set(key_idx))
    counts = [key_idx.count(k) for k in active]
    n_max = max(counts) if counts else 0
    seen = {k: 0 for k in active}
    flat_pos = []
    for k in key_idx:  # batch order kept inside each key's row
        flat_pos.append(active.index(k) * n_max + seen[k])
        seen[k] += 1
    return active, counts, n_max, flat_pos


def test_layout_matches_reference_and_pad_round_trips():
    g = torch.Generator().manual_seed(0)
    cases = [(torch.randint(0, k, (b,), generator=g), k) for k, b in ((10, 64), (7, 5), (500, 300), (3, 1))]
    cases += [(torch.arange(40) % 10, 10), (torch.full((9,), 4), 6), (torch.tensor([2, 0, 2, 0, 2]), 3)]
    for key_idx, num_keys in cases:
        grp = Grouping(key_idx, num_keys)
        active, counts, n_max, flat_pos = _reference(key_idx.tolist(), num_keys)
        assert grp.active == active and grp.k == len(active) and grp.n_max == n_max and grp.batch == len(key_idx)
        assert grp.counts.dtype == torch.float32 and grp.counts.tolist() == [float(c) for c in counts]
        x = torch.randn(len(key_idx), 3, generator=g)
        padded = grp.pad(x)
        assert padded.shape == (len(active), n_max, 3)
        if len(active) == 1:
            assert grp.flat_pos is None and torch.equal(grp.mask, torch.ones(1, len(key_idx)))
            assert torch.equal(padded[0], x)
        else:
            assert grp.flat_pos.tolist() == flat_pos
            mask = torch.zeros(len(active) * n_max)
            mask[flat_pos] = 1.0
            assert grp.mask.dtype == torch.float32 and torch.equal(grp.mask, mask.view(len(active), n_max))
            flat = padded.reshape(-1, 3)
            assert torch.equal(flat[flat_pos], x)
            assert not flat[mask == 0].any()  # padding rows are zeros
        assert torch.equal(grp.unpad(padded), x)
        per_sample = torch.randn(len(active), n_max, generator=g)
        want = torch.stack([(per_sample[i] * grp.mask[i]).sum() / counts[i] for i in range(len(active))])
        assert torch.equal(grp.masked_mean(per_sample), want)


def test_unified_layout_is_the_batch():
    key_idx = torch.zeros(6, dtype=torch.long)
    grp = Grouping(key_idx, 1)
    assert grp.active == [0] and grp.n_max == 6 and grp.flat_pos is None
    x = torch.randn(6, 2)
    assert torch.equal(grp.unpad(grp.pad(x)), x)
