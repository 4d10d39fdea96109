"""What the LLM scorer asks and how its answer is read: the paper's 1-5 complexity scale, one prompt per feature
listing its top contexts with the firing token marked, and a strict parser for the JSON answer.

The answer must hold one JSON object {"explanation": str, "complexity": int 1..5}. Code fences and prose around
the object are tolerated (models add them); anything else is an AnswerError whose message is sent back once with
a firmer instruction (llm.py).
"""
from __future__ import annotations

import json

from crossjax.complexity import MAX_COMPLEXITY, MIN_COMPLEXITY, FeatureContexts

MARKS = ("[[", "]]")  # around the token the feature fires on

# Wu et al. 2025 score each feature's interpretation from 1 (a single token) to 5 (a rich, abstract concept);
# the steps in between are spelled out so that scores from different runs and models stay comparable.
SCALE = """\
1 - a single specific token (up to case and spacing), whatever surrounds it
2 - a small set of closely related tokens or one surface pattern (a word family, plurals, a punctuation mark \
in a fixed position), or one token in one fixed local context
3 - a lexical or grammatical category that spans many different tokens (e.g. verbs in past tense, numbers, \
the word after a preposition)
4 - a meaning that needs the surrounding context to be recognised: a syntactic role, a topic, a relation \
between several tokens
5 - a rich, abstract concept expressed by many different words in many different contexts (e.g. uncertainty, \
a narrative or discourse structure)"""

SYSTEM = f"""You interpret features of a language model. You are shown the text contexts on which one feature \
activates most strongly; in each context the token where it fires is marked {MARKS[0]}like this{MARKS[1]}, with \
the activation value. Explain in one sentence what the feature detects, then rate how complex that concept is \
on this scale:
{SCALE}
Answer with one JSON object and nothing else: {{"explanation": "<one sentence>", "complexity": <integer 1-5>}}"""


class AnswerError(ValueError):
    """An answer that does not hold a usable {"explanation", "complexity"} object; the message says why."""


def _visible(token: str) -> str:
    # one line per context: newlines and tabs inside tokens are shown as escapes
    return token.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def describe(feature: FeatureContexts) -> str:
    """The user prompt for one feature: its contexts, one a line, the firing token between MARKS.

    The feature id is left out on purpose: it means nothing to the model, and leaving it out lets two features
    with the same contexts share one cached answer.
    """
    lines = [f"Top {len(feature.contexts)} activating contexts of the feature:"]
    for n, c in enumerate(feature.contexts, 1):
        text = "".join(_visible(t) if i != c.firing else f"{MARKS[0]}{_visible(t)}{MARKS[1]}"
                       for i, t in enumerate(c.tokens))
        lines.append(f"{n}. (activation {c.activation:.3g}) {text}")
    return "\n".join(lines)


def firmer(reason: str) -> str:
    """The follow-up message after an unusable answer."""
    return (f"Your answer could not be used: {reason}. Reply again with ONLY one JSON object, no other text and no "
            f'code fence, exactly of the form {{"explanation": "<one sentence>", "complexity": <integer from '
            f"{MIN_COMPLEXITY} to {MAX_COMPLEXITY}>}}.")


def _objects(text: str):
    """Every JSON object that starts at a '{' in text, in order."""
    decoder = json.JSONDecoder()
    at = text.find("{")
    while at >= 0:
        try:
            obj, _ = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            yield obj
        at = text.find("{", at + 1)


def parse_answer(text: str) -> tuple[int, str]:
    """(complexity, explanation) from an answer, or AnswerError naming what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise AnswerError("the answer was empty")
    obj = next((o for o in _objects(text) if "complexity" in o), None)
    if obj is None:
        raise AnswerError(f"no JSON object with a \"complexity\" key was found in {text[:200]!r}")
    value = obj["complexity"]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise AnswerError(f"complexity={value!r} is not an integer")
    if not MIN_COMPLEXITY <= value <= MAX_COMPLEXITY:
        raise AnswerError(f"complexity={value} is outside the scale {MIN_COMPLEXITY}..{MAX_COMPLEXITY}")
    explanation = obj.get("explanation")
    if not isinstance(explanation, str) or not explanation.strip():
        raise AnswerError("the \"explanation\" is missing or empty")
    return value, explanation.strip()
