"""Every relative link of README.md and docs/*.md points to a file of the repository, and every
``#anchor`` to a heading of its target page (GitHub's heading ids)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"""<(?:img|a)\b[^>]*?\b(?:src|href)\s*=\s*["']([^"']+)["']""", re.I)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def heading_id(title: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"`|\*", "", title).strip().lower()  # code and emphasis marks (underscores stay)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link keeps its text
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def page_anchors(path: Path) -> set:
    ids, seen = set(), {}
    for title in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = heading_id(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        ids.add(base if n == 0 else f"{base}-{n}")
    return ids


def relative_links(path: Path):
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    for target in MARKDOWN_LINK.findall(text) + HTML_LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
            continue
        yield target


def test_heading_id_follows_github():
    assert heading_id("With Detectron2") == "with-detectron2"
    assert heading_id("The command line (torchvision front-end)") == "the-command-line-torchvision-front-end"
    assert heading_id("The project's keys") == "the-projects-keys"
    assert heading_id("`MODEL.ASSIGNER` and **TopK**") == "modelassigner-and-topk"
    assert heading_id("Limitations and deviations from the papers") == "limitations-and-deviations-from-the-papers"
    assert heading_id("The output folder (`OUTPUT_DIR`)") == "the-output-folder-output_dir"


def test_link_extraction_skips_code_and_urls(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "[a](docs/a.md) ![f](docs/f.png) [u](https://x.org/y) `[c](code.md)`\n"
        "```\n[fenced](fenced.md)\n```\n"
        '<img src="docs/i.png" width="10"> [s](#sec)\n',
        encoding="utf-8",
    )
    assert sorted(relative_links(page)) == ["#sec", "docs/a.md", "docs/f.png", "docs/i.png"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
            continue
        if anchor and dest.suffix == ".md" and anchor not in page_anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"broken links in {page.relative_to(ROOT)}:\n" + "\n".join(broken)
