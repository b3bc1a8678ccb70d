"""What labelers are told "best" means, per task: the text at the top of the labeling page.

The paper's labelers got short task instructions with examples (sentiment: the most positive and happy
continuation; descriptiveness: the most vividly descriptive one; summarization: the summary that best conveys what
matters in the article or post). These paraphrase them; `collect` stores the chosen one in the store's meta
(`meta["instructions"]`: key, title, paragraphs), so a store keeps the instructions its labels were given under.
"""
from __future__ import annotations

_PICK = ("Read the text, then every response. Press the number of the best response (1 to {n}), or tap it. "
         "Press s to skip a comparison you cannot judge at all, u to take back your last answer.")
_IGNORE_TRUNCATION = ("Responses may stop in the middle of a sentence: that is expected, do not count it against "
                      "them.")

INSTRUCTIONS = {
    "sentiment": {
        "title": "Choose the most positive and happy continuation",
        "paragraphs": [
            "You see the start of a passage from a book, followed by several ways it could continue.",
            "Choose the continuation that is the most positive and happy. Judge the continuation in the context "
            "of the passage: a cheerful reply to a sad sentence counts as positive.",
            "Judge only the sentiment, not grammar, style or whether the continuation makes sense. If none is "
            "positive, choose the least negative one.",
            _IGNORE_TRUNCATION,
        ],
    },
    "descriptiveness": {
        "title": "Choose the most vividly descriptive continuation",
        "paragraphs": [
            "You see the start of a passage from a book, followed by several ways it could continue.",
            "Choose the continuation that describes most vividly what can be seen, heard, felt, smelled or "
            "tasted: physical details of people, places and things. Dialogue, abstract thought and plot summary "
            "count for little.",
            "Judge only how descriptive the continuation is, not whether it is happy or sad, or whether it is "
            "grammatical. If none describes anything, choose the one closest to doing so.",
            _IGNORE_TRUNCATION,
        ],
    },
    "cnndm": {
        "title": "Choose the best summary of the news article",
        "paragraphs": [
            "You see a news article, followed by several short summaries of it.",
            "Choose the summary that best tells a reader who has not read the article what it is about: the "
            "most important facts, stated accurately. A summary that says something the article does not is "
            "worse than one that leaves a detail out.",
            "Prefer a summary that is clear and to the point; do not penalize one for copying sentences from the "
            "article if they are the right sentences. If all are bad, choose the least bad.",
        ],
    },
    "tldr": {
        "title": "Choose the best summary (TL;DR) of the post",
        "paragraphs": [
            "You see a post from Reddit, followed by several short summaries of it, as its author might write "
            "after \"TL;DR:\".",
            "Choose the summary that best conveys the post's main point (for a question or request for advice: "
            "the situation and what is asked), stated accurately. A summary that says something the post does "
            "not is worse than one that leaves a detail out.",
            "Prefer a summary that is clear and to the point. If all are bad, choose the least bad.",
        ],
    },
    "generic": {
        "title": "Choose the best response",
        "paragraphs": [
            "You see a query (the start of a text), followed by several responses that continue it.",
            "Choose the response that is best for the task this round was collected for, as the person who set "
            "up the labeling has described it to you. If none is clearly better, choose the one you would rather "
            "keep.",
        ],
    },
}
# The tiny `test` experiment: random letters from a random model, for trying the tools out.
INSTRUCTIONS["test"] = {
    "title": "Choose any response (the test task)",
    "paragraphs": [
        "This is the tiny test task: the text and the responses are random letters from a random model.",
        "Choose any response; the labels only show that collecting, labeling, exporting and training work.",
    ],
}


def instructions_key(experiment: str, query_dataset: str) -> str:
    """Which instructions an experiment's labelers get: its own (`cnndm_offline_60k` counts as `cnndm`), else
    those of its dataset's summarization task (cnndm, tldr), else the generic ones."""
    for key in (experiment, experiment.split("_")[0]):
        if key in INSTRUCTIONS and key != "generic":
            return key
    return query_dataset if query_dataset in ("cnndm", "tldr") else "generic"


def instructions_for(experiment: str, query_dataset: str, num_responses: int) -> dict:
    """The instructions stored in a new store's meta: {key, title, paragraphs}, ending with how to pick."""
    key = instructions_key(experiment, query_dataset)
    text = INSTRUCTIONS[key]
    return {"key": key, "title": text["title"],
            "paragraphs": [*text["paragraphs"], _PICK.format(n=num_responses)]}
