"""Ensembles (`--checkpoint A B ...`): decoding.Ensemble's search finds what the mean of its members'
distributions ranks best, one member twice is that member, shared encoders run once, and inference.py and
evaluate.py take several checkpoints (refusing, in one line, models that cannot decode together).
Also evaluate.py's diversity report."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import make_checkpoint, one_line, run_script
from PIL import Image
from tiny_models import D, annotations, forced_captions, make_decoder, make_word_map, padded, summed_log_probs

import evaluate
import inference
import metrics
from checkpoints import RELEASED_MODEL, load_checkpoint, load_ensemble, model_from_checkpoint
from decoding import ENSEMBLE_MEANS, EnsembleDecoder, beam_search, greedy_decode
from pytorch_dataset_class import Vocab


def ensemble_of(decoders, mean: str) -> EnsembleDecoder:
    return EnsembleDecoder(decoders, [(0, D)] * len(decoders), mean).eval()  # all read the same annotations


def ensemble_log_probs(decoders, a: torch.Tensor, seqs: list[tuple[int, ...]], word_map: dict[str, int],
                       mean: str) -> torch.Tensor:
    """Sum over the words of `<start> seq <end>` of the ensemble's log-probability of each word, from the members'
    teacher-forced scores: the renormalised mean of their log-probabilities, or the log of their mean probability."""
    captions, lengths = forced_captions(seqs, word_map)
    with torch.no_grad():
        logp = torch.stack([F.log_softmax(padded(d(a.expand(len(seqs), -1, -1), captions, lengths))[0], -1)
                            for d in decoders])  # (M, N, T, V)
    mixed = logp.mean(0) if mean == "log-prob" else logp.logsumexp(0) - torch.log(torch.tensor(len(decoders)))
    return summed_log_probs(F.log_softmax(mixed, dim=-1), captions, lengths)  # (N,)


def test_ensemble_beam_search_finds_the_ensembles_exhaustive_optimum() -> None:
    wm = make_word_map()
    emittable = [i for w, i in wm.items() if w not in ("<pad>", "<start>", "<end>")]
    max_len, lp = 4, 1.0  # with the length penalty the optima are captions, not the empty one
    finished = [s for n in range(max_len) for s in itertools.product(emittable, repeat=n)]
    n_sequences = len(finished) + len(emittable) ** max_len
    norm = torch.tensor([(len(s) + 1) ** -lp for s in finished])  # (N,)
    own_choice = means_differ = False
    for seed in range(4):
        members = [make_decoder(wm, 10 * seed + k, end_shift=1.0) for k in range(2)]
        a = annotations(1, seed)
        alone = [tuple(beam_search(m, a, wm, n_sequences, max_len, lp)[0].tokens) for m in members]
        optimum = {}
        for mean in ENSEMBLE_MEANS:
            score = ensemble_log_probs(members, a, finished, wm, mean) * norm  # (N,)
            best = int(score.argmax())
            (cap,) = beam_search(ensemble_of(members, mean), a, wm, n_sequences, max_len, lp)
            assert cap.finished and tuple(cap.tokens) == finished[best], (seed, mean)
            assert cap.score == pytest.approx(float(score[best]), abs=1e-4)
            optimum[mean] = finished[best]
            own_choice |= finished[best] not in alone
        means_differ |= optimum["log-prob"] != optimum["prob"]
    assert own_choice and means_differ  # not trivial: the ensemble's choice is not a member's, nor the means' one


def test_one_model_twice_decodes_as_that_model() -> None:
    wm = make_word_map()
    member = make_decoder(wm, seed=2, scale=0.7, end_shift=1.0)
    a = annotations(6, seed=2)
    twice = ensemble_of([member, member], "log-prob")
    for got, want in ((greedy_decode(twice, a, wm, 12), greedy_decode(member, a, wm, 12)),
                      (beam_search(twice, a, wm, 4, 12, 0.5), beam_search(member, a, wm, 4, 12, 0.5))):
        for g, w in zip(got, want):
            assert g.tokens == w.tokens and g.finished == w.finished
            assert g.score == pytest.approx(w.score, abs=1e-5)
            torch.testing.assert_close(g.alphas, w.alphas)
        assert any(w.tokens for w in want)


@pytest.fixture(scope="module")
def members(tiny_shapes: Path, tmp_path_factory) -> dict[str, Path]:
    """Checkpoints for tiny_shapes: two of different seeds (different encoders: smallcnn's weights are drawn too),
    a copy of the first, one of another vocabulary."""
    d = tmp_path_factory.mktemp("members")
    wm_path = tiny_shapes / "word_map.json"
    wm, sha = json.loads(wm_path.read_text()), Vocab.hash(wm_path)
    other_wm = {**{w: i for w, i in wm.items()}}
    first, last = sorted(w for w in wm if not w.startswith("<"))[:2]
    other_wm[first], other_wm[last] = wm[last], wm[first]
    out = {"a": make_checkpoint(d / "a.pt", wm, 32, 0, sha), "b": make_checkpoint(d / "b.pt", wm, 32, 1, sha),
           "other_vocab": make_checkpoint(d / "other.pt", other_wm, 32, 2, sha)}
    out["a_copy"] = d / "a_copy.pt"
    out["a_copy"].write_bytes(out["a"].read_bytes())
    grid2 = torch.load(out["b"], weights_only=True)  # smallcnn pools to any grid: the same weights on 2 x 2
    grid2["model_config"]["encoded_size"] = 2
    out["grid2"] = d / "grid2.pt"
    torch.save(grid2, out["grid2"])
    return out


def test_members_with_the_same_encoder_share_its_run(members) -> None:
    same = load_ensemble([members["a"], members["a_copy"]])
    two = load_ensemble([members["a"], members["b"]])
    assert len(same.model.encoders) == 1 and len(two.model.encoders) == 2
    x = torch.rand(3, 3, 32, 32)
    a_single, _ = model_from_checkpoint(load_checkpoint(members["a"]))
    with torch.no_grad():
        torch.testing.assert_close(same.model.annotations(x), a_single.annotations(x))  # (B, P, D), once
        assert two.model.annotations(x).shape[-1] == 2 * a_single.annotations(x).shape[-1]
    assert "an ensemble of 2 models" in two.precision


def test_evaluate_scores_an_ensemble_beside_its_members(members, tiny_shapes: Path, tmp_path: Path, no_java) -> None:
    one = evaluate.evaluate(members["a"], tiny_shapes, beam_sizes=[2], workers=0, out_dir=tmp_path / "one")
    same = evaluate.evaluate([members["a"], members["a_copy"]], tiny_shapes, beam_sizes=[2], workers=0,
                             out_dir=tmp_path / "same")
    two = evaluate.evaluate([members["a"], members["b"]], tiny_shapes, beam_sizes=[2], workers=0,
                            out_dir=tmp_path / "two", ensemble_mean="prob")
    read = lambda r: json.loads(Path(r["metrics"]["2"]["predictions"]).read_text())  # noqa: E731
    assert read(same) == read(one)  # a model twice is that model
    assert read(two) != read(one)
    assert two["checkpoint"] == [str(members["a"]), str(members["b"])] and two["ensemble_mean"] == "prob"
    assert str(members["a"]) + " + " + str(members["b"]) in metrics.format_report(two)
    # No file lands beside a member, and the ensemble's scores cannot become a member's release.
    assert sorted(p.name for p in members["a"].parent.iterdir()) == ["a.pt", "a_copy.pt", "b.pt", "grid2.pt",
                                                                      "other.pt"]
    r = run_script("release.py", "--checkpoint", members["a"], "--scores", two["results"], "--out",
                   tmp_path / "release.pt", mode="in_process")
    one_line(r, 1, "ensemble of 2 checkpoints")
    assert not (tmp_path / "release.pt").exists()


def test_evaluate_and_inference_refuse_what_cannot_be_an_ensemble(members, tiny_shapes: Path, tmp_path: Path,
                                                                 no_java) -> None:
    both = [str(members["a"]), str(members["b"])]
    r = run_script("evaluate.py", "--checkpoint", *both, "--data", tiny_shapes, mode="in_process")
    one_line(r, 2, "--out-dir")
    r = run_script("evaluate.py", "--checkpoint", members["a"], members["other_vocab"], "--data", tiny_shapes,
                   "--out-dir", tmp_path, mode="in_process")
    one_line(r, 1, str(members["other_vocab"]))
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), "red").save(image)
    r = run_script("inference.py", "--checkpoint", members["a"], members["other_vocab"], image, "--workers", "0",
                   mode="in_process")
    one_line(r, 1, str(members["other_vocab"]), "word map")
    r = run_script("inference.py", "--checkpoint", members["a"], members["grid2"], image, "--workers", "0",
                   mode="in_process")
    one_line(r, 1, "same grid", "2 x 2 and 4 x 4")


def test_inference_takes_several_checkpoints_before_the_images(members, tmp_path: Path, capsys) -> None:
    paths = []
    for i, colour in enumerate(("red", "blue")):
        paths.append(tmp_path / f"im{i}.png")
        Image.new("RGB", (32, 32), colour).save(paths[-1])
    args = inference.parse_args(["--checkpoint", str(members["a"]), str(members["b"]), str(paths[0]), "--json",
                                 str(paths[1])])
    assert args.checkpoint == [members["a"], members["b"]] and args.images == [str(p) for p in paths]
    args = inference.parse_args(["--checkpoint", "model", "other", "--", str(paths[0])])  # "--" ends the list
    assert args.checkpoint == [Path("model"), Path("other")] and args.images == [str(paths[0])]
    assert inference.parse_args([str(paths[0])]).checkpoint == [RELEASED_MODEL]
    help_text = run_script("inference.py", "--help", mode="in_process").out  # the default as a path, not a repr
    assert "".join(f"(default:{RELEASED_MODEL})".split()) in "".join(help_text.split()) and "PosixPath" not in help_text
    inference.main(["--checkpoint", str(members["a"]), str(members["a_copy"]), *map(str, paths), "--json",
                    "--workers", "0"])
    twice = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    inference.main(["--checkpoint", str(members["a"]), *map(str, paths), "--json", "--workers", "0"])
    once = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["greedy"], r["beam"]) for r in twice] == [(r["greedy"], r["beam"]) for r in once]


def test_diversity_counts_distinct_captions_and_the_vocabulary_used() -> None:
    caps = [["a", "dog", "runs"], ["a", "dog", "runs"], ["a", "cat"], ["two", "dogs"]]
    got = metrics.diversity(caps, ["a", "dog", "runs", "cat", "two", "dogs", "bird", "tree"])
    assert got == {"distinct_captions": 0.75, "n_distinct_captions": 3, "vocabulary_used": 0.75, "n_words_used": 6}
    assert metrics.diversity([], ["a"])["distinct_captions"] == 0.0
