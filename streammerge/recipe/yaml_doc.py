"""A YAML recipe parsed with the line of every key, as safe as ``yaml.safe_load`` and
bounded: ``YamlDoc`` (``streammerge.recipe.mergekit_yaml`` reads mergekit recipes with it)."""

from __future__ import annotations

import re

from pathlib import Path

import yaml

from streammerge.errors import MergeError

#: Most YAML nodes a recipe may expand to, aliases counted each time they are used: a
#: 1 KB "billion laughs" file (10 anchors, each ten references to the previous one)
#: expands to 10**10 nodes and stops here instead of exhausting memory.
MAX_RECIPE_NODES = 100_000
_MAP, _SEQ, _STR, _MERGE = (f"tag:yaml.org,2002:{t}" for t in ("map", "seq", "str", "merge"))
#: Scalar tags a recipe may hold (the YAML core schema, as PyYAML's safe loader reads it).
_SCALAR_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "timestamp")}


class YamlDoc:
    """The parsed YAML with the line of every key (PyYAML node marks).

    Reads what mergekit reads through ``yaml.safe_load``: mappings, lists, scalars,
    anchors and aliases, and merge keys (``<<: *common``; explicit keys win, then the
    merged mappings in order). Refused with one line naming the key and its line: more
    than ``MAX_RECIPE_NODES`` nodes once aliases are expanded, a list or mapping used as a
    key, and any other tag (``!!set``, ``!!python/...``, ``!!binary``, custom tags).
    """

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f"line {mark.line + 1}: " if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise MergeError(f"{line}not valid YAML ({problem})", path, None, "fix the YAML")
        self.lines: dict[str, int] = {}
        self.nodes = 0
        self._seen: set[int] = set()
        self.shared: set[int] = set()  # ids of nodes used more than once (through aliases)
        self.top_nodes: dict = {}  # top-level key -> id of its value node
        self._constructor = yaml.constructor.SafeConstructor()
        self.value = self._walk(node, "") if node is not None else None

    def _count(self, node, where: str) -> None:
        if id(node) in self._seen:
            self.shared.add(id(node))
        self._seen.add(id(node))
        self.nodes += 1
        if self.nodes > MAX_RECIPE_NODES:
            self.fail(where or "(top)", f"expands to more than {MAX_RECIPE_NODES} YAML nodes "
                      "(aliases counted each time they are used)", "write the recipe out plainly",
                      line=node.start_mark.line + 1)  # fmt: skip

    def _walk(self, node, where: str):
        self._count(node, where)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, where)
        if isinstance(node, yaml.SequenceNode):
            self._check_tag(node, _SEQ, where)
            items = []
            for i, v in enumerate(node.value):
                sub = f"{where}[{i}]"
                self.lines[sub] = v.start_mark.line + 1
                items.append(self._walk(v, sub))
            return items
        return self._scalar(node, where)

    def _mapping(self, node, where: str) -> dict:
        self._check_tag(node, _MAP, where)
        out: dict = {}
        for k, v, merged in self._pairs(node, where):
            key = self._key(k, where)
            sub = f"{where}.{key}" if where else str(key)
            if key in out:
                if merged:
                    continue  # an explicit key, or an earlier merged mapping, wins
                self.fail(sub, "duplicate key", line=k.start_mark.line + 1)
            self.lines[sub] = k.start_mark.line + 1
            if not where:
                self.top_nodes[key] = id(v)
            out[key] = self._walk(v, sub)
        return out

    def anchor_only(self, key) -> bool:
        """True for a top-level key whose value is used elsewhere through an alias or a
        merge key (a place to define anchors, as in ``common: &common {...}``)."""
        return self.top_nodes.get(key) in self.shared

    def _pairs(self, node, where: str) -> list[tuple]:
        """The mapping's (key node, value node, merged) triples: its own keys first, then
        those its merge keys (``<<``) bring, mapping by mapping in order."""
        own, merged = [], []
        for k, v in node.value:
            if k.tag != _MERGE:
                own.append((k, v, False))
                continue
            sources = v.value if isinstance(v, yaml.SequenceNode) else [v]
            for src in sources:
                self._count(src, where)
                if not isinstance(src, yaml.MappingNode):
                    self.fail(f"{where}.<<" if where else "<<", "a merge key takes a mapping "
                              "or a list of mappings", line=src.start_mark.line + 1)  # fmt: skip
                merged += [(kk, vv, True) for kk, vv, _ in self._pairs(src, where)]
        return own + merged

    def _key(self, k, where: str):
        if not isinstance(k, yaml.ScalarNode):
            self.fail(where or "(top)", "a list or mapping used as a key",
                      line=k.start_mark.line + 1)  # fmt: skip
        return self._scalar(k, where)

    def _scalar(self, node, where: str):
        self._check_tag(node, None, where)
        if node.tag == _STR:
            return node.value
        return self._constructor.construct_object(node)

    def _check_tag(self, node, tag: str | None, where: str) -> None:
        ok = node.tag == tag if tag is not None else node.tag in _SCALAR_TAGS
        if not ok:
            self.fail(where or "(top)", f"unsupported YAML tag {node.tag.replace('tag:yaml.org,2002:', '!!')}",
                      "use plain values, lists and mappings", line=node.start_mark.line + 1)  # fmt: skip

    def fail(self, key: str, what: str, todo: str = "fix the recipe", line: int | None = None):
        line = line or self.lines.get(key)
        at = f"line {line}: " if line else ""
        raise MergeError(f"{at}{key}: {what}", self.path, None, todo)


_YAML11_MISSED_FLOAT = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+")


def yaml_number(value):
    """``value`` with every string that YAML 1.2 reads as a number but PyYAML (YAML 1.1)
    leaves a string (``1e-5``: no dot) made a float, in lists and filter entries too."""
    if isinstance(value, str) and _YAML11_MISSED_FLOAT.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [yaml_number(v) for v in value]
    if isinstance(value, dict) and "value" in value:
        return {**value, "value": yaml_number(value["value"])}
    return value
