"""A named section of a Markdown file that ``fastattn-bench --markdown PATH`` writes or replaces:
the text between ``<!-- fastattn-bench:NAME -->`` and ``<!-- /fastattn-bench:NAME -->``; the
rest of the file is left as it was."""

from __future__ import annotations

import os
import re

__all__ = ["check_name", "markers", "replace_section", "write_section"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def check_name(name: str) -> str:
    """``name`` if it can name a section (letters, digits, ``_ . + -``), else ValueError."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"bad section name {name!r}: use letters, digits and _ . + -")
    return name


def markers(name: str) -> tuple[str, str]:
    return f"<!-- fastattn-bench:{name} -->", f"<!-- /fastattn-bench:{name} -->"


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with section ``name`` holding ``body``: replaced where its markers are, else
    appended at the end (after a blank line). A start marker without its end is a ValueError."""
    begin, end = markers(check_name(name))
    block = f"{begin}\n{body.strip()}\n{end}"
    i = text.find(begin)
    if i < 0:
        if text.find(end) >= 0:
            raise ValueError(f"section {name!r}: {end} without {begin}")
        if not text:
            return block + "\n"
        return text + ("" if text.endswith("\n") else "\n") + "\n" + block + "\n"
    j = text.find(end, i)
    if j < 0:
        raise ValueError(f"section {name!r}: {begin} without {end}")
    return text[:i] + block + text[j + len(end) :]


def write_section(path: str, name: str, body: str) -> None:
    """Write section ``name`` of the Markdown file ``path`` (created if missing)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    new = replace_section(text, name, body)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new)
    os.replace(tmp, path)
