"""Regenerate random_words.txt: the random-text negative control, reproducible from a fixed seed.

    python questions/sources/make_random_words.py > questions/sources/random_words.txt
"""

from engram_eval.bank.controls import random_words

SEED = 20260124

if __name__ == "__main__":
    print(random_words(120, SEED))
