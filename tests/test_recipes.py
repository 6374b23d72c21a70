"""Recipes: offline reasoning_gym tasks, and hub recipes through a local file in the hub's format.

Each hub recipe is loaded with `load_recipe(name, path=tmpfile)` on rows written with the column
names and types the dataset has on the hub; the gold answer must round-trip through
`is_correct(recipe.gold_response(answer), answer, kind)`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset

from llmkd.data.recipes import available_recipes, load_recipe
from llmkd.eval.reasoning import is_correct

HUB_ROWS = {
    "gsm8k": [
        {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                     "clips to her friends in May. How many clips did Natalia sell altogether in April "
                     "and May?",
         "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
                   "<<48+24=72>>72 clips altogether in April and May.\n#### 72"},
        {"question": "A farm sells 1,250 eggs a day. How many eggs does it sell in 2 days?",
         "answer": "It sells 1,250*2 = <<1250*2=2500>>2,500 eggs.\n#### 2,500"},
    ],
    "svamp": [
        {"ID": "chal-1", "Body": "Each pack of dvds costs 76 dollars. If there is a discount of 25 "
                                 "dollars on each pack", "Question": "How much do you have to pay to buy each pack?",
         "Equation": "( 76.0 - 25.0 )", "Answer": 51.0, "Type": "Subtraction",
         "question_concat": "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars "
                            "on each pack How much do you have to pay to buy each pack?"},
        {"ID": "chal-2", "Body": "Dan has 5 pizzas to share equally between 2 friends.",
         "Question": "How many pizzas does each friend get?", "Equation": "( 5.0 / 2.0 )",
         "Answer": 2.5, "Type": "Common-Division",
         "question_concat": "Dan has 5 pizzas to share equally between 2 friends. How many pizzas "
                            "does each friend get?"},
    ],
    "strategyqa": [
        {"qid": "4fd64bb6ce5b78ab20b6", "term": "Mixed martial arts",
         "description": "full contact combat sport",
         "question": "Is Mixed martial arts totally original from Roman Colosseum games?",
         "answer": False, "facts": "Mixed Martial arts began in the 1990s.",
         "decomposition": "When did Mixed martial arts begin?"},
        {"qid": "e0044a7b4d146d611e73", "term": "Hamster", "description": "subfamily of mammals",
         "question": "Could a hamster fit in a teacup?", "answer": True,
         "facts": "Hamsters are small.", "decomposition": "How big is a hamster?"},
    ],
    "arc_challenge": [
        {"id": "Mercury_SC_415702",
         "question": "George wants to warm his hands quickly by rubbing them. Which skin surface will "
                     "produce the most heat?",
         "choices": {"text": ["dry palms", "wet palms", "palms covered with oil",
                              "palms covered with lotion"], "label": ["A", "B", "C", "D"]},
         "answerKey": "A"},
        {"id": "NYSEDREGENTS_2015_4_8",
         "question": "Which object is the best conductor of electricity?",
         "choices": {"text": ["a wax crayon", "a plastic spoon", "an iron nail", "a rubber eraser"],
                     "label": ["1", "2", "3", "4"]},
         "answerKey": "3"},
    ],
    "math500": [
        {"problem": "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.",
         "solution": "We have that $r = \\sqrt{0^2 + 3^2} = 3.$ ... $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
         "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
         "unique_id": "test/precalculus/807.json"},
        {"problem": "What is the value of $\\frac{14}{3}$ written as a fraction?",
         "solution": "It is $\\boxed{\\frac{14}{3}}$.", "answer": "\\frac{14}{3}",
         "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"},
    ],
    "bbh_boolean_expressions": [
        {"input": "not ( ( not not True ) ) is", "target": "False"},
        {"input": "True and not not ( not False ) is", "target": "True"},
    ],
    "bbh_date_understanding": [
        {"input": "Today is Christmas Eve of 1937. What is the date 10 days ago in MM/DD/YYYY?\n"
                  "Options:\n(A) 12/14/2026\n(B) 12/14/1950\n(C) 12/14/2007\n(D) 12/14/1937\n"
                  "(E) 07/14/1938\n(F) 12/14/1988", "target": "(D)"},
        {"input": "Tomorrow is 11/12/2019. What is the date one year ago from today in MM/DD/YYYY?\n"
                  "Options:\n(A) 09/04/2018\n(B) 11/11/2018\n(C) 08/25/2018\n(D) 11/02/2018\n"
                  "(E) 11/04/2018", "target": "(B)"},
    ],
}

# (first prompt, golds) per hub recipe.
EXPECTED = {
    "gsm8k": (HUB_ROWS["gsm8k"][0]["question"]
              + '\nThink step by step, then finish with "The answer is N."', ["72", "2500"]),
    "svamp": ("Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack "
              "How much do you have to pay to buy each pack?\n"
              'Think step by step, then finish with "The answer is N."', ["51", "2.5"]),
    "strategyqa": ("Is Mixed martial arts totally original from Roman Colosseum games?\n"
                   'Think step by step, then finish with "The answer is yes." or "The answer is no."',
                   ["no", "yes"]),
    "arc_challenge": (HUB_ROWS["arc_challenge"][0]["question"]
                      + "\n(A) dry palms\n(B) wet palms\n(C) palms covered with oil\n"
                        "(D) palms covered with lotion\n"
                        'Finish with "The answer is (X)." where X is the letter of the correct option.',
                      ["A", "3"]),
    "math500": ("Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.\n"
                "Put your final answer within \\boxed{}.",
                ["\\left( 3, \\frac{\\pi}{2} \\right)", "\\frac{14}{3}"]),
    "bbh_boolean_expressions": ("Evaluate the boolean expression: not ( ( not not True ) ) is\n"
                                'Finish with "The answer is True." or "The answer is False."',
                                ["False", "True"]),
    "bbh_date_understanding": (HUB_ROWS["bbh_date_understanding"][0]["input"]
                               + '\nFinish with "The answer is (X)." where X is the letter of the '
                                 "correct option.", ["D", "B"]),
}


def _write(rows: list[dict], path: Path) -> Path:
    """jsonl for most, parquet for some: both local formats the override accepts."""
    if path.suffix == ".parquet":
        Dataset.from_list(rows).to_parquet(str(path))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", sorted(HUB_ROWS))
def test_hub_recipe_local_override(name: str, tmp_path: Path) -> None:
    suffix = ".parquet" if name in ("svamp", "math500", "strategyqa") else ".jsonl"
    data = _write(HUB_ROWS[name], tmp_path / f"{name}{suffix}")
    recipe = load_recipe(name, path=str(data))
    assert recipe.source == "hub" and recipe.hub_id       # the hub id stays the default source
    rows = recipe.load()
    first_prompt, golds = EXPECTED[name]
    assert rows[0]["prompt"] == first_prompt
    assert rows["answer"] == golds
    for gold in golds:
        assert is_correct(recipe.gold_response(gold), gold, recipe.answer_kind), (name, gold)
    # ... and a response stating the other row's answer is wrong.
    assert not is_correct(recipe.gold_response(golds[1]), golds[0], recipe.answer_kind)
    # size / offset select a slice, ids are stable.
    again = recipe.load(1, offset=1)
    assert again["answer"] == golds[1:] and again[0]["id"] == rows[1]["id"]


def test_hub_recipes_name_real_datasets() -> None:
    ids = {n: (load_recipe(n).hub_id, load_recipe(n).hub_config) for n in HUB_ROWS}
    assert ids == {
        "gsm8k": ("openai/gsm8k", "main"), "svamp": ("ChilleD/SVAMP", None),
        "strategyqa": ("ChilleD/StrategyQA", None), "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
        "math500": ("HuggingFaceH4/MATH-500", None),
        "bbh_boolean_expressions": ("lukaemon/bbh", "boolean_expressions"),
        "bbh_date_understanding": ("lukaemon/bbh", "date_understanding"),
    }


REASONING_GYM = sorted(n for n in available_recipes() if load_recipe(n).source == "reasoning_gym")


@pytest.mark.parametrize("name", REASONING_GYM)
def test_reasoning_gym_recipe_offline(name: str) -> None:
    recipe = load_recipe(name)
    rows = recipe.load(4, seed=3)
    assert len(rows) == 4 and all(rows["prompt"]) and all(rows["answer"])
    assert len(set(rows["id"])) == 4
    for gold in rows["answer"]:
        assert is_correct(recipe.gold_response(gold), gold, recipe.answer_kind), (name, gold)


def test_logic_recipes_have_crisp_answers() -> None:
    assert set(load_recipe("syllogism").load(8)["answer"]) <= {"yes", "no"}
    rel = load_recipe("family_relationships").load(4)
    assert all(a and " " not in a for a in rel["answer"])   # one-word relations


def test_bad_recipe_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Available: .*gsm8k"):
        load_recipe("gsm9k")
    with pytest.raises(ValueError, match="answer_kind"):
        load_recipe("gsm8k", answer_kind="number")
    wrong = _write([{"body": "x", "question": "y", "answer": 1.0}], tmp_path / "svamp.jsonl")
    with pytest.raises(ValueError, match="lack .*Body"):
        load_recipe("svamp", path=str(wrong)).load()
