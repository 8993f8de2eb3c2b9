"""What the page offers the user of the model in force: a default prompt, example prompts, and the model's words.

The built-in demo model (longsana/demo) was trained on the captions of procedural clips, so it draws only what
those captions say (colored circles, squares, triangles and stars, their motion, the background, a camera pan)
and its text encoder knows only their words: the page lists them and marks a prompt's other words. Its examples
are captions it draws well (tests/test_server_page.py measures its videos of them). Other models take free text:
no vocabulary, general examples.
"""

from __future__ import annotations

DEMO_MODEL = "demo"  # the built-in model's name (longsana/assets/demo)
DEMO_EXAMPLES = (
    "a red circle moving left on a blue background",
    "two yellow squares bouncing",
    "three white stars spinning on a striped purple background",
    "a green triangle moving up on a black background",
    "a blue circle bouncing on a yellow background",
)
GENERAL_EXAMPLES = (
    "A red fox trotting through fresh snow in a pine forest at dawn, soft golden light, cinematic",
    "An owl gliding over a moonlit lake, mist on the water, slow tracking shot",
    "A busy night market in the rain, neon signs reflected in puddles, handheld camera",
    "Waves rolling onto a black sand beach at sunset, aerial view",
)


def prompt_guide(model_name: str) -> dict:
    """{default_prompt, examples, vocabulary}: vocabulary is the sorted list of the words the model knows, or
    None where it takes any text."""
    if model_name != DEMO_MODEL:
        return {"default_prompt": GENERAL_EXAMPLES[0], "examples": list(GENERAL_EXAMPLES), "vocabulary": None}
    from longsana.demo.clips import caption_words

    words = [w for w in caption_words() if w.isalpha()]  # the tokenizer's punctuation is no word to offer
    return {"default_prompt": DEMO_EXAMPLES[0], "examples": list(DEMO_EXAMPLES), "vocabulary": words}
