"""Chat templates: jinja2's immutable sandbox with a time limit and a size limit.

A chat template comes with a downloaded checkpoint, so it is untrusted code. jinja2's
:class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` keeps it away from Python internals
and from mutating its inputs, but not from looping for hours or building a string of
gigabytes. :class:`ChatTemplate` adds both limits, in pure Python (no signals, no threads:
rendering may run on any thread, and each render has its own budget in a context variable):

* **time** (:data:`TEMPLATE_TIME_LIMIT_S`): every loop iteration, call, attribute lookup,
  intercepted operator and output chunk checks the deadline;
* **size** (:data:`TEMPLATE_MAX_CHARS`): the output is streamed with ``generate()`` and
  counted as it comes; every value the template builds with an operator that can amplify
  (``*``, ``+``, ``**``, ``%``, ``~``, ``join``, ``replace``, ``center``, ``indent``,
  ``format`` ...) is sized *before* it is built, and every call's result after.

Exceeding a limit, a sandbox violation, a syntax error or any other failure of the template
is one :class:`~dsr1.errors.Dsr1Error` line that names the template's origin.
"""
from __future__ import annotations

import functools
import inspect
import json
import string
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dsr1.errors import Dsr1Error

#: seconds one render may take. Real chat templates render in milliseconds; two seconds leave
#: room for a loaded machine and still stop a runaway loop before anyone waits for it.
TEMPLATE_TIME_LIMIT_S = 2.0
#: most characters of the output and of any value built while rendering. About 2M tokens at
#: ~4 characters a token: more than any model's context, and small enough to allocate at once.
TEMPLATE_MAX_CHARS = 8 * 2**20
#: longest template source compiled (compiling is not interruptible; real ones are < 50 KB).
TEMPLATE_SOURCE_MAX_CHARS = 2**20
#: largest integer a template may compute (``10 ** 10 ** 10`` would run for hours in C).
MAX_INT_BITS = 2**16
#: how many items :func:`_measure` walks between two deadline checks.
_TICK_EVERY = 4096


@dataclass(frozen=True)
class TemplateLimits:
    """The limits of one render (the ``tokenizers`` plugin's options can raise them)."""

    time_s: float = TEMPLATE_TIME_LIMIT_S
    max_chars: int = TEMPLATE_MAX_CHARS


class _Budget:
    """The deadline and size limit of the render in progress on this thread / task."""

    __slots__ = ("deadline", "limits", "origin")

    def __init__(self, limits: TemplateLimits, origin: str) -> None:
        self.limits, self.origin = limits, origin
        self.deadline = time.monotonic() + limits.time_s

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise Dsr1Error(
                f"chat template from {self.origin} exceeded the {self.limits.time_s:g} s render limit; chat templates "
                f"render in milliseconds, so it loops too much (the tokenizers option template_time_limit_s raises "
                f"the limit for a template that is legitimately slow)"
            )

    def size(self, chars: int, what: str) -> None:
        if chars > self.limits.max_chars:
            raise Dsr1Error(
                f"chat template from {self.origin} would make {what} of about {chars} characters, more than the render "
                f"limit of {self.limits.max_chars}; a chat prompt is far smaller (the tokenizers option "
                f"template_max_chars raises the limit)"
            )

    def int_bits(self, bits: int) -> None:
        if bits > MAX_INT_BITS:
            raise Dsr1Error(f"chat template from {self.origin} computes an integer of more than {MAX_INT_BITS} bits")


_BUDGET: ContextVar[_Budget | None] = ContextVar("dsr1_chat_template_budget", default=None)


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:  # only ChatTemplate.render runs the compiled template
        raise RuntimeError("a chat template ran outside ChatTemplate.render (no render limits set)")
    return budget


# --- sizing values without building them ----------------------------------------------------


def _measure(value: Any, budget: _Budget) -> int:
    """About how many characters ``str(value)`` has, walking containers without recursion and
    stopping once past the limit (so measuring never costs more than the limit allows)."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if value is None or isinstance(value, (int, float)):
        return 8
    total, walked, stack = 0, 0, [value]
    limit = budget.limits.max_chars
    while stack and total <= limit:
        item = stack.pop()
        walked += 1
        if walked % _TICK_EVERY == 0:
            budget.tick()
        if isinstance(item, (str, bytes)):
            total += len(item) + 2
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 2
        elif isinstance(item, Mapping):
            total += 2
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)) or type(item).__name__ in ("dict_keys", "dict_values",
                                                                                          "dict_items"):
            total += 2
            stack.extend(item)
        elif type(item).__name__ == "Namespace":  # jinja2's namespace(): its repr shows every attribute
            stack.append(dict(getattr(item, "_Namespace__attrs", {})))
        else:
            total += 8  # numbers, None, Undefined, macros, loop objects: short reprs
    return total


def _format_chars(fmt: str, args: Any, kwargs: Any, percent: bool, budget: _Budget) -> int:
    """About how long ``fmt % args`` / ``fmt.format(*args, **kwargs)`` would be: the format,
    its arguments and every width or precision written in it (those taken from the arguments,
    ``*`` or ``{:{}}``, are counted from the integer arguments)."""
    widths, from_args = 0, False
    if percent:
        i = fmt.find("%")
        while i != -1:
            j = i + 1
            if j < len(fmt) and fmt[j] == "(":  # a mapping key may hold digits that are no width
                j = fmt.find(")", j) + 1 or len(fmt)
            digits = ""
            while j < len(fmt) and not fmt[j].isalpha() and fmt[j] != "%":
                if fmt[j].isdigit():
                    digits += fmt[j]
                else:
                    widths += int(digits) if digits else 0
                    digits = ""
                    from_args |= fmt[j] == "*"
                j += 1
            widths += int(digits) if digits else 0
            i = fmt.find("%", j + 1)
    else:
        try:
            parts = list(string.Formatter().parse(fmt))
        except ValueError:
            parts = []  # a malformed format fails when it is used, with the same error
        for _, _, spec, _ in parts:
            if spec:
                from_args |= "{" in spec
                widths += sum(int(d) for d in "".join(c if c.isdigit() else " " for c in spec).split())
    values = list(args.values()) if isinstance(args, Mapping) else list(args) if isinstance(args, tuple) else [args]
    values += list(kwargs.values()) if isinstance(kwargs, Mapping) else []
    if from_args:
        widths += sum(abs(v) for v in values if isinstance(v, int))
    return len(fmt) + widths + _measure(values, budget)


def _replace_chars(s: str | bytes, old: Any, new: Any, count: Any) -> int:
    if not isinstance(old, type(s)) or not isinstance(new, type(s)):
        return len(s)  # str.replace raises the TypeError
    found = len(s) + 1 if not old else s.count(old)  # type: ignore[arg-type]  # same type, checked above
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    return len(s) + found * max(0, len(new) - len(old))


def _join_items(items: Any, sep: Any, budget: _Budget) -> Any:
    """``items`` as a sequence (a generator is walked once, with deadline checks), sized as joined."""
    sep_chars = len(sep) if isinstance(sep, (str, bytes)) else 0
    if isinstance(items, (str, bytes)):
        budget.size(len(items) * (1 + sep_chars), "a joined string")
        return items  # joined character by character, like a list
    listed = []
    for n, item in enumerate(items):
        if n % _TICK_EVERY == 0:
            budget.tick()
        listed.append(item)
    budget.size(_measure(listed, budget) + sep_chars * len(listed), "a joined string")
    return listed


def _json_chars(value: Any, indent: Any, budget: _Budget) -> int:
    """About how long ``json.dumps(value, indent=indent)`` is: the value, plus an indent per
    item and nesting level."""
    step = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
    total, stack = 0, [(value, 1)]
    while stack and total <= budget.limits.max_chars:
        item, depth = stack.pop()
        total += step * depth + 4
        if isinstance(item, Mapping):
            stack.extend((v, depth + 1) for v in item.values())
            total += _measure(list(item.keys()), budget)
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)
        else:
            total += _measure(item, budget)
    return total


# --- the checks before a call ---------------------------------------------------------------

_WIDTH_METHODS = frozenset({"ljust", "rjust", "center", "zfill"})


def _check_str_method(name: str, s: str | bytes, args: tuple[Any, ...], kwargs: dict[str, Any],
                      budget: _Budget) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Size the result of a string method that can amplify before it runs; returns the
    arguments to call it with (``join``'s iterable becomes a list)."""
    def arg(i: int, key: str, default: Any) -> Any:
        return args[i] if len(args) > i else kwargs.get(key, default)

    if name in _WIDTH_METHODS:
        width = arg(0, "width", 0)
        budget.size(width if isinstance(width, int) else 0, f"a string padded by {name}()")
    elif name == "expandtabs":
        tabsize = arg(0, "tabsize", 8)
        tabs = s.count("\t") if isinstance(s, str) else s.count(b"\t")
        budget.size(len(s) + tabs * (tabsize if isinstance(tabsize, int) else 0), "a string from expandtabs()")
    elif name == "replace":
        budget.size(_replace_chars(s, arg(0, "old", ""), arg(1, "new", ""), arg(2, "count", -1)),
                    "a string from replace()")
    elif name == "join" and args:
        args = (_join_items(args[0], s, budget), *args[1:])
    elif name == "format":
        budget.size(_format_chars(str(s), args, kwargs, False, budget), "a formatted string")
    elif name == "format_map" and args:
        budget.size(_format_chars(str(s), (), args[0], False, budget), "a formatted string")
    elif name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, (str, bytes))), default=1)
        budget.size(len(s) * max(longest, 1), "a string from translate()")
    return args, kwargs


def _check_filter(name: str, arguments: dict[str, Any], budget: _Budget) -> None:
    """Size the result of a jinja2 filter that can amplify, from its bound arguments
    (``join``'s value becomes a list, in place)."""
    a = arguments
    if name == "center":
        budget.size(a.get("width", 80) if isinstance(a.get("width", 80), int) else 0, "a centered string")
    elif name == "indent":
        s, width = str(a.get("s", "")), a.get("width", 4)
        step = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        budget.size(len(s) + (s.count("\n") + 1) * step, "an indented string")
    elif name == "wordwrap":
        s, width, wrap = str(a.get("s", "")), a.get("width", 79), a.get("wrapstring") or "\n"
        lines = len(s) // max(width if isinstance(width, int) else 1, 1) + 1
        budget.size(len(s) + lines * len(str(wrap)), "a wrapped string")
    elif name == "join":
        a["value"] = _join_items(a.get("value", ()), a.get("d", ""), budget)
    elif name == "replace":
        s = a.get("s", "")
        if isinstance(s, str):
            budget.size(_replace_chars(s, a.get("old"), a.get("new"), a.get("count")), "a string from replace")
    elif name == "format":
        kwargs, args = a.get("kwargs") or {}, a.get("args") or ()
        budget.size(_format_chars(str(a.get("value", "")), kwargs or args, {}, True, budget), "a formatted string")
    elif name == "batch" and a.get("fill_with") is not None:
        count = a.get("linecount", 0)
        budget.size(count if isinstance(count, int) else 0, "a filled batch")


def _guarded(items: Iterator[Any], budget: _Budget) -> Iterator[Any]:
    """``items``, with a deadline check before each one (loops and lazy filters)."""
    for item in items:
        budget.tick()
        yield item


#: the filters :func:`_check_filter` sizes before they run, from their bound arguments.
_AMPLIFYING_FILTERS = frozenset({"center", "indent", "wordwrap", "join", "replace", "format", "batch"})
#: filters that make a string of their first argument: sized as that argument, before they run.
_STRING_FILTERS = frozenset({"string", "pprint", "e", "escape", "forceescape", "urlencode"})


def _wrap_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(func) if name in _AMPLIFYING_FILTERS else None

    @functools.wraps(func)  # keeps jinja_pass_arg, so context/environment are still passed
    def limited(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        if signature is not None:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                return func(*args, **kwargs)  # wrong arguments: the filter raises its own error
            _check_filter(name, bound.arguments, budget)
            args, kwargs = bound.args, bound.kwargs
        elif name in _STRING_FILTERS and args:
            budget.size(_measure(args[0], budget), f"the string of a value (filter {name})")
        result = func(*args, **kwargs)
        if inspect.isgenerator(result):
            return _guarded(result, budget)
        budget.size(_measure(result, budget), f"a value (filter {name})")
        return result

    return limited


# --- the environment --------------------------------------------------------------------------


def _make_environment() -> Any:
    from jinja2 import ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class LimitedSandbox(ImmutableSandboxedEnvironment):
        """The immutable sandbox whose hooks check the render budget."""

        intercepted_binops = frozenset({"*", "+", "**", "%"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            budget = _budget()
            budget.tick()
            if operator == "+" and type(left) is str and type(right) is str:  # the common case, kept cheap
                budget.size(len(left) + len(right), "a concatenated value")
            elif isinstance(left, int) and isinstance(right, int):
                if operator == "*":
                    budget.int_bits(left.bit_length() + right.bit_length())
                elif operator == "**" and right > 0 and abs(left) > 1:
                    budget.int_bits(left.bit_length() * right)
            elif operator == "*":
                seq, times = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(times, int) and not isinstance(seq, (int, float)):
                    budget.size(_measure(seq, budget) * max(times, 0), "a repeated value")
            elif operator == "+" and not isinstance(left, (int, float)):
                budget.size(_measure(left, budget) + _measure(right, budget), "a concatenated value")
            elif operator == "%" and isinstance(left, str):
                budget.size(_format_chars(left, right, {}, True, budget), "a formatted string")
            return super().call_binop(context, operator, left, right)

        def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
            budget = _budget()
            budget.tick()
            target = getattr(obj, "__wrapped__", obj)  # str.format comes wrapped by the sandbox
            owner = getattr(target, "__self__", None)
            if isinstance(owner, (str, bytes)):
                args, kwargs = _check_str_method(getattr(target, "__name__", ""), owner, args, kwargs, budget)
            result = super().call(context, obj, *args, **kwargs)
            budget.size(_measure(result, budget), "a value returned by a call")
            return result

        def getattr(self, obj: Any, attribute: str) -> Any:
            _budget().tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            _budget().tick()
            return super().getitem(obj, argument)

    def concat(pieces: Iterable[str]) -> str:
        """Block bodies (``{% set %}``, macros, filter and call blocks) joined."""
        budget = _budget()
        budget.tick()
        listed = list(pieces)  # the compiled code passes its block's list
        budget.size(sum(map(len, listed)), "a block of output")
        return "".join(listed)

    def concat_values(*values: Any) -> str:
        """The ``~`` operator, sized before the string is built."""
        budget = _budget()
        budget.size(sum(_measure(v, budget) for v in values), "a concatenated string")
        return "".join(map(str, values))

    def finalize(value: Any) -> Any:
        """Every ``{{ value }}``, sized before it becomes a string."""
        budget = _budget()
        budget.size(_measure(value, budget), "an output value")
        return value

    def raise_exception(message: Any) -> None:
        raise Dsr1Error(f"chat template error: {message} (raised by the chat template from {_budget().origin})")

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | str | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        budget = _budget()
        budget.size(_json_chars(x, indent, budget), "JSON text")
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def guard_iter(iterable: Any) -> Iterator[Any]:
        return _guarded(iter(iterable), _budget())

    env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols], finalize=finalize)
    env.concat = concat  # type: ignore[method-assign]  # the compiled module reads environment.concat
    env.dsr1_iter = guard_iter  # type: ignore[attr-defined]  # reached as environment.dsr1_iter only
    env.dsr1_concat = concat_values  # type: ignore[attr-defined]
    env.filters["tojson"] = tojson
    env.filters.update({name: _wrap_filter(name, f) for name, f in env.filters.items()})
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals.pop("lipsum", None)  # lorem ipsum of n paragraphs: no chat template uses it, and n is unbounded
    return env


def _instrument(env: Any, ast: Any) -> Any:
    """Route every ``for`` loop's iterable through ``environment.dsr1_iter`` and every ``~``
    through ``environment.dsr1_concat``. Environment attributes cannot be shadowed by template
    variables, unlike globals."""
    from jinja2 import nodes
    from jinja2.visitor import NodeTransformer

    def call(name: str, args: list[Any], lineno: int) -> Any:
        return nodes.Call(nodes.EnvironmentAttribute(name, lineno=lineno), args, [], None, None, lineno=lineno)

    class Instrument(NodeTransformer):
        def visit_For(self, node: Any) -> Any:  # NodeTransformer's naming
            node = self.generic_visit(node)
            node.iter = call("dsr1_iter", [node.iter], node.lineno)
            return node

        def visit_Concat(self, node: Any) -> Any:
            node = self.generic_visit(node)
            return call("dsr1_concat", list(node.nodes), node.lineno)

    ast = Instrument().visit(ast)
    ast.set_environment(env)
    return ast


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    # Python's advice to raise its process-wide int-to-str limit is not the user's fix
    return text.splitlines()[0].split("; use sys.set_int_max_str_digits")[0] if text else type(err).__name__


class ChatTemplate:
    """A compiled chat template; :meth:`render` enforces :class:`TemplateLimits`.

    ``origin`` names where the template came from (a model directory) in every error."""

    def __init__(self, source: str, origin: str, limits: TemplateLimits | None = None) -> None:
        from jinja2 import TemplateError, TemplateSyntaxError

        self.origin = origin
        self.limits = limits or TemplateLimits()
        if len(source) > TEMPLATE_SOURCE_MAX_CHARS:
            raise Dsr1Error(f"chat template from {origin} is {len(source)} characters long, more than the "
                            f"{TEMPLATE_SOURCE_MAX_CHARS} a template may have; is it the right file?")
        env = _make_environment()
        try:
            self._template = env.from_string(_instrument(env, env.parse(source)))
        except TemplateSyntaxError as err:
            raise Dsr1Error(f"chat template from {origin} has a syntax error at line {err.lineno}: "
                            f"{_first_line(err)}") from None
        except TemplateError as err:
            raise Dsr1Error(f"chat template from {origin} is invalid: {_first_line(err)}") from None
        except (RecursionError, MemoryError, SyntaxError, ValueError) as err:  # nesting too deep for the compilers
            raise Dsr1Error(f"chat template from {origin} cannot be compiled ({type(err).__name__}: "
                            f"{_first_line(err)}); is it nested too deeply?") from None

    def render(self, **variables: Any) -> str:
        """The template rendered with ``variables``, streamed and counted chunk by chunk."""
        from jinja2 import TemplateError, UndefinedError
        from jinja2.exceptions import SecurityError

        budget = _Budget(self.limits, self.origin)
        token = _BUDGET.set(budget)
        origin = self.origin
        try:
            parts: list[str] = []
            total = 0
            for chunk in self._template.generate(**variables):
                budget.tick()
                total += len(chunk)
                budget.size(total, "a prompt")
                parts.append(chunk)
            return "".join(parts)
        except Dsr1Error:
            raise
        except SecurityError as err:
            raise Dsr1Error(f"chat template from {origin} did something the sandbox forbids: {_first_line(err)}") from err
        except UndefinedError as err:
            raise Dsr1Error(f"chat template from {origin} uses an undefined value: {_first_line(err)}") from err
        except TemplateError as err:
            raise Dsr1Error(f"chat template from {origin} failed: {_first_line(err)}") from err
        except RecursionError:
            raise Dsr1Error(f"chat template from {origin} recursed too deeply (a macro or a recursive loop that "
                            f"does not end)") from None
        except MemoryError:
            raise Dsr1Error(f"chat template from {origin} ran out of memory") from None
        except Exception as err:  # noqa: BLE001 - anything the template's own code raises is the template's error
            raise Dsr1Error(f"chat template from {origin} failed: {type(err).__name__}: {_first_line(err)}") from err
        finally:
            _BUDGET.reset(token)
