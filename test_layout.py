"""
The layout: each module opens with its contract, scripts import library modules and never each other; and every
test is listed in docs/tests.md under the promise it guards, parity tests apart.
    python3 -m pytest -q test_layout.py
"""
import ast
import glob
import os
import re

from conftest import HERE


LIBRARY = {"model", "dataset", "device", "outdir", "checkpoint", "hf_gpt2", "configurator"}
SCRIPTS = {"train", "sample", "export", "plot", "bench", "bench_fsdp"}


def test_every_module_states_its_contract_and_imports_no_script():
    """Every Python file but the tests (conftest.py included) and the config files opens with a docstring that
    states its contract; scripts import library modules, never each other, and library modules never import a
    script."""
    files = [f for f in glob.glob(os.path.join(HERE, "**", "*.py"), recursive=True)
             if not os.path.basename(f).startswith("test_") and os.path.basename(f) != "conftest.py"]
    assert {os.path.basename(f)[:-3] for f in files} >= LIBRARY | SCRIPTS
    for path in files:
        name, text = os.path.relpath(path, HERE), open(path, encoding="utf-8").read()
        if name.startswith("config" + os.sep):
            continue
        tree = ast.parse(text)
        assert ast.get_docstring(tree), f"{name} opens with no docstring"
        imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not imported & (SCRIPTS - {name[:-3]}), f"{name} imports a script: {imported & SCRIPTS}"


def test_every_test_is_listed_in_docs_tests_md_under_a_promise():
    """docs/tests.md lists every test of every test file once, as file::name under the promise it guards, and none
    that is gone; its parity section lists exactly the tests marked parity; the README's links into it each land on
    a heading. No training: the test files are parsed, not run."""
    tests, parity = set(), set()
    for path in glob.glob(os.path.join(HERE, "test_*.py")):
        for node in ast.parse(open(path, encoding="utf-8").read()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                tests.add(f"{os.path.basename(path)}::{node.name}")
                if "pytest.mark.parity" in map(ast.unparse, node.decorator_list):
                    parity.add(f"{os.path.basename(path)}::{node.name}")
    with open(os.path.join(HERE, "docs", "tests.md"), encoding="utf-8") as f:
        text = f.read()
    entry = r"^- `(test_\w+\.py::test_\w+)`"
    listed = re.findall(entry, text, re.M)
    assert len(set(listed)) == len(listed), f"listed twice: {sorted({t for t in listed if listed.count(t) > 1})}"
    assert not tests - set(listed), f"not in docs/tests.md: {sorted(tests - set(listed))}"
    assert not set(listed) - tests, f"in docs/tests.md, but no such test: {sorted(set(listed) - tests)}"
    parity_section = text.partition("\n## Parity")[2]
    assert set(re.findall(entry, parity_section, re.M)) == parity, "the parity section lists other tests than parity's"
    # GitHub's anchor for a heading: lower case, punctuation other than - and _ dropped, each space a -
    anchors = {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
               for heading in re.findall(r"^#+ (.*?)\s*$", text, re.M)}
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        links = re.findall(r"docs/tests\.md#([\w-]+)", f.read())
    assert links and not set(links) - anchors, f"README links to no heading of docs/tests.md: {set(links) - anchors}"
