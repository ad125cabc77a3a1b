"""optim.py: the moving average of the weights, the named parameter groups, their rates and the schedules."""

from __future__ import annotations

import pytest
import torch

import all_models
from all_models import Captioner
from optim import Rates, WeightAverage, make_optimizer, make_schedule, take_new_rates


def test_weight_average_follows_its_formula() -> None:
    """--ema-decay d: after the n-th step the average moves (1 - r) of the way to the weights, r = min(d, (1 + n) /
    (10 + n)); frozen weights and buffers are the model's."""
    torch.manual_seed(0)
    model = Captioner(all_models.ModelConfig(vocab_size=12, encoder="smallcnn", encoded_size=2, embed_dim=8,
                                             attention_dim=8, decoder_dim=8))
    avg = WeightAverage(model, decay=0.2)
    w = model.decoder.fc.weight
    start = w.detach().clone()
    expected = start.clone()
    for n in (1, 2, 3):
        with torch.no_grad():
            w.add_(1.0)
        rate = min(0.2, (1 + n) / (10 + n))  # 2/11 at the first step, then the decay
        expected = rate * expected + (1 - rate) * w.detach()
        avg.update(model)
        torch.testing.assert_close(avg.model.decoder.fc.weight, expected)
    assert avg.updates == 3
    assert not avg.model.decoder.fc.weight.requires_grad
    assert not torch.equal(avg.model.decoder.fc.weight, w)


def test_parameter_groups_rates_and_schedules() -> None:
    """The decoder's group and, when it is fine-tuned, the encoder's, each with its option's rate; a rate given on
    the command line replaces a saved one; the cosine curve and the plateau decay set both; only plateau has a
    state to save."""
    def tiny(fine_tune: bool) -> Captioner:
        return Captioner(all_models.ModelConfig(vocab_size=12, encoder="smallcnn", encoded_size=2, embed_dim=8,
                                                attention_dim=8, decoder_dim=8, fine_tune_encoder=fine_tune))

    assert Rates.now(make_optimizer(tiny(False), 1e-3, 1e-4)) == Rates(decoder=1e-3, encoder=0.0)
    optimizer = make_optimizer(tiny(True), 1e-3, 1e-4)
    assert [g["name"] for g in optimizer.param_groups] == ["decoder", "encoder"]
    take_new_rates(optimizer, saved=Rates(1e-3, 1e-4), given=Rates(1e-3, 5e-5))
    assert Rates.now(optimizer) == Rates(1e-3, 5e-5)
    cosine = make_schedule("cosine", optimizer, Rates(2e-3, 2e-4), epochs=2, decay=0.5, patience=1)
    cosine.at_step(epoch=1, step=1, steps_per_epoch=10)  # halfway through the run
    assert Rates.now(optimizer) == pytest.approx(Rates(1e-3, 1e-4))
    assert cosine.state_dict() is None and make_schedule("constant", optimizer, Rates(1, 1), epochs=2, decay=0.5,
                                                         patience=1).state_dict() is None
    plateau = make_schedule("plateau", optimizer, Rates(1, 1), epochs=2, decay=0.5, patience=0)
    plateau.end_epoch(0.3)
    plateau.end_epoch(0.2)  # no better than the best: the rates halve
    assert Rates.now(optimizer) == pytest.approx(Rates(5e-4, 5e-5)) and plateau.state_dict()["best"] == 0.3
