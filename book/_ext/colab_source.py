"""Sphinx extension: the Colab button of a run page opens the notebook the run was executed from.

Run pages are generated copies (``book/_generated/runs/<dataset>-<model>-<regime>.ipynb``) that the
repository does not hold; sphinx-book-theme would link Colab to that missing path. This points it at
``notebooks/<regime's notebook>`` instead, whose parameters cell takes the page's model and dataset.
It only swaps the path at the end of the theme's URL: the repository's address and branch in front of it come
from ``_config.yml`` (``repository.url``, ``repository.branch``), the one place they are written.
"""

from __future__ import annotations

from typing import Any

from sphinx.application import Sphinx
from transferstudy.book import GENERATED
from transferstudy.runner import NOTEBOOKS

RUN_PAGES = f"{GENERATED.as_posix()}/runs/"


def _buttons(items: list[dict[str, Any]]):
    for item in items:
        yield item
        yield from _buttons(item.get("buttons", []))


def point_colab_at_source(app: Sphinx, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    if not pagename.startswith(RUN_PAGES):
        return
    regime = pagename.rsplit("-", 1)[-1]
    generated = f"{pagename}.ipynb"
    for button in _buttons(context.get("header_buttons", [])):
        url = button.get("url", "")
        if button.get("text") == "Colab" and regime in NOTEBOOKS and url.endswith(generated):
            button["url"] = url[: -len(generated)] + f"notebooks/{NOTEBOOKS[regime]}"


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("html-page-context", point_colab_at_source, priority=502)  # after the theme's (501)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
