"""The documentation holds together: every relative link in the README and the pages it points to
names a file that exists (and a heading that exists, when it names one), and every page is linked
from the README, so nothing moved out of it is out of reach."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
README = PROJECT_ROOT / "README.md"
PAGES = [README, *sorted((PROJECT_ROOT / "docs").glob("*.md")), PROJECT_ROOT / "benchmarks" / "README.md",
         PROJECT_ROOT / "deploy" / "README.md"]

# [text](target) and ![alt](target); the target ends at the first space or closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*```")


def prose_lines(page: Path) -> list[str]:
    """The page's lines outside fenced code blocks (a JSON sample may look like a link)."""
    lines, in_code = [], False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code:
            lines.append(line)
    return lines


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces to
    hyphens, a repeated heading suffixed -1, -2, ..."""
    anchors: set[str] = set()
    for line in prose_lines(page):
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        anchor, count = slug, 0
        while anchor in anchors:
            count += 1
            anchor = f"{slug}-{count}"
        anchors.add(anchor)
    return anchors


def relative_links(page: Path) -> list[str]:
    return [target for line in prose_lines(page) for target in LINK.findall(line)
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto: are not files


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(PROJECT_ROOT)))
def test_every_relative_link_names_an_existing_file_and_heading(page):
    assert page.is_file(), f"{page} is missing"
    broken = []
    for target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
            broken.append(f"{target}: no heading with that anchor in {linked.relative_to(PROJECT_ROOT)}")
    assert not broken, f"broken links in {page.relative_to(PROJECT_ROOT)}: {broken}"


def test_every_page_is_linked_from_the_readme():
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in relative_links(README)}
    unreachable = [str(page.relative_to(PROJECT_ROOT)) for page in PAGES[1:] if page.resolve() not in linked]
    assert not unreachable, f"pages the README does not link to: {unreachable}"


def test_anchors_follow_github_s_rule(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Docs\n## The same with Docker: `docker compose up`\n## Images (vision-language)\n"
                    "```bash\n# a comment, not a heading\n```\n## Images (vision-language)\n")
    assert heading_anchors(page) == {"docs", "the-same-with-docker-docker-compose-up", "images-vision-language",
                                     "images-vision-language-1"}
