"""Caption scoring shared by evaluate.py and train.py: COCO metrics, nltk BLEU-4, CIDEr-D, shapes correctness,
caption diversity.

COCO metrics are pycocoevalcap's, called in-process the way its COCOEvalCap does: captions are
tokenized by the Stanford PTB tokenizer (lowercased, punctuation removed), then scored with
Bleu(4), Meteor(), Rouge() (ROUGE-L) and Cider(). SPICE is left out: it downloads models at run
time. The tokenizer and METEOR are Java programs. Where `java` is missing (or fails), one line says
so on stderr, captions are tokenized by a regex that mimics the PTB tokenizer, and every metric
but METEOR is reported.

nltk's corpus BLEU-4 (uniform weights, no smoothing, on the raw tokens) is the number the
sgrvinod tutorial's tables report; it is kept apart from pycocoevalcap's BLEU-4, which differs
(closest reference length, tiny-count smoothing).

`CiderD` is CIDEr-D as pycocoevalcap computes it, vectorised and with document frequencies fixed from a
corpus: the reward of self-critical training (scst.py) and train.py's validation score.

Scores are fractions (BLEU 1.0 = perfect); CIDEr is not bounded by 1.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import sys
import warnings
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence

import numpy as np

SHAPES_KEYS = ("shapes_objects_right", "shapes_relation_right", "shapes_all_right")  # evaluate.py's shapes scores
DIVERSITY_KEYS = ("distinct_captions", "vocabulary_used")  # evaluate.py's diversity fractions
COCO_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
NLTK_BLEU4 = "nltk BLEU-4"
JAVA_MISSING = "java not found: METEOR skipped, tokenizing in Python"

# The punctuation tokens pycocoevalcap's PTBTokenizer drops after tokenizing.
PTB_PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                    "--", "...", ";"}
_CLITIC = re.compile(r"([a-z0-9])('s|'re|'ve|'ll|'d|'m|n't)\b")
# n't, 's and <unk> first, then words (with inner - . / like "t-shirt" or "3.5", which PTB keeps), then
# any other single character (punctuation, dropped below unless it is a symbol PTB keeps).
_TOKEN = re.compile(r"n't|'[a-z]+|<[a-z]+>|[a-z0-9]+(?:[-./][a-z0-9]+)*|\S")
_PUNCT_CHARS = set(".?!,:;-'`\"()[]{}")


def python_tokenize(text: str) -> str:
    """Mimic `PTBTokenizer -lowerCase` + pycocoevalcap's punctuation removal, without Java.

    "A dog's toy, isn't it?" -> "a dog 's toy is n't it". Identical to PTB on already tokenized,
    lowercase text such as Karpathy's tokens; close, not identical, on arbitrary raw sentences.
    """
    text = _CLITIC.sub(r"\1 \2", text.lower().replace("\n", " "))
    tokens = _TOKEN.findall(text)
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATIONS and not (len(t) == 1 and t in _PUNCT_CHARS))


def java_available() -> bool:
    return shutil.which("java") is not None


@contextlib.contextmanager
def _quiet_stderr_fd() -> Iterator[None]:
    """Silence file descriptor 2 for child processes started inside (the tokenizer's java prints
    "PTBTokenizer tokenized N tokens at ..." there, which no Python redirect catches)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _ptb_tokenize(captions: dict[Hashable, list[str]]) -> dict[Hashable, list[str]]:
    """One Stanford PTB tokenizer run (one JVM start) over every caption of every key."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with _quiet_stderr_fd():
        out = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items() if v})
    if any(len(out.get(k, [])) != len(v) for k, v in captions.items()):
        raise RuntimeError("the PTB tokenizer returned fewer lines than it was given")
    return {k: out.get(k, []) for k in captions}


def _meteor(gts: dict[Hashable, list[str]], res_sets: list[dict[Hashable, list[str]]]) -> list[float]:
    """pycocoevalcap's METEOR of each result set, from one java process (it takes seconds to start),
    closed deterministically even on errors."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        return [float(meteor.compute_score(gts, res)[0]) for res in res_sets]
    finally:
        if meteor.lock.locked():  # compute_score failed halfway; __del__ would wait forever
            meteor.lock.release()
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()


def coco_metrics_many(references: Mapping[Hashable, Sequence[str]],
                      prediction_sets: Sequence[Mapping[Hashable, str]],
                      java: bool | None = None, info: dict | None = None,
                      meteor: bool = True) -> list[dict[str, float]]:
    """pycocoevalcap metrics of several prediction sets against the same references.

    references: {image_id: [reference caption, ...]} (raw strings, e.g. " ".join(tokens)).
    prediction_sets: [{image_id: predicted caption}], each over the same ids as `references`.
    java: None = use Java when `java` is on PATH. All captions are tokenized in one Java run, and
    one METEOR process scores every set. Returns one dict per set: BLEU-1..4, METEOR (only with
    Java), ROUGE-L, CIDEr, as floats. meteor=False leaves METEOR out even with Java (its process takes about
    10 s to start and load its tables on a 2-core CPU); the tokenizer, and so every other score, is the same.
    When `info` is a dict, it receives "tokenizer" ("ptb" or "python") and "meteor" (whether METEOR was computed).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = list(references)
    for i, preds in enumerate(prediction_sets):
        if set(preds) != set(ids):
            raise ValueError(f"prediction set {i} covers {len(preds)} images, the references {len(ids)}")
    if java is None:
        java = java_available()
        if not java:
            print(JAVA_MISSING, file=sys.stderr)
    # Keys ("ref", id) and (set index, id) put every caption into one tokenizer run.
    raw: dict[Hashable, list[str]] = {("ref", k): list(references[k]) for k in ids}
    for s, preds in enumerate(prediction_sets):
        raw.update({(s, k): [preds[k]] for k in ids})
    tokenized = None
    if java:
        try:
            tokenized = _ptb_tokenize(raw)
        except (OSError, RuntimeError, ValueError) as err:
            print(f"java failed ({type(err).__name__}: {err}): METEOR skipped, tokenizing in Python", file=sys.stderr)
            java = False
    java_tokenized = tokenized is not None
    if tokenized is None:
        tokenized = {k: [python_tokenize(c) for c in v] for k, v in raw.items()}
    gts = {k: tokenized[("ref", k)] for k in ids}
    res_sets = [{k: tokenized[(s, k)] for k in ids} for s in range(len(prediction_sets))]
    meteor_scores: list[float] | None = None
    if java and meteor and res_sets:
        try:
            meteor_scores = _meteor(gts, res_sets)
        except (OSError, ValueError) as err:  # BrokenPipeError is an OSError
            print(f"METEOR failed ({type(err).__name__}: {err}): METEOR skipped", file=sys.stderr)
    results = []
    for s, res in enumerate(res_sets):
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
        if meteor_scores is not None:
            scores["METEOR"] = meteor_scores[s]
        scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        results.append(scores)
    if info is not None:
        info.update(tokenizer="ptb" if java_tokenized else "python", meteor=meteor_scores is not None)
    return results


def coco_metrics(references: Mapping[Hashable, Sequence[str]], predictions: Mapping[Hashable, str],
                 java: bool | None = None, info: dict | None = None) -> dict[str, float]:
    """pycocoevalcap metrics of one prediction set; see coco_metrics_many."""
    return coco_metrics_many(references, [predictions], java, info)[0]


def nltk_bleu4(references: Sequence[Sequence[Sequence[str]]], hypotheses: Sequence[Sequence[str]]) -> float:
    """nltk corpus BLEU-4 (the tutorial's number): references[i] = token lists of image i."""
    from nltk.translate.bleu_score import corpus_bleu

    with warnings.catch_warnings():  # nltk warns when some n-gram order has no match at all
        warnings.simplefilter("ignore")
        return float(corpus_bleu([list(map(list, r)) for r in references], [list(h) for h in hypotheses]))


def shapes_correctness(captions: Sequence[Sequence[str] | str],
                       truths: Sequence[dict]) -> dict[str, float | int | None]:
    """Exact correctness of captions of the shapes dataset against the generator's ground truth.

    Returns fractions in [0, 1]: objects_right (every object's colour and shape named, nothing
    extra; over all images), relation_right (over two-object images; None when there are none),
    all_right (objects right and, for two objects, the relation too; over all images), with the
    counts n_images and n_two_objects.
    """
    from shapes import caption_correctness

    if len(captions) != len(truths):
        raise ValueError(f"{len(captions)} captions for {len(truths)} ground truths")
    objects = relation = both = two = 0
    for cap, truth in zip(captions, truths):
        obj_ok, rel_ok = caption_correctness(cap.split() if isinstance(cap, str) else list(cap), truth)
        objects += obj_ok
        if rel_ok is not None:
            two += 1
            relation += rel_ok
        both += obj_ok and rel_ok is not False
    n = len(truths)
    return {"objects_right": objects / n if n else 0.0, "relation_right": relation / two if two else None,
            "all_right": both / n if n else 0.0, "n_images": n, "n_two_objects": two}


def diversity(captions: Sequence[Sequence[str]], vocabulary: Iterable[str]) -> dict[str, float | int]:
    """How varied the captions of a split are: distinct_captions, the number of different captions / the number of
    images, and vocabulary_used, the fraction of `vocabulary` (the model's words, special tokens left out) that
    some caption uses; with their counts."""
    words = set(vocabulary)
    texts = [" ".join(c) for c in captions]
    used = {w for c in captions for w in c} & words
    n = len(texts)
    return {"distinct_captions": len(set(texts)) / n if n else 0.0, "n_distinct_captions": len(set(texts)),
            "vocabulary_used": len(used) / len(words) if words else 0.0, "n_words_used": len(used)}


def format_table(results: dict) -> str:
    """Markdown table: one row per beam size, scores x 100 (diversity in %)."""
    first = next(iter(results["metrics"].values()))
    cols = [c for c in COCO_METRICS if c in first] + [NLTK_BLEU4]
    extra = [c for c in SHAPES_KEYS if c in first] + [c for c in DIVERSITY_KEYS if c in first]
    names = {"shapes_objects_right": "objects %", "shapes_relation_right": "relation %", "shapes_all_right": "all %",
             "distinct_captions": "distinct %", "vocabulary_used": "vocab %"}
    header = ["beam"] + cols + [names[c] for c in extra] + ["images/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}"

    for k, m in results["metrics"].items():
        row = [k] + [pct(m[c]) for c in cols] + [pct(m[c]) for c in extra] + [f"{m['images_per_s']:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_report(results: dict) -> str:
    """evaluate.py's report of a results dict: what was scored and how, the table, where the results are."""
    tok = "PTB tokenizer" if results["tokenizer"] == "ptb" else "Python tokenizer, no METEOR (java not found)"
    if results["tokenizer"] == "ptb" and results.get("meteor") is False:
        tok += ", no METEOR (--no-meteor)"
    precision = f", {results['precision']}" if results.get("precision") else ""
    ckpt = results["checkpoint"]
    ckpt = " + ".join(ckpt) if isinstance(ckpt, list) else ckpt  # an ensemble's checkpoints
    head = (f"{ckpt} on {results['dataset']} {results['split']} ({results['n_images']} images"
            f"{precision}); scores x 100; COCO metrics by pycocoevalcap ({tok}); {NLTK_BLEU4} = nltk corpus_bleu on "
            "raw tokens")
    if "n_two_objects" in results:
        head += (f"; shapes correctness: objects % of all images, relation % of the {results['n_two_objects']} "
                 "two-object images, all % of all images")
    if "distinct_captions" in next(iter(results["metrics"].values())):
        head += "; distinct % = different captions per 100 images, vocab % = share of the vocabulary used"
    return f"{head}\n\n{format_table(results)}\n\nresults: {results['results']}"


# ----------------------------------------------------------------------------------------------
# CIDEr-D

NGRAMS = 4  # CIDEr-D: 1- to 4-grams, equally weighted
SIGMA = 6.0  # CIDEr-D's Gaussian length penalty: exp(-(len_hyp - len_ref)^2 / (2 sigma^2))


def ngram_counts(tokens: Sequence[str]) -> Counter:
    """Every 1- to 4-gram of a caption with its count."""
    return Counter(tuple(tokens[i : i + n]) for n in range(1, NGRAMS + 1) for i in range(len(tokens) - n + 1))


class CiderD:
    """CIDEr-D (Vedantam et al. 2015, as pycocoevalcap computes it) with fixed document frequencies.

    `corpus[i]` are the reference captions (token lists) of document i: an n-gram's document frequency is the
    number of documents whose references hold it, and log(len(corpus)) is the idf's numerator. SCST takes the
    training references as the corpus, validation the val references (as pycocoevalcap does on a test set).
    """

    def __init__(self, corpus: Sequence[Sequence[Sequence[str]]]) -> None:
        df: Counter = Counter()
        for refs in corpus:
            df.update({g for ref in refs for g in ngram_counts(ref)})
        self.df = df
        self.log_docs = math.log(float(max(len(corpus), 1)))

    def scores(self, candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
               owner: Sequence[int] | None = None) -> np.ndarray:
        """CIDEr-D of each candidate (token list) against its references -> (N,) float64, x 10 as reported.
        Candidate i is scored against references[owner[i]] (owner = None: references[i]), so that the K samples
        of an image share one copy of its references.

        Vectorised: every text is a sparse tf-idf vector (one entry per n-gram it holds), and each candidate's
        entries are matched with those of its references by a sorted-key search, so the clipped dot products,
        norms and length penalties of all candidate-reference pairs are a few array operations.
        """
        n_cand = len(candidates)
        owner = np.arange(n_cand) if owner is None else np.asarray(owner, dtype=np.int64)  # (N,)
        texts = list(candidates) + [ref for refs in references for ref in refs]
        column: dict[tuple, int] = {}  # n-gram -> its id in this call
        rows, cols, tf = [], [], []
        for r, text in enumerate(texts):
            for g, c in ngram_counts(text).items():
                rows.append(r)
                cols.append(column.setdefault(g, len(column)))
                tf.append(c)
        row, col = np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64)  # (entries,)
        grams = list(column)
        order = np.array([len(g) - 1 for g in grams], dtype=np.int64)[col]  # (entries,) n - 1
        idf = self.log_docs - np.log(np.maximum(1.0, np.array([self.df.get(g, 0) for g in grams], dtype=float)))
        vec = np.array(tf, dtype=float) * idf[col]  # (entries,) tf-idf
        n_texts, G = len(texts), max(len(grams), 1)
        norm = np.sqrt(np.bincount(row * NGRAMS + order, weights=vec**2,
                                   minlength=n_texts * NGRAMS)).reshape(n_texts, NGRAMS).astype(float)  # (texts, 4)
        # pycocoevalcap's length is the number of bigrams (words - 1, 0 for an empty caption); kept for equality.
        length = np.array([max(len(t) - 1, 0) for t in texts], dtype=float)  # (texts,)
        set_size = np.array([len(refs) for refs in references], dtype=np.int64)  # (sets,)
        set_start = n_cand + np.cumsum(set_size) - set_size  # (sets,) text row of each set's first reference
        n_refs = set_size[owner]  # (N,)
        pair_cand = np.repeat(np.arange(n_cand), n_refs)  # (pairs,) candidate of each pair
        pair_ref = np.repeat(set_start[owner], n_refs) + _ranges(n_refs)  # (pairs,) reference text row
        pair_of_first = np.cumsum(n_refs) - n_refs  # (N,) each candidate's first pair
        # Each candidate entry, once per reference of its candidate: (pair, n-gram, value).
        is_cand = row < n_cand
        c_row, c_col, c_vec, c_order = row[is_cand], col[is_cand], vec[is_cand], order[is_cand]
        reps = n_refs[c_row]  # (cand entries,)
        e_pair = np.repeat(pair_of_first[c_row], reps) + _ranges(reps)  # (matches,)
        e_col, e_vh, e_order = np.repeat(c_col, reps), np.repeat(c_vec, reps), np.repeat(c_order, reps)
        # The reference's value of that n-gram (0 when it has none), found by key = text row * G + n-gram.
        ref_key, ref_vec = row[~is_cand] * G + col[~is_cand], vec[~is_cand]  # sorted: rows, then first sight
        sort = np.argsort(ref_key, kind="stable")
        ref_key, ref_vec = ref_key[sort], ref_vec[sort]
        query = pair_ref[e_pair] * G + e_col
        at = np.minimum(np.searchsorted(ref_key, query), max(len(ref_key) - 1, 0))
        e_vr = np.where((len(ref_key) > 0) & (ref_key[at] == query), ref_vec[at] if len(ref_vec) else 0.0, 0.0)
        clipped = np.bincount(e_pair * NGRAMS + e_order, weights=np.minimum(e_vh, e_vr) * e_vr,
                              minlength=len(pair_cand) * NGRAMS).reshape(-1, NGRAMS).astype(float)  # (pairs, 4)
        denom = norm[pair_cand] * norm[pair_ref]  # (pairs, 4)
        sim = np.divide(clipped, denom, out=clipped.copy(), where=denom != 0)  # (pairs, 4)
        sim *= np.exp(-((length[pair_cand] - length[pair_ref]) ** 2) / (2 * SIGMA**2))[:, None]
        total = np.bincount(pair_cand, weights=sim.mean(axis=1), minlength=n_cand)  # (N,)
        return 10.0 * total / np.maximum(n_refs, 1)


def _ranges(counts: np.ndarray) -> np.ndarray:
    """[0, 1, .., counts[0] - 1, 0, 1, .., counts[1] - 1, ...] without a Python loop."""
    ends = np.cumsum(counts)
    return np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - counts, counts)
