"""A renderer of the subset of Go's text/template that Ollama's Modelfile TEMPLATEs use.

Enough to render a chat TEMPLATE the way Ollama does, so that quantkit can check a translated
template against the checkpoint's own Jinja template before it ships it: actions ``{{ ... }}``
with ``{{-``/``-}}`` trimming; ``if`` / ``else if`` / ``else`` / ``end``; ``range`` over a list
(``range .Messages``, ``range $i, $m := .Messages``); variables (``$x := ...``, ``$x = ...``,
``$`` the root); fields (``.Role``, ``$.System``, ``$m.Content``); string and integer literals;
the functions ``eq ne and or not len index slice``; parenthesised calls. Anything else is a
TemplateError (never a guess).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["TemplateError", "render"]


class TemplateError(ValueError):
    pass


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)


@dataclass
class _Node:
    kind: str  # text, expr, if, range, assign
    arg: Any = None
    body: list | None = None
    orelse: list | None = None  # else branch (a list holding one nested if for "else if")
    names: tuple[str, ...] = ()


def _tokens(source: str) -> list[tuple[str, str]]:
    """("text", s) and ("action", s) pieces, with the trim markers applied to the text around."""
    out: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(source):
        text = source[pos : m.start()]
        if m.group(1):  # {{- trims the whitespace before
            text = text.rstrip(" \t\r\n")
        out.append(("text", text))
        out.append(("action", m.group(2).strip()))
        pos = m.end()
        if m.group(3):  # -}} trims the whitespace after
            while pos < len(source) and source[pos] in " \t\r\n":
                pos += 1
    out.append(("text", source[pos:]))
    return [t for t in out if t != ("text", "")]


def _parse(tokens: list[tuple[str, str]], i: int, stop: tuple[str, ...]) -> tuple[list[_Node], int, str]:
    nodes: list[_Node] = []
    while i < len(tokens):
        kind, value = tokens[i]
        i += 1
        if kind == "text":
            nodes.append(_Node("text", value))
            continue
        word = value.split(None, 1)[0] if value else ""
        if word in stop or value.startswith("else"):
            if value.startswith("else") and "else" not in stop:
                raise TemplateError(f"unexpected {{{{{value}}}}}")
            return nodes, i, value
        if word == "if":
            node, i = _parse_if(value[2:].strip(), tokens, i)
            nodes.append(node)
        elif word == "range":
            spec = value[5:].strip()
            names: tuple[str, ...] = ()
            if ":=" in spec:
                left, spec = spec.split(":=", 1)
                names = tuple(n.strip() for n in left.split(","))
            body, i, end = _parse(tokens, i, ("end", "else"))
            if end != "end":
                raise TemplateError("range ... else is not supported")
            nodes.append(_Node("range", spec.strip(), body, names=names))
        elif re.match(r"^\$\w*\s*:?=", value):
            name, op, expr = re.match(r"^(\$\w*)\s*(:?=)\s*(.*)$", value, re.S).groups()
            nodes.append(_Node("assign", expr, names=(name, op)))
        elif word in ("end", "else", "block", "define", "template", "with"):
            raise TemplateError(f"{{{{{value}}}}} is not supported")
        else:
            nodes.append(_Node("expr", value))
    if stop:
        raise TemplateError(f"missing {{{{end}}}} (expected one of {stop})")
    return nodes, i, ""


def _parse_if(condition: str, tokens, i) -> tuple[_Node, int]:
    """An if node (its else-if chain nested in ``orelse``) and the position after its {{end}}."""
    body, i, end = _parse(tokens, i, ("end", "else"))
    node = _Node("if", condition, body)
    if end.startswith("else"):
        rest = end[4:].strip()
        if rest and not rest.startswith("if "):
            raise TemplateError(f"{{{{{end}}}}} is not supported")
        if rest.startswith("if "):
            nested, i = _parse_if(rest[3:].strip(), tokens, i)
            node.orelse = [nested]
        else:
            node.orelse, i, end = _parse(tokens, i, ("end",))
            if end != "end":
                raise TemplateError("missing {{end}} after {{else}}")
    return node, i


# -- expressions -----------------------------------------------------------------------------------
_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|`[^`]*`|-?\d+|\$\w*(?:\.\w+)*|\.\w+(?:\.\w+)*|\.|\w+)')


def _lex(expr: str) -> list[str]:
    pos, out = 0, []
    while pos < len(expr):
        if expr[pos:].strip() == "":
            break
        m = _TOKEN.match(expr, pos)
        if not m:
            raise TemplateError(f"cannot read {expr[pos:]!r}")
        out.append(m.group(1))
        pos = m.end()
    return out


def _truth(value: Any) -> bool:
    return bool(value) if not isinstance(value, (int, float)) or isinstance(value, bool) else value != 0


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        if name not in obj:
            raise TemplateError(f"no field {name}")
        return obj[name]
    raise TemplateError(f"field {name} of a {type(obj).__name__}")


_FUNCS = {
    "eq": lambda a, *b: any(a == x for x in b),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truth(a),
    "len": lambda a: len(a),
    "index": lambda a, *keys: _index(a, keys),
    "slice": lambda a, *ix: a[ix[0] : (ix[1] if len(ix) > 1 else None)] if ix else a,
}


def _index(a: Any, keys) -> Any:
    for k in keys:
        try:
            a = a[k]
        except (IndexError, KeyError, TypeError) as exc:
            raise TemplateError(f"index {k!r}: {exc}") from exc
    return a


class _Eval:
    def __init__(self, root: dict, scopes: list[dict[str, Any]]):
        self.root, self.scopes = root, scopes

    def var(self, name: str) -> Any:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        raise TemplateError(f"undefined variable {name}")

    def value(self, token: str, dot: Any) -> Any:
        if token.startswith('"'):
            import json

            try:  # Go's interpreted string literals escape as JSON's do for what templates use
                return json.loads(token)
            except ValueError as exc:
                raise TemplateError(f"cannot read the string {token}") from exc
        if token.startswith("`"):
            return token[1:-1]
        if re.fullmatch(r"-?\d+", token):
            return int(token)
        if token in ("true", "false"):
            return token == "true"
        if token == ".":
            return dot
        if token.startswith("$"):
            head, *fields = token.split(".")
            obj = self.root if head == "$" else self.var(head)
        elif token.startswith("."):
            obj, fields = dot, token[1:].split(".")
        else:
            raise TemplateError(f"unknown word {token!r}")
        for f in fields:
            obj = _field(obj, f)
        return obj

    def expr(self, tokens: list[str], dot: Any) -> Any:
        value, rest = self._call(tokens, dot)
        if rest:
            raise TemplateError(f"unexpected {' '.join(rest)!r}")
        return value

    def _operand(self, tokens: list[str], dot: Any) -> tuple[Any, list[str]]:
        if tokens[0] == "(":
            inner, rest = self._call(tokens[1:], dot)
            if not rest or rest[0] != ")":
                raise TemplateError("missing )")
            return inner, rest[1:]
        return self.value(tokens[0], dot), tokens[1:]

    def _call(self, tokens: list[str], dot: Any) -> tuple[Any, list[str]]:
        if not tokens:
            raise TemplateError("empty expression")
        head = tokens[0]
        if head in _FUNCS or head in ("and", "or"):
            args, rest = [], tokens[1:]
            while rest and rest[0] != ")":
                arg, rest = self._operand(rest, dot)
                args.append(arg)
            if head == "and":
                result = next((a for a in args if not _truth(a)), args[-1] if args else True)
            elif head == "or":
                result = next((a for a in args if _truth(a)), args[-1] if args else False)
            else:
                try:
                    result = _FUNCS[head](*args)
                except TypeError as exc:
                    raise TemplateError(f"{head}: {exc}") from exc
            return result, rest
        return self._operand(tokens, dot)


def _run(nodes: list[_Node], ev: _Eval, dot: Any, out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.arg)
        elif node.kind == "expr":
            value = ev.expr(_lex(node.arg), dot)
            out.append("" if value is None else str(value).lower() if isinstance(value, bool) else str(value))
        elif node.kind == "assign":
            name, op = node.names
            value = ev.expr(_lex(node.arg), dot)
            if op == ":=":
                ev.scopes[-1][name] = value
            else:
                scope = next((s for s in reversed(ev.scopes) if name in s), None)
                if scope is None:
                    raise TemplateError(f"assignment to undeclared {name}")
                scope[name] = value
        elif node.kind == "if":
            ev.scopes.append({})
            try:
                if _truth(ev.expr(_lex(node.arg), dot)):
                    _run(node.body, ev, dot, out)
                elif node.orelse:
                    _run(node.orelse, ev, dot, out)
            finally:
                ev.scopes.pop()
        elif node.kind == "range":
            items = ev.expr(_lex(node.arg), dot)
            if not isinstance(items, (list, tuple)):
                raise TemplateError("range over a non-list")
            for i, item in enumerate(items):
                scope: dict[str, Any] = {}
                if len(node.names) == 1:
                    scope[node.names[0]] = item
                elif len(node.names) == 2:
                    scope[node.names[0]], scope[node.names[1]] = i, item
                ev.scopes.append(scope)
                try:
                    _run(node.body, ev, item, out)
                finally:
                    ev.scopes.pop()


def render(template: str, data: dict[str, Any]) -> str:
    """``template`` (Go text/template syntax, the subset above) rendered with ``data`` as dot."""
    nodes, _, _ = _parse(_tokens(template), 0, ())
    out: list[str] = []
    _run(nodes, _Eval(data, [{"$": data}]), data, out)
    return "".join(out)
