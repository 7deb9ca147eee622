"""MkDocs hooks (`hooks:` in mkdocs.yml): the two reference pages generated from the code, so
that they cannot drift from it.

- `reference/cli.md`: every `meterline` command and subcommand, from the argparse parser the
  command runs (`aggregator.cli._parser`): help, usage, and each option with its default.
- `reference/api.md`: every operation and schema of the OpenAPI document that `GET
  /openapi.json` serves, built from the routes of `build_app` as the server builds it. The
  routes are made, never called, so stand-ins take the place of the store and the rest: no
  data dir, no server.

Each page holds a marker line that the hook replaces; a page without its marker fails the
build rather than ship without its reference."""

from __future__ import annotations

import argparse
import copy
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.pages import Page

CLI_MARKER = "<!-- generated: the meterline command's reference -->"
API_MARKER = "<!-- generated: the HTTP API's reference -->"


def on_page_markdown(markdown: str, /, *, page: Page, **_: Any) -> str:
    generated: dict[str, tuple[str, Callable[[], str]]] = {
        "reference/cli.md": (CLI_MARKER, cli_reference),
        "reference/api.md": (API_MARKER, api_reference),
    }
    if page.file.src_uri not in generated:
        return markdown
    marker, generate = generated[page.file.src_uri]
    if marker not in markdown:
        raise PluginError(f"{page.file.src_uri} lost its marker line: {marker}")
    return markdown.replace(marker, generate())


# Markdown text ------------------------------------------------------------------------------

_CODE = re.compile(r"(`+)(.+?)\1", re.DOTALL)
_SPECIAL = re.compile(r"([\\*_{}\[\]>|#`])")


def text(value: str) -> str:
    """`value` as Markdown that shows it as written: code spans kept, every other character
    Markdown (or attr_list's `{…}`) would read escaped, `<` and `&` as entities."""
    found, at = [], 0
    for span in _CODE.finditer(value):
        found += [_escaped(value[at : span.start()]), span.group(0)]
        at = span.end()
    return "".join([*found, _escaped(value[at:])])


def _escaped(value: str) -> str:
    value = value.replace("&", "&amp;").replace("<", "&lt;")
    return _SPECIAL.sub(r"\\\1", value)


def cell(value: str) -> str:
    """`value` in a table cell: on one line (tables' own escapes: `|` outside code)."""
    return text(" ".join(value.split()))


def paragraphs(value: str) -> str:
    """A docstring-like description: its lines joined, its blank lines kept."""
    return "\n\n".join(text(" ".join(p.split())) for p in re.split(r"\n\s*\n", value.strip()))


def code(value: object) -> str:
    shown = str(value)
    return f"`` {shown} ``" if "`" in shown else f"`{shown}`"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def sentence(value: str) -> str:
    """Help starts in lower case; a sentence of its own starts with a capital (unless its first
    word is a name, as `security.protocol` or `metadata[key]=value`)."""
    first = value.split(" ", 1)[0].rstrip(",:;")
    return value[:1].upper() + value[1:] if first.isalpha() and first.islower() else value


def full_stop(value: str) -> str:
    return value if value.endswith((".", "!", "?")) else value + "."


# The command line ---------------------------------------------------------------------------


def cli_reference() -> str:
    from aggregator import cli

    parser = cli._parser()
    return "\n\n".join(_command(parser, ["meterline"], 1)) + "\n"


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str, Any]]:
    """(name, help, parser) of each subcommand, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield choice.dest, choice.help or "", action.choices[choice.dest]


def _anchor(words: list[str]) -> str:
    return "-".join(words)


def _command(parser: argparse.ArgumentParser, words: list[str], level: int) -> Iterator[str]:
    if level > 1:  # the page's title stands for `meterline` itself
        yield f"{'#' * level} {' '.join(words)} {{#{_anchor(words)}}}"
    if parser.description:
        yield text(full_stop(sentence(parser.description)))
    yield f"```text\n{_usage(parser, words)}\n```"
    subcommands = list(_subcommands(parser))
    if subcommands:
        rows = [
            [f"[`{sub}`](#{_anchor([*words, sub])})", cell(help_)] for sub, help_, _ in subcommands
        ]
        yield table(["Command", "What it does"], rows)
    formatter = parser._get_formatter()
    for group in parser._action_groups:
        actions = [
            a
            for a in group._group_actions
            if a.help != argparse.SUPPRESS
            and not isinstance(a, argparse._SubParsersAction | argparse._HelpAction)
        ]
        if not actions:
            continue
        title = {"positional arguments": "arguments", "options": "options"}.get(
            group.title or "", f"options: {group.title}"
        )
        yield f"**{text(sentence(title))}**"
        yield table(
            ["Argument" if title == "arguments" else "Option", "Meaning"],
            [[code(_invocation(formatter, a)), _meaning(formatter, a)] for a in actions],
        )
    if parser.epilog:
        yield text(parser.epilog)
    for sub, _, subparser in subcommands:
        yield from _command(subparser, [*words, sub], level + 1)


def _invocation(formatter: argparse.HelpFormatter, action: argparse.Action) -> str:
    """How an argument is written: `--port PORT`, `METER_ID ...`; choices are listed in the
    meaning, so the placeholder is the argument's name."""
    if action.choices is not None and action.metavar is None:
        action = copy.copy(action)
        action.metavar = action.dest.upper()
    if action.option_strings:
        return formatter._format_action_invocation(action)
    return formatter._format_args(action, action.metavar or action.dest.upper())


def _meaning(formatter: argparse.HelpFormatter, action: argparse.Action) -> str:
    said = formatter._expand_help(action) if action.help else ""
    if action.choices is not None:
        said = full_stop(said) + " One of " + ", ".join(str(c) for c in action.choices) + "."
    return ("required; " if action.required and action.option_strings else "") + cell(said)


def _usage(parser: argparse.ArgumentParser, words: list[str]) -> str:
    """A short usage line: what must be given, then `[options]` for the rest."""
    formatter = parser._get_formatter()
    required, optional, positional = [], [], []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._SubParsersAction):
            positional.append("COMMAND ...")
        elif not action.option_strings:
            positional.append(_invocation(formatter, action))
        elif action.required:
            required.append(_invocation(formatter, action).split(", ")[-1])
        else:
            optional = ["[options]"]
    return " ".join([*words, *required, *optional, *positional])


# The HTTP API -------------------------------------------------------------------------------


def api_reference() -> str:
    return _Api(openapi()).render()


def openapi() -> dict[str, Any]:
    """The document `GET /openapi.json` answers with, from the routes of `build_app`."""
    from unittest import mock

    from aggregator.api import openapi_routes
    from aggregator.api.openapi_document import openapi_document
    from aggregator.commands.common import version
    from aggregator.core_app import build_app
    from aggregator.settings import CoreSettings

    absent = mock.NonCallableMagicMock()  # the store, tokens, publisher and backfiller
    app = build_app(absent, absent, absent, absent, CoreSettings())
    return openapi_document(
        app.routes,
        title=openapi_routes.TITLE,
        version=version(),
        description=openapi_routes.DESCRIPTION,
    )


_SCHEMA_REF = "#/components/schemas/"
_RESPONSE_REF = "#/components/responses/"
_GENERIC = re.compile(r"^([A-Za-z]+)_([A-Za-z]\w*)_$")


class _Api:
    def __init__(self, document: dict[str, Any]) -> None:
        self.doc = document
        self.schemas: dict[str, Any] = document["components"]["schemas"]
        self.errors: dict[str, Any] = document["components"]["responses"]
        self.schemes: dict[str, Any] = document["components"]["securitySchemes"]

    def render(self) -> str:
        operations = [
            (path, method, op)
            for path, item in self.doc["paths"].items()
            for method, op in item.items()
        ]
        tags = [tag["name"] for tag in self.doc["tags"]]
        info = self.doc["info"]
        out = [
            text(info["description"]),
            f"meterline {code(info['version'])}, OpenAPI {code(self.doc['openapi'])}:"
            f" {len(operations)} operations in {len(tags)} groups.",
            table(
                ["Group", "Operations"],
                [
                    [
                        f"[{_tag_title(tag)}](#tag-{tag})",
                        ", ".join(
                            f"[{code(m.upper() + ' ' + p)}](#{op['operationId']})"
                            for p, m, op in operations
                            if op["tags"][0] == tag
                        ),
                    ]
                    for tag in tags
                ],
            ),
            "## Authentication {#authentication}",
            "Every operation says which bearer token it takes, in an `Authorization: Bearer"
            " <token>` header:",
            table(
                ["Token", "What it is"],
                [[code(name), cell(s["description"])] for name, s in self.schemes.items()],
            ),
        ]
        for tag in tags:
            out.append(f"## {_tag_title(tag)} {{#tag-{tag}}}")
            for path, method, op in operations:
                if op["tags"][0] == tag:
                    out += self._operation(path, method, op)
        out += self._errors()
        out += self._schemas()
        return "\n\n".join(out) + "\n"

    def _operation(self, path: str, method: str, op: dict[str, Any]) -> list[str]:
        out = [
            f"### `{method.upper()} {path}` {{#{op['operationId']}}}",
            f"**{text(op['summary'])}.** {text(op.get('description', ''))}".strip(),
            f"Token: {self._security(op['security'])}.",
        ]
        parameters = op.get("parameters", [])
        if parameters:
            out.append(
                table(
                    ["Parameter", "In", "Type", "Meaning"],
                    [
                        [
                            code(p["name"]),
                            p["in"],
                            self.type_of(p["schema"], quoted=False),
                            self._parameter_meaning(p),
                        ]
                        for p in parameters
                    ],
                )
            )
        body = op.get("requestBody")
        if body is not None:
            kinds = [
                f"{self.type_of(media['schema'])} ({code(kind)})"
                for kind, media in body["content"].items()
            ]
            out.append("Request body: " + ", or ".join(kinds) + ".")
        rows = []
        for status, response in op["responses"].items():
            if "$ref" in response:
                name = response["$ref"].removeprefix(_RESPONSE_REF)
                meaning = f"[{name}](#error-{_slug(name)})"
                response = self.errors[name]
            else:
                meaning = cell(response["description"])
            rows.append([code(status), meaning, self._content(response)])
        out.append(table(["Status", "Meaning", "Body"], rows))
        return out

    def _security(self, requirements: list[dict[str, list[str]]]) -> str:
        if not requirements:
            return "none"
        names = [
            " and ".join(f"[{code(n)}](#authentication)" for n in r) or "none" for r in requirements
        ]
        return " or ".join(names)

    def _parameter_meaning(self, parameter: dict[str, Any]) -> str:
        schema = parameter["schema"]
        parts = []
        if parameter.get("required"):
            parts.append("Required.")
        said = parameter.get("description") or schema.get("description")
        if said:
            parts.append(cell(full_stop(sentence(said))))
        if schema.get("type") == "array" and parameter["in"] == "query":
            parts.append("Repeat the parameter for several values.")
        if "default" in schema:
            default = schema["default"]
            shown = default if isinstance(default, list) else [default]
            parts.append("Default: " + ", ".join(code(_query_value(v)) for v in shown) + ".")
        parts += self._limits(schema)
        return " ".join(parts)

    def _content(self, response: dict[str, Any]) -> str:
        found = [
            self.type_of(media["schema"])
            + ("" if kind == "application/json" else f" ({code(kind)})")
            for kind, media in response.get("content", {}).items()
        ]
        if "Retry-After" in response.get("headers", {}):
            found.append("header `Retry-After`")
        return ", ".join(found) or "none"

    def _errors(self) -> list[str]:
        out = [
            "## Error responses {#errors}",
            "The error responses that operations share. Each operation's table lists those it"
            " can answer.",
        ]
        # A table cell takes no attr_list id: each error's anchor is an element of its own.
        rows = [
            [
                f'<span id="error-{_slug(name)}"></span>{name}',
                cell(e["description"]),
                self._content(e),
            ]
            for name, e in self.errors.items()
        ]
        out.append(table(["Error", "Meaning", "Body"], rows))
        return out

    def _schemas(self) -> list[str]:
        out = [
            "## Schemas {#schemas}",
            "Request bodies as the server validates them, responses as it builds them.",
        ]
        for name, schema in self.schemas.items():
            out.append(f"### {text(_schema_title(name))} {{#schema-{_slug(name)}}}")
            if schema.get("description"):
                out.append(paragraphs(schema["description"]))
            if schema.get("additionalProperties") is False:
                out.append("A field it does not list is refused.")
            properties = schema.get("properties")
            if properties is None:
                out.append("Type: " + self.type_of(schema) + ".")
                continue
            required = set(schema.get("required", ()))
            rows = [
                [
                    code(field),
                    self.type_of(value),
                    "yes" if field in required else "no",
                    self._field_meaning(value),
                ]
                for field, value in properties.items()
            ]
            out.append(table(["Field", "Type", "Required", "Meaning"], rows))
        return out

    def _field_meaning(self, schema: dict[str, Any]) -> str:
        parts = []
        if schema.get("description"):
            parts.append(cell(full_stop(schema["description"].strip())))
        if schema.get("default") is not None:
            parts.append(f"Default: {code(json.dumps(schema['default']))}.")
        parts += self._limits(schema)
        return " ".join(parts)

    def _limits(self, schema: dict[str, Any]) -> list[str]:
        """The constraints of a schema, or of each branch of a union that has some."""
        found = []
        for branch in [schema, *schema.get("anyOf", ()), *schema.get("oneOf", ())]:
            limits = []
            if "minLength" in branch or "maxLength" in branch:
                limits.append(_range("length", branch.get("minLength"), branch.get("maxLength")))
            if "minItems" in branch or "maxItems" in branch:
                limits.append(_range("items", branch.get("minItems"), branch.get("maxItems")))
            if "maxProperties" in branch:
                limits.append(f"at most {branch['maxProperties']} keys")
            names = branch.get("propertyNames", {})
            if names:
                limits.append(_range("key length", names.get("minLength"), names.get("maxLength")))
            if "minimum" in branch or "maximum" in branch:
                limits.append(_range("value", branch.get("minimum"), branch.get("maximum")))
            if "exclusiveMinimum" in branch:
                limits.append(f"above {branch['exclusiveMinimum']}")
            if "pattern" in branch:
                limits.append(f"matches {code(branch['pattern'])}")
            if limits:
                found.append(sentence(", ".join(limits)) + ".")
        return found

    def type_of(self, schema: dict[str, Any], *, quoted: bool = True) -> str:
        """A schema's type in a few words: `string`, array of [X](#schema-x), `"a"` or `"b"`
        (in a query string, values are not quoted: `a` or `b`)."""

        def value(v: object) -> str:
            return code(json.dumps(v) if quoted else _query_value(v))

        if "$ref" in schema:
            name = schema["$ref"].removeprefix(_SCHEMA_REF)
            return f"[{text(_schema_title(name))}](#schema-{_slug(name)})"
        if "const" in schema:
            return value(schema["const"])
        if "enum" in schema:
            return " or ".join(value(v) for v in schema["enum"])
        branches = schema.get("anyOf") or schema.get("oneOf")
        if branches:
            kinds = [self.type_of(b, quoted=quoted) for b in branches]
            return " or ".join(dict.fromkeys(kinds))
        kind = schema.get("type")
        if isinstance(kind, list):
            return " or ".join(code(k) for k in kind)
        if kind == "array":
            items = schema.get("items")
            return "array" if not items else f"array of {self._part(items, quoted)}"
        if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
            return f"object of {self._part(schema['additionalProperties'], quoted)}"
        if kind is None:
            return "any"
        return code(kind) + (f" ({schema['format']})" if "format" in schema else "")

    def _part(self, schema: dict[str, Any], quoted: bool) -> str:
        """The type of an array's items or an object's values: a union in parentheses."""
        found = self.type_of(schema, quoted=quoted)
        return f"({found})" if " or " in found else found


def _query_value(value: object) -> str:
    """A value as a query string writes it: `name`, not `"name"`."""
    return value if isinstance(value, str) else json.dumps(value)


def _range(what: str, low: object, high: object) -> str:
    if low is not None and high is not None:
        return f"{what} {low} to {high}"
    return f"{what} at least {low}" if low is not None else f"{what} at most {high}"


def _tag_title(tag: str) -> str:
    return sentence(tag.replace("-", " "))


def _schema_title(name: str) -> str:
    """A schema's name as a reader knows it: `ListResource[MeterShape]` for pydantic's
    `ListResource_MeterShape_`, `EventShape (aggregator.api.event_shapes)` where two
    modules have one name."""
    generic = _GENERIC.match(name)
    if generic:
        return f"{generic.group(1)}[{generic.group(2)}]"
    if "__" in name:
        *module, short = name.split("__")
        return f"{short} ({'.'.join(module)})"
    return name


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
