"""run.py: drawing an image's captions for a step (--captions-per-image)."""

from __future__ import annotations

import torch

import run


def test_captions_per_image_draws_distinct_captions_the_same_way_each_time() -> None:
    B, C, L = 6, 5, 7
    caps = torch.arange(B * C * L).view(B, C, L)  # every caption distinct
    lens = torch.arange(B * C).view(B, C)
    got, got_lens = run.pick_captions(caps, lens, 2, seed=11)
    assert got.shape == (B, 2, L) and got_lens.shape == (B, 2)
    for b in range(B):
        rows = [int(r[0]) // L - b * C for r in got[b]]  # which of image b's captions were drawn
        assert len(set(rows)) == 2 and all(0 <= r < C for r in rows)  # two different captions of image b
        assert got_lens[b].tolist() == [int(lens[b, r]) for r in rows]  # each with its own length
    again = run.pick_captions(caps, lens, 2, seed=11)
    assert torch.equal(again[0], got)  # the step's position decides: a resumed run draws the same
    assert not torch.equal(run.pick_captions(caps, lens, 2, seed=12)[0], got)
    state = torch.get_rng_state()
    run.pick_captions(caps, lens, 2, seed=13)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG (dropout's) is untouched
