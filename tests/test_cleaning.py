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


def test_several_sentences_keep_the_first():
    assert clean("A bag has two handles. It is often leather. Buy one!") == ("A bag has two handles.", None)


@pytest.mark.parametrize(
    "raw",
    [
        "Here are five features:\n- long sleeves\n- a row of buttons\n2. a pointed collar\n- Long sleeves",
        '["long sleeves", "a row of buttons", "a pointed collar"]',
        '```json\n["long sleeves", "a row of buttons", "a pointed collar"]\n```',
        # what a JSON schema (textadapt.llm.LIST_SCHEMA) asks for, as a grammar writes it
        '{ "items" : [ "long sleeves", "a row of buttons", "a pointed collar" ] }',
        # the same cut short at max_tokens: its complete strings
        '{"items": ["long sleeves", "a row of buttons", "a pointed collar", "a zip with a bra',
    ],
)
def test_list_answers_become_one_item_per_line(raw):
    assert clean(raw, "list") == ("long sleeves\na row of buttons\na pointed collar", None)


def test_list_without_items_is_rejected():
    assert clean("   \n - \n", "list") == (None, "no items")
    assert clean('{"items": []}', "list") == (None, "no items")
    assert clean('{"items": ["lo', "list") == (None, "no items")  # cut before its first item ended


def test_json_questions_get_their_class_slot():
    raw = '{"items": ["What does {} look like in a photo?", "How is the shirt \\"worn\\"?"]}'
    assert clean(raw, "questions", category="shirt") == ('What does {} look like in a photo?\nHow is {} "worn"?', None)


def test_questions_get_a_bare_class_slot():
    raw = (
        "1. What does a {} look like in a photo?\n2. How is the [class] shaped?\n3. Describe the clothing item's collar.\n4. Hi?"
    )
    description, rejected = clean(raw, "questions", category="clothing item")
    assert rejected is None
    assert description.splitlines() == ["What does {} look like in a photo?", "How is {} shaped?", "Describe {}'s collar."]
    assert clean("What is your name?", "questions", category="clothing item") == (None, "no questions with a {} class slot")
