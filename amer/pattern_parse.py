"""The pattern language's tokenizer and parser (the grammar is in :mod:`amer.pattern`'s docstring).

Tokens are read with their position in the original string; the item tree is built with bounded recursion (groups
nest at most :data:`MAX_NESTING` deep), and its size (blocks and stage bars) is counted arithmetically before
anything is expanded, so '(A)*999999999' or '((|)*99999)*99999' fails at once instead of allocating.
"""

from __future__ import annotations

from amer.errors import PatternError
from amer.families import Family, expected_text, letters

__all__ = ["MAX_LAYERS", "MAX_NESTING", "Branch", "Entry", "Parser", "expand", "shown"]

MAX_LAYERS = 4096  # guards against '(A)*999999999' eating the machine
MAX_NESTING = 64
# ("fam", Family, pos, variant, share) | ("par", [branches], pos) | ("bar", None, pos) | ("group", [nodes], count, pos)
_Node = tuple
Branch = tuple  # (Family, pos, variant, share): one block of a residual layer
Entry = tuple  # ("layer", pos, (Branch, ...)) | ("bar", pos, ()): what a pattern expands to


def shown(text: str, limit: int = 60) -> str:
    """A pattern as quoted in a message: long ones are cut (the position still counts in the full string)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def _is_digit(c: str) -> bool:
    return "0" <= c <= "9"  # str.isdigit() also accepts '²' and other scripts' digits, which int() then refuses


class Parser:
    def __init__(self, source: str) -> None:
        self.src = source
        # keep positions relative to the original string: skip whitespace while reading
        self.chars = [(i, c) for i, c in enumerate(source) if not c.isspace()]
        self.k = 0
        self.letters = letters()

    def err(self, msg: str, pos: int | None, hint: str = "") -> PatternError:
        where = f" at position {pos}" if pos is not None else ""
        hint = f"; {hint}" if hint else ""
        return PatternError(f"pattern {shown(self.src)}: {msg}{where}{hint}", pos)

    def peek(self) -> tuple[int, str] | None:
        return self.chars[self.k] if self.k < len(self.chars) else None

    def parse(self) -> tuple[list[_Node], int | None, int | None]:
        items = self.items(top=True)
        depth = depth_pos = None
        nxt = self.peek()
        if nxt is not None and nxt[1] == "@":
            depth_pos = nxt[0]
            self.k += 1
            depth = self.number("'@' needs a layer count like '@52'", depth_pos)
            if depth < 1:
                raise self.err(f"'@{depth}' must be at least 1", depth_pos)
        nxt = self.peek()
        if nxt is not None:
            pos, c = nxt
            if c == ")":
                raise self.err("unbalanced ')': no matching '('", pos)
            if c == "@":
                raise self.err("second '@'", pos, "only one '@DEPTH' is allowed, at the end")
            raise self.err(f"unexpected {c!r} after '@{depth}'", pos, "'@DEPTH' must come last")
        return items, depth, depth_pos

    def number(self, missing: str, pos: int) -> int:
        start = self.k
        digits = ""
        while (p := self.peek()) is not None and _is_digit(p[1]):
            digits += p[1]
            self.k += 1
        if not digits:
            got = self.peek()
            if got is None:
                raise self.err(f"{missing}, found the end", pos)
            if got[1].isdigit() or got[1].isnumeric():
                raise self.err(f"{missing}, found {got[1]!r}", got[0], "counts are written with the digits 0-9")
            raise self.err(f"{missing}, found {got[1]!r}", got[0])
        if len(digits) > 9:
            shown_digits = digits if len(digits) <= 12 else f"{digits[:12]}... ({len(digits)} digits)"
            raise self.err(f"count {shown_digits} is too large (at most {MAX_LAYERS} layers)", self.chars[start][0])
        return int(digits)

    def items(self, top: bool, open_pos: int | None = None, depth: int = 0) -> list[_Node]:
        out: list[_Node] = []
        while (p := self.peek()) is not None:
            pos, c = p
            if c.isupper() and c in self.letters:
                self.k += 1
                out.append(("fam", Family(c), pos, self.variant(c, pos), self.share(c)))
            elif c == "[":
                self.k += 1
                out.append(("par", self.branches(pos), pos))
            elif c == "]":
                raise self.err("unbalanced ']': no matching '['", pos)
            elif c == "|":
                out.append(("bar", None, pos))
                self.k += 1
            elif c == "(":
                if depth >= MAX_NESTING:
                    raise self.err(f"groups nested more than {MAX_NESTING} deep", pos)
                self.k += 1
                inner = self.items(top=False, open_pos=pos, depth=depth + 1)
                close = self.peek()
                if close is None or close[1] != ")":
                    raise self.err("unbalanced '(': no matching ')'", pos)
                self.k += 1
                star = self.peek()
                if star is None or star[1] != "*":
                    where = star[0] if star else close[0] + 1
                    raise self.err("group without a repeat count", where, "write e.g. '(AEME)*3'")
                self.k += 1
                count = self.number("'*' needs a repeat count like '*3'", star[0])
                if count < 1:
                    raise self.err(f"repeat count '*{count}' must be at least 1", star[0])
                if not inner:
                    raise self.err("empty group '()'", pos)
                out.append(("group", inner, count, pos))
            elif c == ")":
                if top:
                    raise self.err("unbalanced ')': no matching '('", pos)
                return out
            elif c == "@":
                if not top:
                    raise self.err("'@DEPTH' cannot appear inside a group", pos)
                return out
            elif c == "*":
                raise self.err("'*' without a group", pos, "repeat a group, e.g. '(AE)*2'")
            else:
                raise self._unknown(c, pos)
        if not top:
            raise self.err("unbalanced '(': no matching ')'", open_pos)
        return out

    def _unknown(self, c: str, pos: int) -> PatternError:
        if c.isalpha() and c.upper() in self.letters:
            return self.err(f"unknown block {c!r}", pos,
                            f"block letters are upper case, did you mean {c.upper()!r}? {expected_text()}")
        return self.err(f"unknown block {c!r}", pos, expected_text())

    def branches(self, open_pos: int) -> list[Branch]:
        """The blocks of a parallel layer ``[AM]`` after its '[' (at ``open_pos``), through the closing ']'."""
        out: list[Branch] = []
        while (p := self.peek()) is not None:
            pos, c = p
            if c.isupper() and c in self.letters:
                self.k += 1
                out.append((Family(c), pos, self.variant(c, pos), self.share(c)))
            elif c == "]":
                self.k += 1
                if not out:
                    raise self.err("empty parallel layer '[]'", open_pos, "write its blocks inside, e.g. '[AM]'")
                if len(out) == 1:
                    raise self.err("a parallel layer needs at least two blocks", open_pos,
                                   f"write '{self.src[out[0][1]:pos].strip()}' without brackets, or e.g. '[AM]'")
                return out
            elif c in "([|@*):":
                what = {"(": "a group", "[": "a parallel layer", "|": "a stage boundary '|'", "@": "'@DEPTH'",
                        "*": "a repeat count", ")": "')'", ":": "':'"}[c]
                raise self.err(f"{what} cannot appear inside a parallel layer '[...]'", pos,
                               "a parallel layer holds blocks only, e.g. '[A.swa M]'; repeat it as '([AM]E)*4'")
            else:
                raise self._unknown(c, pos)
        raise self.err("unbalanced '[': no matching ']'", open_pos)

    def variant(self, letter: str, pos: int) -> str | None:
        """The ``.name`` after a family letter, if any (read up to the first character that cannot be in one)."""
        dot = self.peek()
        if dot is None or dot[1] != ".":
            return None
        self.k += 1
        name = ""
        while (p := self.peek()) is not None and (p[1].islower() and p[1].isascii() or p[1] == "_"):
            if not name and p[1] == "_":
                break
            name += p[1]
            self.k += 1
        if not name:
            got = self.peek()
            raise self.err(f"'.' after {letter!r} needs a variant name", dot[0] if got is None else got[0],
                           f"write e.g. '{letter}.swa' (lower case letters and '_', starting with a letter)")
        if len(name) > 32:
            raise self.err(f"variant name {name[:32]!r}... is longer than 32 characters", dot[0] + 1)
        return name

    def share(self, letter: str) -> str | None:
        """The ``:name`` after a block, if any: every block with that name uses one set of parameters."""
        colon = self.peek()
        if colon is None or colon[1] != ":":
            return None
        self.k += 1
        name = ""
        while (p := self.peek()) is not None and p[1].isascii() and (p[1].islower() or p[1] == "_"
                                                                    or (name and _is_digit(p[1]))):
            name += p[1]
            self.k += 1
        if not name or not name[0].islower():
            got = self.peek()
            raise self.err(f"':' after {letter!r} needs a share name", colon[0] if got is None else got[0],
                           f"write e.g. '{letter}:z' (lower case letters, digits and '_', starting with a letter)")
        if len(name) > 32:
            raise self.err(f"share name {name[:32]!r}... is longer than 32 characters", colon[0] + 1)
        return name

    def size(self, nodes: list[_Node]) -> tuple[int, int]:
        """(blocks, stage bars) the nodes expand to, counted without expanding; a group that would take
        either past MAX_LAYERS is an error at its position (a valid pattern has fewer bars than blocks)."""
        n_layers = n_bars = 0
        for node in nodes:
            if node[0] == "fam":
                n_layers += 1
            elif node[0] == "par":
                n_layers += len(node[1])
            elif node[0] == "bar":
                n_bars += 1
            else:
                inner_layers, inner_bars = self.size(node[1])
                n_layers += inner_layers * node[2]
                n_bars += inner_bars * node[2]
                if n_layers > MAX_LAYERS:
                    raise self.err(f"expands to more than {MAX_LAYERS} layers", node[3])
                if n_bars > MAX_LAYERS:
                    raise self.err(f"expands to more than {MAX_LAYERS} stage boundaries '|'", node[3])
        if n_layers > MAX_LAYERS:
            raise self.err(f"expands to more than {MAX_LAYERS} layers", None)
        return n_layers, n_bars


def expand(nodes: list[_Node]) -> list[Entry]:
    """Flatten to residual layers ``("layer", pos, branches)`` and stage bars ``("bar", pos, ())`` (sizes already
    bounded by :meth:`Parser.size`)."""
    out: list[Entry] = []
    for node in nodes:
        if node[0] == "fam":
            out.append(("layer", node[2], ((node[1], node[2], node[3], node[4]),)))
        elif node[0] == "par":
            out.append(("layer", node[2], tuple(node[1])))
        elif node[0] == "bar":
            out.append(("bar", node[2], ()))
        else:
            out.extend(expand(node[1]) * node[2])
    return out
