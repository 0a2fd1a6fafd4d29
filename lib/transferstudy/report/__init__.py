"""Reporting: the results store read into one object, tables with intervals, sentences chosen by the data.

The book's results chapters are MyST notebooks that start with ``store = report.load()`` and compute
everything they show from it (``tables``, ``stats``, ``projections``); this module adds the few pieces
of prose that follow the numbers.
"""

from __future__ import annotations

from .store import (DATASET_LABELS, LADDER, MODEL_LABELS, REGIME_LABELS, Run, Store, StoreError, collect, load,
                    read_run, write_table)

__all__ = ["DATASET_LABELS", "LADDER", "MODEL_LABELS", "REGIME_LABELS", "Run", "Store", "StoreError", "banner",
           "collect", "count_sentence", "expectation_sentence", "glue_figure", "glue_text", "load", "markdown", "protocol_sentence",
           "read_run",
           "write_table"]


def markdown(text: str):
    """``text`` as a MyST output of a cell (rendered as the page's own markup)."""
    from IPython.display import Markdown

    return Markdown(text)


def glue_figure(name: str, fig) -> None:
    """Glue ``fig`` under ``name`` for a ``{glue:figure}`` directive, and close it so the cell does not show it too."""
    import matplotlib.pyplot as plt
    from myst_nb import glue

    glue(name, fig, display=False)
    plt.close(fig)


def glue_text(name: str, text: str) -> None:
    """Glue a sentence or number (as plain text: markup characters dropped) for ``{glue:text}``."""
    from myst_nb import glue

    glue(name, str(text).replace("*", "").replace("`", ""), display=False)


def banner(store: Store):
    """The provenance notice at the top of a results page: initialisation, profile, device, what finished."""
    return markdown(store.banner())


def count_sentence(tally: dict[str, int], b: str, a: str, what: str) -> str:
    """'Of the 4 regimes where both finished, DeiT-Base is ahead beyond chance in 2, behind in 0 and
    indistinguishable from AlexNet in 2.' (``tally`` from ``tables.tally``; ``what``: 'regimes', 'steps' ...)"""
    if tally["n"] == 0:
        return f"No {what} have finished on both sides yet, so there is nothing to compare."
    if tally["n"] == 1:
        only = ("ahead of" if tally["b_ahead"] else "behind" if tally["a_ahead"] else "indistinguishable from")
        return f"In the one {what.rstrip('s')} where both finished, {b} is {only} {a}."
    return (f"Of the {tally['n']} {what} where both finished, {b} is ahead of {a} beyond chance in "
            f"{tally['b_ahead']}, behind in {tally['a_ahead']} and indistinguishable in {tally['same']}.")


def expectation_sentence(tally: dict[str, int], expected: str) -> str:
    """Whether this build's comparisons bear out what the literature leads us to expect (``expected``:
    'b_ahead' or 'a_ahead'), said as the counts have it."""
    if tally["n"] == 0:
        return "This build has no finished pair to check that against yet."
    agree, against = tally[expected], tally["a_ahead" if expected == "b_ahead" else "b_ahead"]
    if agree == tally["n"]:
        return f"This build's runs agree: all {tally['n']} differences go that way beyond chance."
    if against > agree:
        return (f"This build's runs do not bear it out: {against} of {tally['n']} differences go the other way "
                f"beyond chance, {agree} the expected way.")
    if agree == 0:
        return (f"This build's runs neither confirm nor contradict it: none of the {tally['n']} differences "
                f"exceeds chance in the expected direction{' and ' + str(against) + ' go the other way' if against else ''}.")
    return (f"This build's runs agree in part: {agree} of {tally['n']} differences go the expected way beyond "
            f"chance, {against} the other way, {tally['same']} are indistinguishable.")


ORIGINAL_FERPLUS_TEST = 7099  # the Kaggle copy's test folder: FERPlus Valid + Test, argmax labels


def protocol_sentence(protocol) -> str:
    """Whether this build's FERPlus runs used the original study's test protocol (``tables.protocol``'s frame):
    argmax labels on the Kaggle copy's test folder of 7,099 images."""
    fer = protocol[protocol["dataset"] == "ferplus"]
    like = fer[(fer["label_rule"] == "argmax") & (fer["n_test"] == ORIGINAL_FERPLUS_TEST)]
    if fer.empty:
        return "No FERPlus run has finished, so there is nothing to check."
    if len(like) == len(fer):
        return (f"All {len(fer)} finished FERPlus runs used the original's protocol (argmax labels, "
                f"{ORIGINAL_FERPLUS_TEST:,} test images): their numbers are comparable.")
    rules = ", ".join(sorted(set(fer["label_rule"])))
    sizes = ", ".join(f"{n:,}" for n in sorted(set(fer["n_test"])))
    return (f"{len(fer) - len(like)} of the {len(fer)} finished FERPlus runs did not use the original's protocol "
            f"(label rule {rules}; test sets of {sizes} images, against argmax on {ORIGINAL_FERPLUS_TEST:,}): "
            f"their numbers are not like for like with the reported ones.")
