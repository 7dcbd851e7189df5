"""Regenerate random_words.txt: the random-text negative control, reproducible from a fixed seed.

    python questions/sources/make_random_words.py > questions/sources/random_words.txt
"""

import random

SEED = 20260124
WORDS = """
apple river table window garden pencil cloud mountain letter button candle bridge orange silver whistle
ladder carpet island forest kettle marble engine harbor lantern mirror needle pillow rocket saddle tunnel
violin wagon yellow zipper basket camera desert feather glacier hammer jacket lemon meadow notebook oyster
parrot quarry ribbon shovel teapot umbrella valley walnut anchor blanket cactus dolphin eagle fountain
giraffe helmet igloo jungle koala lobster magnet napkin octopus pepper quilt raccoon sandal trumpet unicorn
velvet walrus yogurt acorn barrel chimney domino envelope falcon goblet hedgehog iceberg jigsaw kayak
""".split()


def random_words(count: int = 120, seed: int = SEED) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(count)) + "\n"


if __name__ == "__main__":
    print(random_words(), end="")
