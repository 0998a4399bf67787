"""An independent, literal re-computation of the official SQuAD scores for the tests.

Written from the documented definitions, walking the dataset JSON as the official
evaluation scripts do, and sharing no code with ``kdlab.qa``.
"""

import collections
import re
import string

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def normalise(text):
    text = text.lower().translate(_PUNCT_TABLE)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(pred, gold, v2):
    p, g = normalise(pred).split(), normalise(gold).split()
    if v2 and (len(p) == 0 or len(g) == 0):
        return 1.0 if p == g else 0.0
    common = collections.Counter(p) & collections.Counter(g)
    n = sum(common.values())
    if n == 0:
        return 0.0
    precision, recall = n / len(p), n / len(g)
    return (2 * precision * recall) / (precision + recall)


def reference_v1(dataset, predictions):
    total = em = f1 = 0
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                if qa["id"] not in predictions:
                    continue
                golds = [a["text"] for a in qa["answers"]]
                pred = predictions[qa["id"]]
                em += max(float(normalise(pred) == normalise(g)) for g in golds)
                f1 += max(_f1(pred, g, v2=False) for g in golds)
    return {"exact_match": 100.0 * em / total, "f1": 100.0 * f1 / total}


def reference_v2(dataset, predictions, odds, thresh=1.0):
    exact, f1, has_ans = {}, {}, {}
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                qid = qa["id"]
                has_ans[qid] = bool(qa["answers"])
                golds = [a["text"] for a in qa["answers"] if normalise(a["text"])] or [""]
                pred = predictions[qid]
                exact[qid] = max(int(normalise(pred) == normalise(g)) for g in golds)
                f1[qid] = max(_f1(pred, g, v2=True) for g in golds)

    def thresholded(scores):
        return {q: (float(not has_ans[q]) if odds[q] > thresh else s) for q, s in scores.items()}

    def summary(scores, qids):
        return 100.0 * sum(scores[q] for q in qids) / len(qids)

    out = {}
    groups = {
        "": list(exact),
        "HasAns_": [q for q in exact if has_ans[q]],
        "NoAns_": [q for q in exact if not has_ans[q]],
    }
    for prefix, qids in groups.items():
        if qids:
            out[prefix + "exact"] = summary(thresholded(exact), qids)
            out[prefix + "f1"] = summary(thresholded(f1), qids)
            out[prefix + "total"] = len(qids)
    for name, raw in (("exact", exact), ("f1", f1)):
        score = best = sum(1 for q in has_ans if not has_ans[q])
        best_t = 0.0
        for q in sorted(odds, key=lambda k: odds[k]):
            if q not in raw:
                continue
            if has_ans[q]:
                score += raw[q]
            elif predictions[q]:
                score -= 1
            if score > best:
                best, best_t = score, odds[q]
        out["best_" + name] = 100.0 * best / len(raw)
        out["best_" + name + "_thresh"] = best_t
    return out
