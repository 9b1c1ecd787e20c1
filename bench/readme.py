"""Rewrite README.md's performance section, between the bench markers (appended if missing)."""
from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def section(table: str, machine: dict, command: str, when: str) -> str:
    m = machine
    return "\n".join([
        START,
        f"Measured by `{command}` on {when}: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, "
        f"Python {m['python']}, Envoy {m['envoy']}, nginx {m['nginx']} (protomesh {m['protomesh_commit']}). "
        "Loopback only; the proxy is pinned to one core, load generator and upstream to the other. "
        "Medians of the repeats; `bench/README.md` says how each figure is measured, and "
        "`bench/results/latest.json` has every run.",
        "",
        "```",
        table.rstrip(),
        "```",
        "",
        "![protomesh relative to Envoy and to direct](bench/results/latest.png)",
        END,
    ])


def rewrite(text: str, new_section: str) -> str:
    if START in text and END in text:
        head, _, rest = text.partition(START)
        _, _, tail = rest.partition(END)
        return head + new_section + tail
    return text.rstrip("\n") + "\n\n## Performance\n\n" + new_section + "\n"


def update(new_section: str, path: Path = README) -> None:
    path.write_text(rewrite(path.read_text(), new_section))
