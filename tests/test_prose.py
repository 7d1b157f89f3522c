"""Numbers in prose come from the run.

A markdown cell may state a decimal number or a percentage only where it cannot go stale: in
maths, in a code span, glued from the run (``{glue:text}`name:.3f```), or in a sentence that
cites the paper the number comes from. Sentences about "our runs" are refused outright: a page
speaks of the run that rendered it. The markdown of an executed copy is the markdown of its
source, so the sources are read.
"""

from __future__ import annotations

import json
import re

import pytest

from gen3d_lessons.book import BookPaths, chapters

ROOT = BookPaths.at()
CHAPTERS = chapters(ROOT, missing_ok=True)

# What may hold a number, removed before the search (order matters: blocks before inline).
SAFE = [
    re.compile(r"\$\$.*?\$\$", re.S),                                   # display maths
    re.compile(r"\\begin\{(\w+\*?)\}.*?\\end\{\1\}", re.S),             # amsmath environments
    re.compile(r"```.*?```", re.S),                                     # fenced blocks (directives, code)
    re.compile(r"\{glue(?::\w+)?\}`[^`]*`"),                            # glued values
    re.compile(r"\{\w+(?::\w+)?\}`[^`]*`"),                             # other roles: {doc}, {cite}, {ref} ...
    re.compile(r"`[^`]*`"),                                             # code spans
    re.compile(r"(?<!\\)\$[^$\n]+\$"),                                  # inline maths
    re.compile(r"\]\([^)]*\)"),                                         # link targets
    re.compile(r"https?://\S+"),                                        # bare addresses
]
NUMBER = re.compile(r"(?<![\w.§])(\d+\.\d+|\.\d+|\d+(?:\.\d+)?\s?%)")              # not a §2.7
ABOUT_OTHER_RUNS = re.compile(r"\b(our runs?|our trials|runs we made|every run we|in our experience)\b", re.I)
SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")


def _markdown(chapter) -> list[str]:
    cells = json.loads(chapter.path.read_text())["cells"]
    return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for c in cells if c["cell_type"] == "markdown"]


def problems(text: str) -> list[str]:
    """The sentences of ``text`` that state a number the run did not produce, or speak of other runs."""
    found = []
    for sentence in SENTENCE.split(text):
        if ABOUT_OTHER_RUNS.search(sentence):
            found.append(f"speaks of other runs: {sentence.strip()[:160]!r}")
            continue
        if "{cite" in sentence:                       # a figure from a paper, with its source
            continue
        bare = sentence
        for pattern in SAFE:
            bare = pattern.sub(" ", bare)
        for number in NUMBER.findall(bare):
            found.append(f"{number!r} is neither glued, nor maths, nor cited: {sentence.strip()[:160]!r}")
    return found


def test_the_checker_tells_glued_from_typed():
    assert problems("Dice reached 0.87 here.")
    assert problems("The model wins in 12 % of cases.")
    assert problems("In our runs the AE tied with PCA.")
    assert not problems("Dice reached {glue:text}`dice:.3f` and {glue:text}`verdict`.")
    assert not problems("With $\\beta = 0.5$ and `lr=1e-3`, see {doc}`ch04_autoencoders`.")
    assert not problems("VoxelMorph reached 0.749 Dice {cite}`balakrishnan2019voxelmorph`.")
    assert not problems("$$\\alpha_t = 0.99$$ and a 64³ grid of 2 mm voxels, as in §2.7.")


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.name for c in CHAPTERS])
def test_numbers_in_prose_come_from_the_run(chapter):
    found = [p for text in _markdown(chapter) for p in problems(text)]
    assert not found, f"{chapter.name}:\n  " + "\n  ".join(found)
