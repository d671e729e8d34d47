"""The configuration reference (``docs/config_reference.md``), generated from the schema itself:
every key with its type, default, allowed values and the comment written beside it in
``schema.py``, so the page cannot drift from the code (a test regenerates and compares it).

    python -m attribution.config.reference > docs/config_reference.md
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from attribution.config import generator_schema, schema
from attribution.config.schema import Config


def _comments() -> dict[tuple[str, str], str]:
    """(class, field) -> the comment on the field's line, after the comment lines just above."""
    out = {}
    for module in (schema, generator_schema):
        out.update(_module_comments(Path(module.__file__).read_text()))
    return out


def _module_comments(src: str) -> dict[tuple[str, str], str]:
    lines = src.splitlines()
    out = {}
    for node in ast.parse(src).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not isinstance(item, ast.AnnAssign) or not isinstance(item.target, ast.Name):
                continue
            above, i = [], item.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#"):
                above.insert(0, lines[i].strip().lstrip("#").strip())
                i -= 1
            own = lines[item.end_lineno - 1].split("  # ", 1)
            text = " ".join(above + ([own[1].strip()] if len(own) == 2 else []))
            out[(node.name, item.target.id)] = text
    return out


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _allowed(f: dataclasses.Field) -> str:
    rule = f.metadata.get("rule")
    if rule is None:
        return ""
    parts = []
    if rule.choices is not None:
        parts.append(" \\| ".join(str(c) for c in rule.choices))
    for name, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
        if getattr(rule, name) is not None:
            parts.append(f"{sym} {getattr(rule, name):g}")
    if rule.nonempty:
        parts.append("non-empty")
    return ", ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference_markdown() -> str:
    """The whole reference page, one table per config section."""
    notes = _comments()
    out = ["# Configuration reference", "",
           "Generated from `attribution/config/schema.py` by "
           "`python -m attribution.config.reference` (a test checks it is current). Set any key "
           "in an experiment file or as `key=value` on the command line; "
           "[configuration](configuration.md) explains the layering.", ""]

    def section(cls: type, prefix: str) -> None:
        rows, nested = [], []
        for f in dataclasses.fields(cls):
            default = _default(f)
            if dataclasses.is_dataclass(default):
                nested.append((type(default), f"{prefix}{f.name}."))
                continue
            if isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
                nested.append((type(default[0]), f"{prefix}{f.name}[i]."))
            rows.append(f"| `{prefix}{f.name}` | `{_cell(str(f.type))}` | `{_cell(repr(default))}` "
                        f"| {_allowed(f)} | {_cell(notes.get((cls.__name__, f.name), ''))} |")
        title = prefix.rstrip(".") or "top level"
        doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        if rows:
            out.extend([f"## {title}", ""] + ([doc, ""] if doc and not
                                                doc.startswith(cls.__name__ + "(") else [])
                       + ["| key | type | default | allowed | what it does |",
                          "|---|---|---|---|---|", *rows, ""])
        for sub_cls, sub_prefix in nested:
            section(sub_cls, sub_prefix)

    section(Config, "")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
