"""The text demo's data: generated word problems of five kinds, one kind per client (feature non-IID).

Each kind is its own problem family worded its own way, with its own vocabulary (`word_problem`: "Ann has 23 pens
and gets 18 more. How many?", `garden`, `savings`, `bakery` (a difference), `scores`). Clients hold problems in the
instruction layout (instruction, input, output = "#### answer") whose answers are CLIENT_MIN_ANSWER to
MAX_ANSWER - 1. The shipped demo language model was pretrained (`pretraining_text`) on bare sums and differences of
numbers below 100 and on the same five kinds with answers below CLIENT_MIN_ANSWER only, so no client problem is in
its pretraining text: carrying each wording over to larger answers is what federated LoRA has to learn.
Pure Python, seeded: every rank and every run with the same seed draws the same problems, and a kind's training
and test problems never share an input.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from lorafair.errors import UserError

KINDS = ("word_problem", "garden", "savings", "bakery", "scores")
NAMES = ("Ann", "Bob", "Eva", "Tom", "Mia", "Sam")
THINGS = ("pens", "cups", "apples", "books", "coins")
FLOWERS = ("roses", "lilies", "tulips", "daisies")
BAKES = ("buns", "pies", "rolls", "cakes")
TEAMS = ("Hawks", "Lions", "Reds", "Bears")
CLIENT_MIN_ANSWER = 40
"""The clients' problems have answers from here up; the pretraining text's worded problems stay below it."""
PRETRAINING_MAX_ANSWER = CLIENT_MIN_ANSWER
"""The pretraining text asks the worded kinds with smaller answers only."""
OPERAND_LIMIT = 40
"""The worded kinds' numbers: two terms below it each (the baker's count below twice it)."""
MAX_ANSWER = 2 * OPERAND_LIMIT
"""Answers of the clients' problems stay below this."""
PRETRAINING_LINES = 50_000
PRETRAINING_SEED = 0
"""The shipped demo model's pretraining text is `pretraining_text(PRETRAINING_LINES, PRETRAINING_SEED)`."""
MAX_REPEATS = 10_000
"""Draws in a row that give no new problem before a kind counts as exhausted (asking for more than it holds)."""
PROMPT_TEMPLATE = "{input}\nA: "
"""The demo's compact prompt (text.prompt_template in configs/demo_text.yaml)."""


def _two_terms(rng: random.Random) -> tuple[int, int]:
    return rng.randrange(OPERAND_LIMIT), rng.randrange(OPERAND_LIMIT)


def _word_problem(rng: random.Random) -> tuple[str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = _two_terms(rng)
    return f"{name} has {a} {thing} and gets {b} more. How many?", a + b


def _garden(rng: random.Random) -> tuple[str, int]:
    first, second = rng.sample(FLOWERS, 2)
    a, b = _two_terms(rng)
    return f"A garden has {a} {first} and {b} {second}. Flowers?", a + b


def _savings(rng: random.Random) -> tuple[str, int]:
    name = rng.choice(NAMES)
    a, b = _two_terms(rng)
    return f"{name} saved {a} coins, then {b} more. Total?", a + b


def _bakery(rng: random.Random) -> tuple[str, int]:
    bake = rng.choice(BAKES)
    a = rng.randrange(2 * OPERAND_LIMIT)
    b = rng.randrange(a + 1)
    return f"A baker made {a} {bake} and sold {b}. Left?", a - b


def _scores(rng: random.Random) -> tuple[str, int]:
    team = rng.choice(TEAMS)
    a, b = _two_terms(rng)
    return f"The {team} scored {a}, then {b}. Final score?", a + b


GENERATORS: dict[str, Callable[[random.Random], tuple[str, int]]] = dict(zip(KINDS, (
    _word_problem, _garden, _savings, _bakery, _scores), strict=True))


def draw(kind: str, rng: random.Random, low: int, high: int) -> tuple[str, int]:
    """A (question, answer) of `kind` whose answer is in [low, high), drawn until one is."""
    while True:
        question, answer = GENERATORS[kind](rng)
        if low <= answer < high:
            return question, answer


def problems(kind: str, train: int, test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """`train` and `test` distinct problems of one kind, answers in [CLIENT_MIN_ANSWER, MAX_ANSWER), as instruction
    rows (instruction, input, output, kind)."""
    if kind not in GENERATORS:
        raise UserError(f"data.domains: arithmetic has no kind {kind!r}; choose from {', '.join(KINDS)}")
    rng = random.Random(f"{seed}:{kind}")
    seen: dict[str, dict] = {}
    misses = 0
    while len(seen) < train + test and misses < MAX_REPEATS:
        question, answer = draw(kind, rng, CLIENT_MIN_ANSWER, MAX_ANSWER)
        misses = misses + 1 if question in seen else 0
        seen.setdefault(question, {"instruction": "Solve:", "input": question, "output": f"#### {answer}",
                                   "kind": kind})
    if len(seen) < train + test:
        raise UserError(f"text.examples_per_kind + text.test_per_kind = {train + test} is more than the distinct "
                        f"problems of kind {kind!r} can fill; lower them")
    rows = list(seen.values())
    return rows[:train], rows[train:]


def pretraining_text(count: int = PRETRAINING_LINES, seed: int = PRETRAINING_SEED) -> list[str]:
    """The demo model's pretraining text, answered as the clients answer ("23+45\nA: #### 68"): one line in five a
    bare sum and one a bare difference of numbers below 100, three in five the five client kinds with answers below
    PRETRAINING_MAX_ANSWER only. The defaults are the text scripts/build_demo_text_lm.py trains
    the shipped model on."""
    rng = random.Random(f"pretraining:{seed}")
    return [_pretraining_line(rng) for _ in range(count)]


def _pretraining_line(rng: random.Random) -> str:
    shape = rng.randrange(5)
    if shape == 0:
        a, b = rng.randrange(100), rng.randrange(100)
        question, answer = f"{a}+{b}", a + b
    elif shape == 1:
        a = rng.randrange(100)
        b = rng.randrange(a + 1)
        question, answer = f"{a}-{b}", a - b
    else:
        question, answer = draw(KINDS[rng.randrange(len(KINDS))], rng, 0, PRETRAINING_MAX_ANSWER)
    return PROMPT_TEMPLATE.format(input=question) + f"#### {answer}"
