"""Generic control texts: seeded random words, and an irrelevant passage (bundled banks and `bank import` use them)."""

from __future__ import annotations

import random

WORDS = """
apple river table window garden pencil cloud mountain letter button candle bridge orange silver whistle
ladder carpet island forest kettle marble engine harbor lantern mirror needle pillow rocket saddle tunnel
violin wagon yellow zipper basket camera desert feather glacier hammer jacket lemon meadow notebook oyster
parrot quarry ribbon shovel teapot umbrella valley walnut anchor blanket cactus dolphin eagle fountain
giraffe helmet igloo jungle koala lobster magnet napkin octopus pepper quilt raccoon sandal trumpet unicorn
velvet walrus yogurt acorn barrel chimney domino envelope falcon goblet hedgehog iceberg jigsaw kayak
""".split()

IRRELEVANT_TEXT = (
    "The spectral sequence of stars is O B A F G K M, from hot blue stars to cool red stars. Each class is divided into ten "
    "subclasses. The Sun is a G2 star, with a surface temperature of about 5,800 kelvin. Hot O and B stars are rare and short-lived; "
    "cool M dwarfs are the most common stars in the galaxy."
)


def random_words(count: int, seed: int) -> str:
    """count words drawn with replacement from WORDS, reproducibly from seed: a text with no topic at all."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(count))
