"""The documentation: every relative link in the repository's markdown files reaches a file, and every
#anchor a heading of that file (GitHub's heading ids)."""

import os
import re

import deploylib as d

SKIP = {"target", ".git", "node_modules"}


def markdown_files():
    for top, dirs, files in os.walk(d.ROOT):
        dirs[:] = sorted(x for x in dirs if x not in SKIP and not x.startswith("."))
        for f in sorted(files):
            if f.endswith(".md"):
                yield os.path.join(top, f)


def without_code(text):
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # fenced blocks
    return re.sub(r"`[^`\n]*`", "", text)                       # inline code


def slug(heading):
    s = heading.strip().lower().replace("`", "")
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(path):
    seen, out = {}, set()
    text = re.sub(r"^```.*?^```", "", open(path).read(), flags=re.M | re.S)
    for m in re.finditer(r"^#{1,6} (.+)$", text, re.M):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else "%s-%d" % (s, n))
    return out


def test_markdown_relative_links_and_anchors_resolve():
    errors, checked = [], 0
    for path in markdown_files():
        rel = os.path.relpath(path, d.ROOT)
        for m in re.finditer(r"\]\(([^)\s]+)\)", without_code(open(path).read())):
            link = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
                continue
            checked += 1
            target, _, fragment = link.partition("#")
            target_path = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
            if not os.path.exists(target_path):
                errors.append("%s: %s: no such file" % (rel, link))
            elif fragment and target_path.endswith(".md") and fragment not in anchors(target_path):
                errors.append("%s: %s: no heading with that anchor" % (rel, link))
    assert checked > 50, "only %d links found: is the link pattern still right?" % checked
    assert not errors, "\n".join(errors)
