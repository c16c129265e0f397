"""The documentation cannot drift: the flag reference is generated from the parser, the two READMEs say
the same thing, their links lead somewhere, and no figure in them is typed by hand."""
import os
import re
import sys

import pytest

from conftest import ROOT

READMES = ["README.md", "README_zh.md"]
# Numbers the READMEs may state although no file of the repository holds them, and where they come from.
SOURCED_ELSEWHERE = {
    "3": "3-5 photos of the subject: the DreamBooth paper and the seed README",
    "5": "3-5 photos of the subject: the DreamBooth paper and the seed README",
    "24": "24 GB of GPU memory with --gradient_checkpointing: the seed README's hardware guidance",
}


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def test_the_flag_reference_is_generated_from_the_parser_and_up_to_date():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import flag_reference
    import train_dreambooth

    assert read("docs/flags.md") == flag_reference.render(), \
        "docs/flags.md is stale: run python tools/flag_reference.py"
    actions = [a for a in train_dreambooth.build_parser()._actions if a.option_strings and a.dest != "help"]
    text = read("docs/flags.md")
    for action in actions:  # every flag and alias, with its default
        row = [line for line in text.splitlines() if line.startswith(f"| `{action.option_strings[0]}`")]
        assert len(row) == 1, action.option_strings
        assert all(f"`{flag}`" in row[0] for flag in action.option_strings), row
        if action.default not in (None, False, True):
            assert f"`{action.default}`" in row[0], (row, action.default)


def test_the_flag_reference_follows_a_changed_parser():
    """render() reads the parser it is given: a new flag appears, a changed default shows."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import flag_reference
    import train_dreambooth

    parser = train_dreambooth.build_parser()
    parser._action_groups[-1].add_argument("--brand_new_flag", type=int, default=7, help="Something new.")
    assert "| `--brand_new_flag` | `7` | Something new. |" in flag_reference.render(parser)
    assert flag_reference.render(parser) != read("docs/flags.md")


def code_blocks(text):
    return re.findall(r"^```\w*\n.*?^```$", text, re.S | re.M)


def prose(text):
    """The text outside code blocks, inline code, link targets and HTML comments."""
    text = re.sub(r"^```\w*\n.*?^```$", "", text, flags=re.S | re.M)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"`[^`]*`", "", text)
    text = re.sub(r"\]\([^)\s]*\)", "]", text)
    return re.sub(r"[a-z]+://\S+", "", text)


def links(text):
    return [target.split("#")[0] for target in re.findall(r"\]\(([^)\s]+)\)", text)
            if not re.match(r"[a-z]+://", target) and not target.startswith("#")]


def test_english_and_chinese_readmes_have_the_same_commands_sections_and_links():
    en, zh = read("README.md"), read("README_zh.md")
    assert code_blocks(en) == code_blocks(zh), "the code blocks differ: the READMEs must show the same commands"
    markers = lambda text: re.findall(r"<!--.*?-->", text, re.S)  # noqa: E731
    assert markers(en) == markers(zh), "the test markers and the places kept for merged text must match"
    headings = lambda text: [len(h) for h in re.findall(r"^(#+) ", prose(text), re.M)]  # noqa: E731
    assert headings(en) == headings(zh), "the section structure differs"
    # the Chinese README links to the Chinese version of a document where there is one
    assert [t for t in links(en) if t != "README_zh.md"] == \
        [t.replace("_zh.md", ".md") for t in links(zh) if t != "README.md"]


DOCUMENTS = READMES + sorted(os.path.join(folder, name) for folder in ("docs", "bench")
                             for name in os.listdir(os.path.join(ROOT, folder)) if name.endswith(".md"))


@pytest.mark.parametrize("document", DOCUMENTS)
def test_links_lead_to_files_of_the_repository(document):
    folder = os.path.dirname(os.path.join(ROOT, document))
    missing = [t for t in links(read(document)) if not os.path.exists(os.path.join(folder, t))]
    assert not missing, f"{document} links to {missing}"


@pytest.mark.parametrize("readme", READMES)
def test_readme_is_short(readme):
    assert len(read(readme).splitlines()) <= 400


def numbers(text):
    return set(re.findall(r"(?<![\w.])\d+(?:\.\d+)*", text))


@pytest.mark.parametrize("readme", READMES)
def test_no_figure_in_the_readme_is_typed_by_hand(readme):
    """A number in the README's prose must be one the repository's scripts, pins or generated flag
    reference hold, or appear in the README's own commands (which tests/test_readme.py runs).
    Timings, test counts and measurements belong in generated files under bench/ and docs/."""
    text = read(readme)
    sources = "\n".join([read("run_single.sh"), read("run_multi.sh"), read("requirements.txt"), read("docs/flags.md"),
                         *code_blocks(text)])
    allowed = numbers(sources) | set(SOURCED_ELSEWHERE)
    # version-like names: "SD 1.x", "2.x", "SD3", "v1-4", "60k": identifiers, not figures
    typed = numbers(re.sub(r"\b\d+\.x\b|\b[A-Za-z]+[-_]?\d+[\w.-]*|\b\d+k\b", "", prose(text))) - allowed
    assert not typed, f"{readme} states {sorted(typed)}, which no generated or tested file holds"
