"""Writes a generated section into a Markdown file between its markers
<!-- TAG --> and <!-- /TAG --> (appended when the file has none), the way
tools/few_labels.sh and tools/esvit_results.sh update docs/RESULTS.md and
tools/results.sh keeps those sections."""


def replace_section(doc, tag, section):
    try:
        old = open(doc).read()
    except OSError:
        old = ""
    start, end = "<!-- %s -->" % tag, "<!-- /%s -->" % tag
    a, b = old.find(start), old.find(end)
    if a >= 0 and b > a:
        new = old[:a] + section + old[b + len(end):].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + section
    with open(doc, "w") as fh:
        fh.write(new)
