"""Generate the weather-json demo dataset: short weather reports in, one line of JSON out.

Run `python scripts/make_demo_data.py` from anywhere to rewrite data/weather-json/{train,valid,
test}.jsonl. The generator uses only its own seeded random.Random, so every run writes the
same bytes. tests/test_demo_data.py checks that the committed files match a fresh run.
"""

import argparse
import json
import random
from fractions import Fraction
from pathlib import Path

SEED = 20250611
SPLIT_SIZES = {"train": 400, "valid": 50, "test": 50}
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "data" / "weather-json"

INSTRUCTION = "Extract the weather as JSON: "

# Shares of the temperature units in the reports. The other reports mention no temperature,
# and their JSON has "temp_c": null.
CELSIUS_SHARE = 0.45
FAHRENHEIT_SHARE = 0.35

# Share of Celsius readings given to the half degree (12.5 °C). Only these produce rounding
# ties: (F - 32) * 5 / 9 is never exactly x.5 for a whole-degree F.
HALF_DEGREE_SHARE = 0.15

CONDITIONS = ("sunny", "cloudy", "rain", "snow", "fog", "storm", "windy")

# Words for each condition in two grammatical roles, so templates can say "it will be
# {adjective}" or "expect {noun}".
ADJECTIVES = {
    "sunny": ["sunny", "clear", "bright and sunny", "cloudless"],
    "cloudy": ["cloudy", "overcast", "grey", "dull and cloudy"],
    "rain": ["rainy", "wet", "showery", "drizzly"],
    "snow": ["snowy", "wintry and snowy"],
    "fog": ["foggy", "misty", "fogbound"],
    "storm": ["stormy", "thundery"],
    "windy": ["windy", "blustery", "gusty", "breezy"],
}
NOUNS = {
    "sunny": ["sunshine", "clear skies", "blue skies", "plenty of sun", "bright sunshine"],
    "cloudy": ["clouds", "overcast skies", "grey skies", "thick cloud cover", "heavy cloud"],
    "rain": ["rain", "heavy rain", "light rain", "drizzle", "showers", "downpours"],
    "snow": ["snow", "heavy snow", "snowfall", "snow flurries", "light snow"],
    "fog": ["fog", "thick fog", "dense fog", "mist", "patchy fog"],
    "storm": ["thunderstorms", "a thunderstorm", "storms", "thunder and lightning"],
    "windy": ["strong winds", "gusty winds", "gales", "strong gusts", "high winds"],
}

# Plausible Celsius range for each condition, so no report pairs snow with 30 degrees.
CELSIUS_RANGES = {
    "sunny": (8, 38),
    "cloudy": (-5, 26),
    "rain": (2, 24),
    "snow": (-20, 1),
    "fog": (-4, 16),
    "storm": (12, 33),
    "windy": (-8, 22),
}

# Cities by climate, from every inhabited continent. A report's temperature must fit both the
# condition and the city's climate, and snow falls only where it plausibly can.
CITIES_BY_CLIMATE = {
    "tropical": [
        "Lagos", "Accra", "Dakar", "Mumbai", "Bangkok", "Jakarta", "Manila", "Singapore",
        "Hong Kong", "Kuala Lumpur", "Hanoi", "Dubai", "Karachi", "Dhaka", "Havana",
        "Rio de Janeiro", "Caracas", "Brisbane", "Suva", "Honolulu",
    ],
    "mild": [
        "Lisbon", "Cairo", "Casablanca", "Tunis", "Nairobi", "Addis Ababa", "Cape Town",
        "Delhi", "Los Angeles", "Mexico City", "Lima", "Bogotá", "Quito", "São Paulo",
        "Buenos Aires", "Montevideo", "Sydney", "Perth", "Melbourne", "Auckland", "Wellington",
    ],
    "temperate": [
        "Madrid", "Paris", "London", "Berlin", "Rome", "Warsaw", "Vienna", "Athens", "Dublin",
        "Prague", "Istanbul", "Zürich", "Tehran", "Tokyo", "Seoul", "Beijing", "Shanghai",
        "New York", "Chicago", "Toronto", "Vancouver", "Denver", "Santiago",
    ],
    "cold": ["Oslo", "Stockholm", "Reykjavík", "Ulaanbaatar", "Almaty", "Anchorage", "Montreal"],
}
CLIMATE_RANGES = {
    "tropical": (14, 38),
    "mild": (0, 38),
    "temperate": (-10, 36),
    "cold": (-25, 30),
}
SNOWLESS_CLIMATES = ("tropical", "mild")

TIMES = [
    "today", "this morning", "this afternoon", "this evening", "tonight", "tomorrow",
    "tomorrow morning", "later today", "over the weekend", "on Monday", "on Tuesday",
    "on Wednesday", "on Thursday", "on Friday", "on Saturday", "on Sunday",
]

# Slots: {city}, {adjective}, {noun}, {time}, {temp}. A template that starts with a slot is
# capitalized after filling.
TEMPLATES_WITH_TEMP = [
    "Expect {noun} in {city} {time}, around {temp}.",
    "{city} {time}: {noun}, around {temp}.",
    "{time}, {city} will be {adjective} with a high of {temp}.",
    "It will be {adjective} in {city} {time}, with temperatures near {temp}.",
    "Forecast for {city}: {adjective}, {temp}.",
    "{noun} in {city} {time} and about {temp}.",
    "In {city} {time}, expect {noun} and {temp}.",
    "{temp} and {adjective} in {city} {time}.",
    "Temperatures around {temp} in {city} {time}, with {noun}.",
    "{city} can look forward to {noun} {time}, with highs of {temp}.",
    "Right now in {city} it is {temp} and {adjective}.",
    "Current conditions in {city}: {temp}, {adjective}.",
    "{city} weather {time}: {adjective} and {temp}.",
    "We expect {noun} over {city} {time}; the thermometer should read {temp}.",
    "The forecast says {noun} for {city} {time}, at about {temp}.",
    "Look out for {noun} in {city} {time}. Temperatures near {temp}.",
    "{time} in {city}: {noun} and a high of {temp}.",
    "Our {city} station reports {noun} and {temp}.",
    "The high in {city} {time} will be {temp}, and it will be {adjective}.",
    "{adjective} {time} in {city}, around {temp}.",
    "{city} is in for {noun} {time}, with the mercury at {temp}.",
    "Weather update for {city}: {noun} {time}, {temp}.",
    "It is {temp} in {city} with {noun}.",
    "Heads up, {city}: {noun} {time} and temperatures of {temp}.",
    "{city} residents will see {noun} {time}; highs near {temp}.",
    "Mostly {adjective} in {city} {time}, near {temp}.",
    "{city} looks {adjective} {time}, topping out at {temp}.",
]
TEMPLATES_WITHOUT_TEMP = [
    "Expect {noun} in {city} {time}.",
    "It will be {adjective} in {city} {time}.",
    "{city} {time}: {noun}.",
    "{time}, {city} stays {adjective}.",
    "The forecast for {city} calls for {noun} {time}.",
    "There will be {noun} across {city} {time}.",
    "In {city}, {noun} {time}.",
    "Looks {adjective} in {city} {time}.",
    "{noun} expected over {city} {time}.",
    "Our {city} station reports {noun}.",
    "{city} weather: {adjective}.",
    "Pack for {noun} if you visit {city} {time}.",
]


def round_half_away_from_zero(value: Fraction) -> int:
    """Round to the nearest integer, and a tie (x.5) away from zero: 2.5 -> 3, -2.5 -> -3.

    Python's round() sends ties to the even neighbour instead, which is why it is not used.
    """
    magnitude = int(abs(value) + Fraction(1, 2))
    return magnitude if value >= 0 else -magnitude


def fahrenheit_to_celsius(fahrenheit: Fraction) -> int:
    """Convert with C = (F - 32) * 5 / 9 in exact arithmetic, then round half away from zero."""
    return round_half_away_from_zero((fahrenheit - 32) * Fraction(5, 9))


def format_number(value: Fraction) -> str:
    """Write a whole or half-degree reading as "14", "12.5" or "-3"."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.1f}"


def format_temperature(rng: random.Random, value: Fraction, unit: str) -> str:
    """Write a reading in one of the usual styles: "14°C", "14 degrees Celsius", "minus 3 C"."""
    number = format_number(value)
    if value < 0 and rng.random() < 0.3:
        number = "minus " + format_number(-value)

    unit_name = "Celsius" if unit == "C" else "Fahrenheit"
    style = rng.choice(["symbol", "words", "letter"])
    if style == "symbol":
        return f"{number}°{unit}"
    if style == "words":
        return f"{number} degrees {unit_name}"
    return f"{number} {unit}"


def draw_temperature(
    rng: random.Random, condition: str, climate: str
) -> tuple[str | None, int | None]:
    """Draw a reading that fits the condition and climate: the report text and the temp_c."""
    share = rng.random()
    condition_low, condition_high = CELSIUS_RANGES[condition]
    climate_low, climate_high = CLIMATE_RANGES[climate]
    low = max(condition_low, climate_low)
    high = min(condition_high, climate_high)

    if share < CELSIUS_SHARE:
        celsius = Fraction(rng.randint(low, high))
        if rng.random() < HALF_DEGREE_SHARE:
            celsius += Fraction(1, 2)
        return format_temperature(rng, celsius, "C"), round_half_away_from_zero(celsius)

    if share < CELSIUS_SHARE + FAHRENHEIT_SHARE:
        fahrenheit = Fraction(rng.randint(low * 9 // 5 + 32, high * 9 // 5 + 32))
        return format_temperature(rng, fahrenheit, "F"), fahrenheit_to_celsius(fahrenheit)

    return None, None


def capitalize_first(text: str) -> str:
    return text[0].upper() + text[1:]


def make_example(rng: random.Random, condition: str) -> dict:
    """Build one chat example for the condition: the report and its JSON answer."""
    candidates = [
        (city, climate)
        for climate, cities in CITIES_BY_CLIMATE.items()
        if condition != "snow" or climate not in SNOWLESS_CLIMATES
        for city in cities
    ]
    city, climate = rng.choice(candidates)

    temp_text, temp_c = draw_temperature(rng, condition, climate)
    templates = TEMPLATES_WITHOUT_TEMP if temp_text is None else TEMPLATES_WITH_TEMP
    report = rng.choice(templates).format(
        city=city,
        adjective=rng.choice(ADJECTIVES[condition]),
        noun=rng.choice(NOUNS[condition]),
        time=rng.choice(TIMES),
        temp=temp_text,
    )

    # json.dumps keeps dict order, so the keys always come as city, condition, temp_c.
    fields = {"city": city, "condition": condition, "temp_c": temp_c}
    answer = json.dumps(fields, ensure_ascii=False)
    return {
        "messages": [
            {"role": "user", "content": INSTRUCTION + capitalize_first(report)},
            {"role": "assistant", "content": answer},
        ]
    }


def prompt_key(example: dict) -> str:
    """Normalize the user text so prompts that differ only in case or spacing count as one."""
    return " ".join(example["messages"][0]["content"].lower().split())


def generate_splits(seed: int = SEED) -> dict[str, list[dict]]:
    """Generate distinct examples, cycling through the conditions, and split them by prompt."""
    rng = random.Random(seed)
    total = sum(SPLIT_SIZES.values())
    examples = []
    seen = set()

    while len(examples) < total:
        condition = CONDITIONS[len(examples) % len(CONDITIONS)]
        example = make_example(rng, condition)
        key = prompt_key(example)
        if key in seen:
            continue
        seen.add(key)
        examples.append(example)

    # Every prompt is distinct, so slicing the shuffled list keeps each prompt in one split.
    rng.shuffle(examples)
    splits = {}
    start = 0
    for name, size in SPLIT_SIZES.items():
        splits[name] = examples[start : start + size]
        start += size
    return splits


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="Output folder for train.jsonl, valid.jsonl and test.jsonl (default: %(default)s).",
    )
    parser.add_argument(
        "--seed", type=int, default=SEED, help="Random seed (default: %(default)s)."
    )
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in generate_splits(args.seed).items():
        path = args.out / f"{name}.jsonl"
        write_jsonl(path, rows)
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
