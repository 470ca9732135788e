"""Every relative link of README.md and docs/*.md resolves: the file (or folder) exists, and an anchor
names a heading of the page it points to, as GitHub makes anchors from headings."""
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`+[^`\n]*`+")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _prose(text):
    """``text`` without its code blocks and code spans, where brackets are code, not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading):
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped (letters, digits,
    ``_`` and ``-`` kept, in any script), spaces made ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "").lower()
    kept = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(page):
    """The anchors of ``page``'s headings; a repeated heading gets ``-1``, ``-2``, ... as on GitHub."""
    seen = {}
    result = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def relative_links(page):
    """``(target, anchor)`` of every link of ``page`` that is not to a web address."""
    links = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        links.append((path, anchor))
    return links


def test_the_slugs_are_githubs():
    assert slug("What `strict=False` loses") == "what-strictfalse-loses"
    assert slug("Modes and API") == "modes-and-api"
    assert slug("CmBN to BatchNorm: end_window, then revert") == "cmbn-to-batchnorm-end_window-then-revert"
    assert slug("Install (2 cores, no GPU)") == "install-2-cores-no-gpu"


def test_the_pages_link_to_one_another():
    readme_links = {path for path, _ in relative_links(ROOT / "README.md")}
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme_links, f"the README's map does not link docs/{page.name}"


@pytest.mark.parametrize("page", PAGES, ids=[page.relative_to(ROOT).as_posix() for page in PAGES])
def test_every_relative_link_resolves(page):
    broken = []
    for path, anchor in relative_links(page):
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{path}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{path}#{anchor}: no such heading in {target.relative_to(ROOT)}")
        elif anchor and target.suffix != ".md":
            broken.append(f"{path}#{anchor}: an anchor into a file that is not a page")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)
