import random

from engram_eval.bank.controls import WORDS, random_words


def test_random_words_are_drawn_from_the_word_list_reproducibly_from_the_seed():
    rng = random.Random(7)
    expected = " ".join(rng.choice(WORDS) for _ in range(50))
    assert random_words(50, 7) == expected == random_words(50, 7)
    assert random_words(50, 8) != expected
