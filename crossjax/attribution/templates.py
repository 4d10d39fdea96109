"""The templates behind the bundled task files (crossjax/attribution/tasks/*.jsonl); rewrite them with

    python -m crossjax.attribution.templates

Every task holds both directions of each minimal pair (a -> b and b -> a), so a model that only knows which answer
is more frequent scores 0 on average; the metric rises only with the behaviour itself.

- kjv_agreement: King James second person, "... thou" -> " art" (against " are") and "... ye" -> " are"; verbs
  art/are, hast/have, shalt/shall, wilt/will, canst/can, dost/do after ten KJV openings. The offline tiny suite
  learns it (its metric rises over the suite's snapshots: README).
- kjv_agreement_vocative: the same with a vocative between subject and verb ("thou, O man," / "ye, O men,"), a
  longer-range version that the suite learns later.
- ioi: indirect-object identification (Wang et al. 2022), "When Mary and John went to the store, John gave a drink
  to" -> " Mary" against " John"; corrupted: the second mention of the subject replaced by a third name (ABC).
  Names are common English first names, one token each in GPT-2-style tokenizers such as Pythia's.
- sva: subject-verb agreement across a prepositional phrase, "The author of the books" -> " is" against " are";
  corrupted: the subject's number flipped.
"""
from __future__ import annotations

import itertools
import os

import numpy as np

from crossjax.attribution import tasks

KJV_OPENINGS = ("And he said unto him,", "Then said Jesus unto them,", "And the LORD said,", "Behold,", "Wherefore",
                "And Moses said,", "For", "O LORD,", "And now,", "Verily I say unto you,")
KJV_VERBS = ((" art", " are"), (" hast", " have"), (" shalt", " shall"), (" wilt", " will"), (" canst", " can"),
             (" dost", " do"))

IOI_NAMES = ("Mary", "John", "Tom", "James", "Sarah", "Paul", "David", "Michael", "Anna", "Mark", "Kate", "Peter")
IOI_PLACES = ("store", "park", "school", "office", "garden", "station")
IOI_OBJECTS = ("drink", "book", "ring", "letter", "key", "bag")
IOI_TEMPLATES = ("When {a} and {b} went to the {place}, {s} gave a {obj} to",
                 "After {a} and {b} arrived at the {place}, {s} handed a {obj} to",
                 "Then, {a} and {b} had a long talk at the {place}. {s} gave a {obj} to",
                 "While {a} and {b} were working at the {place}, {s} passed a {obj} to")

SVA_NOUNS = (("author", "authors"), ("doctor", "doctors"), ("teacher", "teachers"), ("farmer", "farmers"),
             ("student", "students"), ("king", "kings"), ("friend", "friends"), ("officer", "officers"))
SVA_ATTRACTORS = ("book", "books", "house", "houses", "city", "cities")
SVA_LINKS = ("of the", "near the", "behind the")
SVA_VERBS = ((" is", " are"), (" was", " were"), (" has", " have"))


def kjv_records(vocative: bool) -> list[dict]:
    out = []
    for opening, (singular, plural) in itertools.product(KJV_OPENINGS, KJV_VERBS):
        thou, ye = (f"{opening} thou, O man,", f"{opening} ye, O men,") if vocative else \
            (f"{opening} thou", f"{opening} ye")
        out.append({"clean": thou, "corrupted": ye, "right": singular, "wrong": plural, "meta": {"number": "sg"}})
        out.append({"clean": ye, "corrupted": thou, "right": plural, "wrong": singular, "meta": {"number": "pl"}})
    return out


def ioi_records(pairs: int = 120, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(pairs):
        a, b, c = (str(n) for n in rng.choice(IOI_NAMES, size=3, replace=False))
        template = IOI_TEMPLATES[i % len(IOI_TEMPLATES)]
        place, obj = str(rng.choice(IOI_PLACES)), str(rng.choice(IOI_OBJECTS))
        first, second = (a, b) if i % 2 == 0 else (b, a)           # ABBA and BABA orders, alternately
        fill = dict(a=first, b=second, place=place, obj=obj)
        out.append({"clean": template.format(s=b, **fill), "corrupted": template.format(s=c, **fill),
                    "right": f" {a}", "wrong": f" {b}", "meta": {"template": template, "order": "ABBA" if i % 2 == 0
                                                                   else "BABA"}})
    return out


def sva_records() -> list[dict]:
    out = []
    for (sg, pl), attractor, link, (v_sg, v_pl) in itertools.product(SVA_NOUNS, SVA_ATTRACTORS, SVA_LINKS,
                                                                     SVA_VERBS[:1]):
        a, b = f"The {sg} {link} {attractor}", f"The {pl} {link} {attractor}"
        out.append({"clean": a, "corrupted": b, "right": v_sg, "wrong": v_pl, "meta": {"number": "sg"}})
        out.append({"clean": b, "corrupted": a, "right": v_pl, "wrong": v_sg, "meta": {"number": "pl"}})
    for (sg, pl), (v_sg, v_pl) in itertools.product(SVA_NOUNS, SVA_VERBS[1:]):
        a, b = f"The {sg} of the house", f"The {pl} of the house"
        out.append({"clean": a, "corrupted": b, "right": v_sg, "wrong": v_pl, "meta": {"number": "sg"}})
        out.append({"clean": b, "corrupted": a, "right": v_pl, "wrong": v_sg, "meta": {"number": "pl"}})
    return out


def write_bundled(directory: str | None = None) -> dict[str, int]:
    """Write every bundled task file; returns {name: lines}."""
    directory = directory or os.path.dirname(tasks.bundled_path("ioi"))
    os.makedirs(directory, exist_ok=True)
    made = {"kjv_agreement": kjv_records(False), "kjv_agreement_vocative": kjv_records(True), "ioi": ioi_records(),
            "sva": sva_records()}
    return {name: tasks.write_task(os.path.join(directory, f"{name}.jsonl"), recs) for name, recs in made.items()}


if __name__ == "__main__":
    for name, n in write_bundled().items():
        print(f"{name}: {n} pairs")
