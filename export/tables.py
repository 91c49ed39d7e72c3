"""The one Markdown table renderer of the reports (export, parity, benchmarks, ARM)."""
from __future__ import annotations


def markdown_table(header: list[str], rows: list[list], align: str | None = None) -> list[str]:
    """Lines of a GitHub Markdown table. `align` has one letter per column: l (default), r or c."""
    marks = {"l": "---", "r": "--:", "c": ":-:"}
    align = align or "l" * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines
