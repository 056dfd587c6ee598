"""The code blocks of the README and the docs pages, as the docs tests read them (docs are code:
every command and config snippet runs).

A page's fenced blocks are found by their language:

- `toml`: a twinhub config file, loaded with `flows.config.load_settings` (a block with a
  `[project.entry-points...]` table is a package's pyproject.toml: its twinhub entry points are
  checked);
- `bash` (or `console`, `sh`, `shell`; a leading `$ ` is dropped): one command per line, `#`
  comments and `\\` continuations allowed. `twinhub ...` runs in the docs sandbox; `make TARGET`
  is dry-run (`make -n`) in the project; for `.venv/bin/python SCRIPT`, the script must exist and
  declare the options given (benchmarks take minutes);
- `sql`: run with `twinhub sql` in the sandbox;
- `python`: run by this virtualenv's Python in the sandbox.

Other languages are text to read. A marker comment right before a fence changes what happens:

    <!-- snippet: skip: REASON -->        not run; the reason is reported
    <!-- snippet: file PATH -->           the block is a file: written to PATH in the sandbox
    <!-- snippet: fails: TEXT -->         the block must fail, saying TEXT

Generated pages (docs/reference/) are checked against their generator instead, not read here.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
GENERATED = DOCS / "reference"
SHELL = frozenset({"bash", "console", "sh", "shell"})
RUN = SHELL | {"toml", "sql", "python"}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(?P<action>skip|file|fails)\b:?\s*(?P<arg>.*?)\s*-->\s*$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
REDIRECTIONS = frozenset({">", ">>", "<", "|", "2>", "&>", "&&", ";"})

Action = Literal["skip", "file", "fails"]


@dataclass(frozen=True, kw_only=True)
class Marker:
    action: Action
    arg: str


@dataclass(frozen=True, kw_only=True)
class Block:
    page: Path
    line: int
    """The line of the opening fence (1-based)."""
    lang: str
    text: str
    marker: Marker | None

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        """Whether the tests run it (or write it, as a file), rather than leave it to be read."""
        return self.lang in RUN or (self.marker is not None and self.marker.action == "file")

    @property
    def skip_reason(self) -> str | None:
        return self.marker.arg if self.marker and self.marker.action == "skip" else None

    @property
    def failure(self) -> str | None:
        """What the block must say when it fails, if it is meant to."""
        return self.marker.arg if self.marker and self.marker.action == "fails" else None


def pages() -> list[Path]:
    """The README, then the hand-written docs pages in path order."""
    written = sorted(p for p in DOCS.rglob("*.md") if GENERATED not in p.parents)
    return [ROOT / "README.md", *written]


def blocks(page: Path) -> list[Block]:
    """Every fenced block of `page`, in order, with the marker before it (if any)."""
    found: list[Block] = []
    lines = page.read_text().splitlines()
    marker: Marker | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := MARKER.match(line):
            marker = Marker(action=m["action"], arg=m["arg"])  # type: ignore[arg-type]
            i += 1
            continue
        if m := FENCE.match(line):
            indent, fence = len(m["indent"]), m["fence"]
            body: list[str] = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence):
                body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i].lstrip())
                i += 1
            text = "\n".join(body) + "\n"
            found.append(Block(page=page, line=i - len(body), lang=m["lang"], text=text, marker=marker))
        elif line.strip() and marker is not None:
            raise ValueError(
                f"{page.relative_to(ROOT)}:{i + 1}: a snippet marker must come right before a fence"
            )
        if line.strip():
            marker = None
        i += 1
    return found


def all_blocks() -> list[Block]:
    return [block for page in pages() for block in blocks(page)]


def commands(block: Block) -> list[str]:
    """The command lines of a shell block: `$ ` prompts dropped, continuations joined, and
    blank or comment-only lines left out."""
    logical: list[str] = []
    pending = ""
    for raw in block.text.splitlines():
        line = raw.removeprefix("$ ") if block.lang == "console" or raw.startswith("$ ") else raw
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.strip() and not line.strip().startswith("#"):
            logical.append(line.strip())
    return logical


def words(command: str) -> list[str]:
    """The program and its arguments: environment assignments before it dropped, and nothing
    from the first redirection or pipe on."""
    out: list[str] = []
    for word in shlex.split(command, comments=True):
        if word in REDIRECTIONS:
            break
        if not out and ENV_ASSIGNMENT.match(word):
            continue
        out.append(word)
    return out


def program(command: str) -> Literal["twinhub", "make", "script"]:
    """Which of the three kinds of command a line is; anything else the runner does not know."""
    first = (words(command) or [""])[0]
    if first in ("twinhub", ".venv/bin/twinhub"):
        return "twinhub"
    if first == "make":
        return "make"
    if first in (".venv/bin/python", "python") and len(words(command)) > 1:
        return "script"
    raise ValueError(
        f"{command!r}: the docs tests run only `twinhub`, `make` and `.venv/bin/python SCRIPT` lines; "
        "use one of them or mark the block `<!-- snippet: skip: REASON -->`"
    )


def subcommand(argv: list[str]) -> list[str]:
    """`twinhub [--config X] [-v] a b ...` -> [a, b, ...]: the command path and its arguments."""
    rest = argv[1:]
    while rest and rest[0].startswith("-"):
        rest = rest[2:] if rest[0] == "--config" else rest[1:]
    return rest
