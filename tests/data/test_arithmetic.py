"""The text demo's generated word problems and the shipped language model's pretraining text."""

from __future__ import annotations

import re

import pytest

from tests.helpers import ROOT, parse_fit_args


def _solve(question: str) -> int:
    """The answer of a demo problem, worked out from its wording: a difference where something was sold, else the
    sum of its numbers (bare questions: "87+91", "87-12")."""
    if not question[0].isalpha():
        return eval(question)
    numbers = [int(number) for number in re.findall(r"\d+", question)]
    return numbers[0] - numbers[1] if " sold " in question else sum(numbers)


def test_arithmetic_problems_are_right_distinct_large_and_apart_from_training():
    from lorafair.data.arithmetic import CLIENT_MIN_ANSWER, KINDS, MAX_ANSWER, problems

    for kind in KINDS:
        train, test = problems(kind, 400, 2000, seed=3)
        assert len(train) == 400 and len(test) == 2000
        assert not {r["input"] for r in train} & {r["input"] for r in test}
        assert len({r["input"] for r in test}) == 2000 and problems(kind, 400, 2000, seed=3) == (train, test)
        for row in train + test:
            answer = int(row["output"].removeprefix("#### "))
            assert answer == _solve(row["input"]) and CLIENT_MIN_ANSWER <= answer < MAX_ANSWER, row
    wordings = [{word for row in problems(kind, 0, 50, seed=0)[1] for word in row["input"].split()} for kind in KINDS]
    for i, mine in enumerate(wordings):  # each kind has words no other kind uses
        assert mine - set().union(*(theirs for j, theirs in enumerate(wordings) if j != i))


def test_asking_a_kind_for_more_problems_than_it_holds_is_one_line_at_once():
    """A kind holds a few thousand distinct problems; asking for 10^8 used to draw for hours before giving up."""
    from lorafair.data.arithmetic import problems
    from lorafair.errors import UserError

    with pytest.raises(UserError, match="more than the distinct problems of kind 'scores' can fill; lower them"):
        problems("scores", 10**8, 10, seed=0)
    train, test = problems("scores", 2_500, 500, seed=0)  # of its 4 teams x 780 pairs of terms below 40
    assert len({row["input"] for row in train + test}) == 3_000


def test_the_pretraining_text_holds_small_worded_questions_only_and_answers_right():
    from lorafair.data.arithmetic import PRETRAINING_MAX_ANSWER, pretraining_text

    by_shape: dict[str, list[int]] = {}
    for line in pretraining_text(3000, seed=0):
        question, answer = line.split("\nA: #### ")
        assert int(answer) == _solve(question), line
        if question[0].isdigit():
            shape = "".join(filter("+-".__contains__, question))  # "87+91" -> "+"
        else:
            shape = next(word for word in ("garden", "saved", "baker", "scored", "has") if word in question.split())
        by_shape.setdefault(shape, []).append(int(answer))
    worded = [answer for shape, answers in by_shape.items() if shape not in ("+", "-") for answer in answers]
    assert sorted(by_shape) == ["+", "-", "baker", "garden", "has", "saved", "scored"]
    assert max(worded) == PRETRAINING_MAX_ANSWER - 1
    assert max(by_shape["+"]) > 150  # the bare sums span the whole range


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_test_problem_of_any_kind_is_in_the_shipped_models_pretraining_text(seed):
    """The text scripts/build_demo_text_lm.py trains the shipped model on (its defaults), line by line, holds no
    client problem as prompted and answered, nor any client prompt at all (seeds 0, 1, 2, the demo's sizes)."""
    from lorafair.data.arithmetic import KINDS, PROMPT_TEMPLATE, pretraining_text, problems

    demo = parse_fit_args(["--config", "demo_text"])
    assert demo.text.prompt_template == PROMPT_TEMPLATE and demo.data.domains in (None, list(KINDS))
    script = (ROOT / "scripts" / "build_demo_text_lm.py").read_text()
    assert "batches(tokenizer, pretraining_text(), " in script  # the defaults, as here
    lines = set(pretraining_text())
    prompts = {line.split("\nA: ")[0] for line in lines}
    for kind in KINDS:
        train, test = problems(kind, demo.text.examples_per_kind, demo.text.test_per_kind, seed=seed)
        assert not {PROMPT_TEMPLATE.format(input=row["input"]) + row["output"] for row in test} & lines
        assert not {row["input"] for row in train + test} & prompts
