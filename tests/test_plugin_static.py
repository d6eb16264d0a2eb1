"""The tab's frontend files: no copied facts, every module reachable, served and packaged.

Facts about statistics, rules and severities live in Python (`tbdiag.contract.statistics`,
`tbdiag.rules`) and reach the tab through the ``/rules`` route.  A table of
them in the JavaScript would drift from the Python one, silently, so these
tests read the static files as source: no statistic or rule name may appear as
a string, an object key or a property, and no severity name as a key or a
whole string.
"""

from __future__ import annotations

import configparser
import fnmatch
import os
import re

import pytest

from tb_plugin import diagnostics_plugin
from tbdiag import rules
from tbdiag.contract import schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATIC = os.path.join(ROOT, "tb_plugin", "static")
JS_FILES = sorted(f for f in os.listdir(STATIC) if f.endswith(".js"))

STAT_AND_RULE_NAMES = set(schema.COLUMNS) | {r.name for r in rules.RULES} | set(rules.ISSUES)
SEVERITY_NAMES = set(rules.SEVERITIES)
IDENT = r"[A-Za-z_$][\w$]*"


def split_js(src: str) -> tuple[str, list[str]]:
    """JavaScript source as (code without comments, every string literal's text, template literals included).

    String literals become ``"S"`` in the code, and the code inside a template
    literal's ``${...}`` stays code.  Enough of a tokenizer for this frontend
    (it uses no regular expression literals).
    """
    code: list[str] = []
    strings: list[str] = []
    i, n = 0, len(src)
    braces: list[int] = []  # open-brace depth of each template expression we are inside

    def read_quoted(i: int, quote: str) -> int:
        j, text = i + 1, []
        while src[j] != quote:
            if src[j] == "\\":
                j += 1
            text.append(src[j])
            j += 1
        strings.append("".join(text))
        code.append('"S"')
        return j + 1

    def read_template(i: int) -> int:
        j, text = i + 1, []
        while True:
            c = src[j]
            if c == "\\":
                text.append(src[j + 1])
                j += 2
            elif c == "`":
                strings.append("".join(text))
                code.append('"S"')
                return j + 1
            elif src.startswith("${", j):
                strings.append("".join(text))
                text = []
                code.append('"S"+(')
                braces.append(0)
                return j + 2  # back to code; the matching "}" resumes the template
            else:
                text.append(c)
                j += 1

    while i < n:
        if src.startswith("//", i):
            i = src.find("\n", i) if "\n" in src[i:] else n
        elif src.startswith("/*", i):
            i = src.index("*/", i) + 2
        elif src[i] in "'\"":
            i = read_quoted(i, src[i])
        elif src[i] == "`":
            i = read_template(i)
        elif src[i] == "{" and braces:
            braces[-1] += 1
            code.append("{")
            i += 1
        elif src[i] == "}" and braces and braces[-1] == 0:
            braces.pop()
            code.append(")+")
            i = read_template(i)  # the rest of the template after ${...}
        else:
            if src[i] == "}" and braces:
                braces[-1] -= 1
            code.append(src[i])
            i += 1
    return "".join(code), strings


def copied_facts(src: str) -> list[str]:
    """Statistic, rule and severity names the source uses as data rather than reading them from /rules."""
    code, strings = split_js(src)
    found = []
    keys = re.findall(rf"[{{,]\s*({IDENT})\s*:", code)
    props = re.findall(rf"\.\s*({IDENT})", code)
    for name in STAT_AND_RULE_NAMES:
        word = re.compile(rf"(?<![\w$]){re.escape(name)}(?![\w$])")
        found += [f"string {s!r}" for s in strings if word.search(s)]
        found += [f"key {k}" for k in keys if k == name]
        found += [f"property .{p}" for p in props if p == name]
    for name in SEVERITY_NAMES:
        found += [f"severity string {s!r}" for s in strings if s.strip() == name]
        found += [f"severity key {k}" for k in keys if k == name]
    return sorted(set(found))


def test_the_checker_catches_the_tables_it_is_for():
    old = """
      const SEVERITY_RANK = {info: 0, warning: 1, error: 2};
      const ISSUE_STAT = {dead_relu: 'dead_frac', 'vanishing_gradient': "grad_rms"};
      const SHORT = {grad_rms: `grad RMS`};  // a comment may say dead_frac
      const x = row.stats.act_std + f(`${a ? 'changed' : b}`);
      if (severity === 'info') {}
    """
    found = copied_facts(old)
    for fact in ("severity key info", "severity key error", "key dead_relu", "string 'dead_frac'",
                 "string 'vanishing_gradient'", "string 'grad_rms'", "key grad_rms", "property .act_std",
                 "string 'changed'", "severity string 'info'"):
        assert fact in found, (fact, found)
    assert not [f for f in found if "comment" in f]
    clean = "const cls = `sev-${f.severity}`; el('p', {class: 'load-error', text: body.error}); let nonfinite = 0;"
    assert copied_facts(clean) == []


@pytest.mark.parametrize("name", JS_FILES)
def test_frontend_keeps_no_copy_of_statistics_rules_or_severities(name):
    with open(os.path.join(STATIC, name), encoding="utf-8") as f:
        assert copied_facts(f.read()) == [], f"{name} repeats facts the /rules route serves"


def test_stylesheet_names_no_statistic_or_rule():
    with open(os.path.join(STATIC, "style.css"), encoding="utf-8") as f:
        css = f.read()
    assert [n for n in STAT_AND_RULE_NAMES if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", css)] == []


def _imports(name: str) -> list[str]:
    """The modules a static file imports (static ``import ... from '...'`` statements at the top level)."""
    with open(os.path.join(STATIC, name), encoding="utf-8") as f:
        return re.findall(r"^import\s[^;]*?\bfrom\s+['\"]([^'\"]+)['\"]", f.read(), re.M)


def test_every_module_is_imported_relatively_served_and_reached_from_the_entry():
    served = diagnostics_plugin.static_files()
    assert set(served) == {f"/{f}" for f in os.listdir(STATIC)}
    reached, todo = set(), ["index.js"]
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        for target in _imports(name):
            assert target.startswith("./") and target.endswith(".js"), (name, target)
            assert f"/{target[2:]}" in served, f"{name} imports {target}, which the plugin does not serve"
            todo.append(target[2:])
    assert reached == set(JS_FILES), f"modules no one imports: {set(JS_FILES) - reached}"
    assert all(mime == "text/javascript" for route, (_, mime) in served.items() if route.endswith(".js"))


def test_package_data_ships_every_static_file():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    patterns = [p.strip() for p in cfg["options.package_data"]["tb_plugin"].split(",")]
    for name in os.listdir(STATIC):
        assert any(fnmatch.fnmatch(f"static/{name}", p) for p in patterns), name
