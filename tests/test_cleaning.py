import pytest

from textadapt.cleaning import clean


@pytest.mark.parametrize(
    "raw, expected",
    [
        ('  "A sandal has open straps and a flat sole."  ', ("A sandal has open straps and a flat sole.", None)),
        ("1. A bag with two handles and a zip.", ("A bag with two handles and a zip.", None)),
        ("**A coat** with long sleeves and buttons.", ("A coat with long sleeves and buttons.", None)),
        ("Caption: a pair of trousers on black.", ("a pair of trousers on black.", None)),
        ("", (None, "empty")),
        ("1.", (None, "empty")),
        ("   ", (None, "empty")),
        (None, (None, "no answer")),
        ("I'm sorry, but I cannot describe that.", (None, "refusal")),
        ("As an AI, I do not see images.", (None, "refusal")),
        ("Trousers.", (None, "too short")),
    ],
)
def test_clean(raw, expected):
    assert clean(raw) == expected
