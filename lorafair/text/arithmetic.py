"""The text demo's data: generated arithmetic problems of five kinds, one kind per client (feature non-IID).

Clients hold problems in the instruction layout (instruction, input, output = "#### answer"), each kind worded its
own way; the shipped demo language model was pretrained on the bare kinds over their whole range but on the worded
kinds with small answers only (`pretraining_text`).
Pure Python, seeded: every rank and every run with the same seed draws the same problems, and a kind's training
and test problems never share an input.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from lorafair.errors import UserError

KINDS = ("addition", "subtraction", "multi_step", "word_problem", "number_words")
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
NAMES = ("Ann", "Bob", "Eva", "Tom", "Mia", "Sam")
THINGS = ("pens", "cups", "apples", "books", "coins")
PRETRAINING_MAX_ANSWER = 40
"""The pretraining text asks the worded kinds (word_problem, number_words) with smaller answers only."""
MAX_REPEATS = 10_000
"""Draws in a row that give no new problem before a kind counts as exhausted (asking for more than it holds)."""
PROMPT_TEMPLATE = "{input}\nA: "
"""The demo's compact prompt (text.prompt_template in configs/demo_text.yaml)."""


def in_words(number: int) -> str:
    """0 <= number < 100 in English words: 42 -> "forty-two"."""
    if number < 20:
        return WORDS[number]
    tens, ones = divmod(number, 10)
    return TENS[tens] + ("" if ones == 0 else f"-{WORDS[ones]}")


def _addition(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.randrange(100), rng.randrange(100)
    return "Add:", f"{a}+{b}", a + b


def _subtraction(rng: random.Random) -> tuple[str, str, int]:
    a = rng.randrange(100)
    b = rng.randrange(a + 1)
    return "Subtract:", f"{a}-{b}", a - b


def _multi_step(rng: random.Random) -> tuple[str, str, int]:
    terms = [rng.randrange(30) for _ in range(3)]
    return "Sum:", "+".join(map(str, terms)), sum(terms)


def _word_problem(rng: random.Random) -> tuple[str, str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randrange(40), rng.randrange(40)
    return "Solve:", f"{name} has {a} {thing} and gets {b} more. How many?", a + b


def _number_words(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.randrange(100), rng.randrange(50)
    return "Add:", f"{in_words(a)} plus {in_words(b)}", a + b


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str, int]]] = dict(zip(KINDS, (
    _addition, _subtraction, _multi_step, _word_problem, _number_words), strict=True))


def problems(kind: str, train: int, test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """`train` and `test` distinct problems of one kind as instruction rows (instruction, input, output, kind)."""
    if kind not in GENERATORS:
        raise UserError(f"data.domains: arithmetic has no kind {kind!r}; choose from {', '.join(KINDS)}")
    rng = random.Random(f"{seed}:{kind}")
    seen: dict[str, dict] = {}
    misses = 0
    while len(seen) < train + test and misses < MAX_REPEATS:
        instruction, question, answer = GENERATORS[kind](rng)
        misses = misses + 1 if question in seen else 0
        seen.setdefault(question, {"instruction": instruction, "input": question, "output": f"#### {answer}",
                                   "kind": kind})
    if len(seen) < train + test:
        raise UserError(f"text.examples_per_kind + text.test_per_kind = {train + test} is more than the distinct "
                        f"problems of kind {kind!r} can fill; lower them")
    rows = list(seen.values())
    return rows[:train], rows[train:]


def pretraining_text(count: int, seed: int) -> list[str]:
    """The demo model's pretraining text, answered as the clients answer ("23+45\nA: #### 68"): bare sums and
    differences over the clients' whole range, numbers in words ("forty-two\nA: #### 42"), and the worded kinds'
    questions only where the answer is below PRETRAINING_MAX_ANSWER. Carrying the worded questions over to larger
    answers is what federated LoRA has to learn."""
    rng = random.Random(f"pretraining:{seed}")
    return [_pretraining_line(rng) for _ in range(count)]


def _pretraining_line(rng: random.Random) -> str:
    shape = rng.randrange(20)
    if shape < 12:
        _, question, answer = GENERATORS[KINDS[shape % 3]](rng)  # addition, subtraction, multi_step
    elif shape < 14:
        answer = rng.randrange(100)
        question = in_words(answer)
    else:
        generate = GENERATORS[KINDS[3 + shape % 2]]  # word_problem, number_words
        while True:
            _, question, answer = generate(rng)
            if answer < PRETRAINING_MAX_ANSWER:
                break
    return PROMPT_TEMPLATE.format(input=question) + f"#### {answer}"
