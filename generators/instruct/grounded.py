"""Instructions without a model: questions whose answers follow from the captions and boxes.

Correct by construction, so they are the default when no endpoint is configured (an offline
demo) and a floor to compare a model's output with. From the boxes: which objects are present
and how many of each, where an object that occurs once lies (from its box centre: left / right
of the image's middle third, top / bottom likewise), which object takes the largest area, which
of two single objects is further left, and, given a vocabulary of object names, whether an object
is there: as many absent objects as present ones per conversation, so yes and no are taught equally
(a model that only ever hears "yes" learns to say it). From the captions: what the image shows.
Every answer states only those facts. The conversation's questions come in an order seeded by
the row, so no answer is learnt from its position, with the presence questions first: every other
answer names objects that are there (and the questions about counts and places name only those),
so after them "is there ...?" could be answered from the conversation without looking.

The ``presence`` response type holds the presence questions alone, each asking for a yes or a no
and answered with that word (LLaVA-1.5 formats its short-answer VQA data so): a short record that
teaches looking for an object at a fraction of a conversation's tokens. It is built from the boxes
whichever backend writes the other types, as a model could add nothing to it.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

from generators.instruct.context import Box, Context

GROUNDED_MODEL = "grounded"
GROUNDED_VERSION = "grounded-2"
#: The response type of short yes/no presence records, always built from the boxes (no model asked).
PRESENCE = "presence"
SHORT_ANSWER = "Answer yes or no."
_IRREGULAR = {
    "person": "people",
    "mouse": "mice",
    "sheep": "sheep",
    "skis": "skis",
    "scissors": "scissors",
    "glasses": "glasses",
    "bus": "buses",
    "knife": "knives",
    "shelf": "shelves",
    "child": "children",
    "man": "men",
    "woman": "women",
    "foot": "feet",
    "tooth": "teeth",
    "fish": "fish",
    "deer": "deer",
}
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def plural(noun: str) -> str:
    head, _, last = noun.rpartition(" ")
    if last in _IRREGULAR:
        word = _IRREGULAR[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        word = last + "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


def count_phrase(n: int, noun: str) -> str:
    number = _NUMBERS[n] if n < len(_NUMBERS) else str(n)
    return f"{number} {noun if n == 1 else plural(noun)}"


def position(box: Box) -> str:
    """Where ``box``'s centre lies, in words: thirds of the width and of the height."""
    x, y = box.centre
    horizontal = "left" if x < 1 / 3 else "right" if x > 2 / 3 else ""
    vertical = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else ""
    if not horizontal and not vertical:
        return "in the centre of the image"
    if horizontal and vertical:
        return f"in the {vertical} {horizontal} part of the image"
    return f"on the {horizontal} side of the image" if horizontal else f"at the {vertical} of the image"


def inventory(boxes: list[Box]) -> str:
    counts = Counter(b.category for b in boxes)
    parts = [count_phrase(n, c) for c, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def with_article(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def presence_pairs(
    boxes: list[Box],
    vocabulary: Sequence[str],
    rng: random.Random,
    most: int = 3,
    drawn: bool = False,
    short: bool = False,
) -> list[tuple[str, str]]:
    """Is there ...? for up to ``most`` objects in ``boxes`` (yes) and as many of ``vocabulary``
    that are not (no): drawn at random, or the first of them where ``drawn`` says they were drawn
    already (:class:`~generators.instruct.absent.AbsentObjects`). ``short``: the question asks for
    a yes or a no and the answer is that word, as LLaVA-1.5 formats its short-answer data."""
    present = sorted({b.category for b in boxes})
    if drawn:
        absent = [name for name in dict.fromkeys(vocabulary) if name not in present]
    else:
        absent = sorted(set(vocabulary) - set(present))
    asked = min(most, len(present), len(absent))
    questions = [(name, True) for name in rng.sample(present, asked)]
    questions += [(name, False) for name in (absent[:asked] if drawn else rng.sample(absent, asked))]
    rng.shuffle(questions)
    if short:
        return [
            (f"Is there {with_article(name)} in the image? {SHORT_ANSWER}", "Yes." if there else "No.")
            for name, there in questions
        ]
    return [
        (
            f"Is there {with_article(name)} in the image?",
            f"Yes, there is {with_article(name)} in the image." if there else f"No, there is no {name} in the image.",
        )
        for name, there in questions
    ]


def conversation_pairs(
    context: Context, vocabulary: Sequence[str] = (), seed: str = "", drawn: bool = False
) -> list[tuple[str, str]]:
    """The conversation's question-answer pairs; ``vocabulary`` names the objects absence is asked
    about (``drawn``: the row's own, already drawn, see :func:`presence_pairs`)."""
    pairs = [("What does this image show?", _sentence(context.captions[0]))]
    boxes = context.boxes
    if not boxes:
        return pairs
    rng = random.Random(seed)
    counts = Counter(b.category for b in boxes)
    pairs.append(("What objects can you see in the image?", f"I can see {inventory(boxes)}."))
    for category, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:2]:
        verb = "is" if n == 1 else "are"
        pairs.append(
            (
                f"How many {plural(category)} are there in the image?",
                f"There {verb} {count_phrase(n, category)} in the image.",
            )
        )
    singles = [b for b in boxes if counts[b.category] == 1]
    for box in singles[:2]:
        pairs.append((f"Where is the {box.category} in the image?", f"The {box.category} is {position(box)}."))
    largest = max(boxes, key=lambda b: b.area)
    if len(counts) > 1:
        pairs.append(
            (
                "Which object takes up the most space in the image?",
                f"The largest object is {'the' if counts[largest.category] == 1 else 'a'} {largest.category}, "
                f"covering about {largest.area:.0%} of the image.",
            )
        )
    rng.shuffle(pairs)
    return presence_pairs(boxes, vocabulary, rng, drawn=drawn) + pairs


def detailed_pairs(context: Context, question: str) -> list[tuple[str, str]]:
    sentences = [_sentence(c) for c in context.captions[:3]]
    if context.boxes:
        sentences.append(f"In the image there {'is' if len(context.boxes) == 1 else 'are'} {inventory(context.boxes)}.")
        counts = Counter(b.category for b in context.boxes)
        sentences += [f"The {b.category} is {position(b)}." for b in context.boxes if counts[b.category] == 1][:3]
    return [(question, " ".join(sentences))]


def reasoning_pairs(context: Context) -> list[tuple[str, str]]:
    counts = Counter(b.category for b in context.boxes)
    singles = [b for b in context.boxes if counts[b.category] == 1]
    if len(singles) >= 2:
        a, b = singles[0], singles[1]
        left, right = (a, b) if a.centre[0] <= b.centre[0] else (b, a)
        return [
            (
                f"Which is further to the left, the {a.category} or the {b.category}?",
                f"The {left.category} is {position(left)} and the {right.category} is {position(right)}; "
                f"the centre of the {left.category} is further left, so the {left.category} is further to "
                f"the left.",
            )
        ]
    if context.boxes:
        top = max(counts.values())
        common = sorted(c for c, n in counts.items() if n == top)
        verdict = (
            f"The most common kind is {plural(common[0])}."
            if len(common) == 1
            else f"No kind is more common than the others: {' and '.join(plural(c) for c in common)} "
            f"occur {top} time{'s' if top > 1 else ''} each."
        )
        return [
            (
                "How many objects can be counted in the image, and which kind is most common?",
                f"Counting each object: {inventory(context.boxes)}, {len(context.boxes)} in all. {verdict}",
            )
        ]
    return [("What is the main subject of this image?", _sentence(context.captions[0]))]


def _sentence(text: str) -> str:
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."
