"""Checks on the weather-json demo dataset and the script that generates it."""

import importlib.util
import json
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data" / "weather-json"
SCRIPT = ROOT / "scripts" / "make_demo_data.py"

SPLIT_SIZES = {"train": 400, "valid": 50, "test": 50}
KEYS = ["city", "condition", "temp_c"]
CONDITIONS = {"sunny", "cloudy", "rain", "snow", "fog", "storm", "windy"}
INSTRUCTION = "Extract the weather as JSON: "

# A reading in the report: "14°C", "-3.5 C", "minus 4 degrees Fahrenheit", "57 F".
TEMPERATURE = re.compile(
    r"(?P<minus>minus |-)?(?P<number>\d+(?:\.5)?)"
    r"(?:°| degrees | )(?P<unit>C|F|Celsius|Fahrenheit)\b"
)


def load_script():
    spec = importlib.util.spec_from_file_location("make_demo_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_split(folder: Path, name: str) -> list[dict]:
    with (folder / f"{name}.jsonl").open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {name: read_split(DATA_DIR, name) for name in SPLIT_SIZES}


def all_rows(splits):
    return [row for rows in splits.values() for row in rows]


def user_text(row) -> str:
    return row["messages"][0]["content"]


def answer(row) -> dict:
    return json.loads(row["messages"][1]["content"])


def expected_celsius(number: Fraction, unit: str) -> int:
    """Apply the documented rule on its own: convert F exactly, round half away from zero."""
    celsius = (number - 32) * Fraction(5, 9) if unit.startswith("F") else number
    whole = abs(celsius).numerator // abs(celsius).denominator
    if abs(celsius) - whole >= Fraction(1, 2):
        whole += 1
    return whole if celsius >= 0 else -whole


def test_committed_files_match_fresh_generation(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True)

    for name in SPLIT_SIZES:
        fresh = (tmp_path / f"{name}.jsonl").read_bytes()
        committed = (DATA_DIR / f"{name}.jsonl").read_bytes()
        assert fresh == committed, f"{name}.jsonl differs: rerun scripts/make_demo_data.py"


def test_row_counts(splits):
    for name, size in SPLIT_SIZES.items():
        assert len(splits[name]) == size, name


def test_rows_are_user_then_assistant(splits):
    for row in all_rows(splits):
        assert list(row) == ["messages"]
        roles = [message["role"] for message in row["messages"]]
        assert roles == ["user", "assistant"], row
        assert user_text(row).startswith(INSTRUCTION), row


def test_answers_are_compact_json_with_fixed_keys(splits):
    for row in all_rows(splits):
        content = row["messages"][1]["content"]
        fields = json.loads(content)

        assert list(fields) == KEYS, content
        assert "\n" not in content, content
        assert content == json.dumps(fields, ensure_ascii=False), content
        assert fields["condition"] in CONDITIONS, content
        assert fields["temp_c"] is None or type(fields["temp_c"]) is int, content


def test_city_appears_in_report(splits):
    for row in all_rows(splits):
        assert answer(row)["city"] in user_text(row), row


def test_every_split_has_every_condition(splits):
    for name, rows in splits.items():
        conditions = {answer(row)["condition"] for row in rows}
        assert conditions == CONDITIONS, name


def test_reports_are_short(splits):
    for row in all_rows(splits):
        assert len(user_text(row).split()) < 40, row


def test_no_duplicate_prompts(splits):
    prompts = [" ".join(user_text(row).lower().split()) for row in all_rows(splits)]
    assert len(set(prompts)) == len(prompts)


def test_no_prompt_in_two_splits(splits):
    prompt_sets = {name: {user_text(row) for row in rows} for name, rows in splits.items()}

    assert not prompt_sets["train"] & prompt_sets["valid"]
    assert not prompt_sets["train"] & prompt_sets["test"]
    assert not prompt_sets["valid"] & prompt_sets["test"]


def test_temp_c_follows_the_report(splits):
    for row in all_rows(splits):
        readings = list(TEMPERATURE.finditer(user_text(row)))
        temp_c = answer(row)["temp_c"]

        if temp_c is None:
            assert readings == [], row
            continue
        assert len(readings) == 1, row
        reading = readings[0]
        number = Fraction(reading["number"])
        if reading["minus"]:
            number = -number
        assert temp_c == expected_celsius(number, reading["unit"]), row


def test_data_covers_both_units_and_ties(splits):
    units = set()
    ties = set()
    for row in all_rows(splits):
        reading = TEMPERATURE.search(user_text(row))
        if reading is None:
            continue
        units.add(reading["unit"][0])
        if reading["number"].endswith(".5"):
            ties.add("negative" if reading["minus"] else "positive")

    assert units == {"C", "F"}
    assert ties == {"negative", "positive"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Fraction(5, 2), 3),
        (Fraction(-5, 2), -3),
        (Fraction(1, 2), 1),
        (Fraction(-1, 2), -1),
        (Fraction(7, 5), 1),
        (Fraction(-7, 5), -1),
        (Fraction(0), 0),
    ],
)
def test_round_half_away_from_zero(value, expected):
    assert load_script().round_half_away_from_zero(value) == expected


@pytest.mark.parametrize(
    ("fahrenheit", "celsius"),
    [
        (57, 14),  # 13.89
        (32, 0),
        (212, 100),
        (-40, -40),
        (33, 1),  # 0.56
        (31, -1),  # -0.56
        (0, -18),  # -17.78
        (100, 38),  # 37.78
        (50, 10),
        (Fraction(73, 2), 3),  # 36.5 F is exactly 2.5 C, a tie
    ],
)
def test_fahrenheit_to_celsius(fahrenheit, celsius):
    assert load_script().fahrenheit_to_celsius(Fraction(fahrenheit)) == celsius

