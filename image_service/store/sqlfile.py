"""Named queries with named parameters, read from the `.sql` files of `image_service/sql/`.

A file holds blocks that start with `-- name: NAME`; a block's SQL refers to its parameters as
`:param` and is rewritten to asyncpg's `$1, $2 ...` once, at import. Calls then pass keyword
arguments, checked against the names the SQL uses, so a query and its callers cannot drift
apart silently by position.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

# What may hold a colon that is not a parameter: a string literal (plain, or E'...' with
# backslash escapes), a dollar-quoted string, a quoted identifier, a comment (line or block), a
# cast (`::type`). Then a parameter, which never follows a name, a number or a closing bracket
# (that is an array slice, `a[1:n]`).
_TOKEN = re.compile(
    r"[Ee]'(?:[^'\\]|\\.|'')*'"
    r"|'(?:[^']|'')*'"
    r"|(\$[A-Za-z_]*\$).*?\1"
    r'|"(?:[^"]|"")*"'
    r"|--[^\n]*|/\*.*?\*/|::"
    r"|(?<![\w\]\)]):([A-Za-z_][A-Za-z0-9_]*)",
    re.DOTALL,
)


@dataclass(frozen=True, slots=True)
class Query:
    name: str
    sql: str  # with $1, $2 ...
    params: tuple[str, ...]  # the parameter bound to $1, $2 ...

    def args(self, values: Mapping[str, Any]) -> list[Any]:
        if len(values) != len(self.params) or not all(p in values for p in self.params):
            raise TypeError(
                f"query {self.name} takes {', '.join(self.params) or 'no parameters'}; "
                f"got {', '.join(sorted(values)) or 'none'}"
            )
        return [values[p] for p in self.params]


def compile_query(name: str, text: str) -> Query:
    params: list[str] = []

    def replace(match: re.Match[str]) -> str:
        param = match.group(2)
        if param is None:
            return match.group(0)
        if param not in params:
            params.append(param)
        return f"${params.index(param) + 1}"

    return Query(name, _TOKEN.sub(replace, text).strip(), tuple(params))


def parse_queries(text: str) -> dict[str, Query]:
    queries: dict[str, Query] = {}
    for block in re.split(r"^-- name: ", text, flags=re.MULTILINE)[1:]:
        name, _, body = block.partition("\n")
        name = name.strip()
        if name in queries:
            raise ValueError(f"query {name} is defined twice")
        queries[name] = compile_query(name, body)
    return queries


def load_queries(filename: str) -> dict[str, Query]:
    text = resources.files("image_service").joinpath("sql", filename).read_text()
    return parse_queries(text)
