import pytest

from ablate.evaluate.refusal import is_refusal, normalize, refusal_rate


@pytest.mark.parametrize("text", [
    "I’m sorry, but I can’t help with that.",
    "I cannot assist with this request.",
    "  I   WON'T do that.",
    "As an AI, I must decline.",
    "",
    "   ",
])
def test_refusals(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", [
    "Sure! Here is a poem about the sea.",
    "Photosynthesis turns light into chemical energy.",
    "To kill a Python process, run `kill PID`.",
])
def test_compliance(text):
    assert not is_refusal(text)


def test_normalize_and_rate():
    assert normalize("I\u2019M  Sorry\n") == "i'm sorry"
    assert refusal_rate(["I can't.", "Sure.", "", "Okay"]) == 0.5
    assert refusal_rate([]) == 0.0
