"""Chat templates are untrusted code: bounded in time and size, and every failure is one line.

Issue 19, class 4 (a template with nested large loops hung generation; a template could attempt
multi-GB string allocations) and class 5 (a sandbox violation was a raw ``SecurityError``).
The limits are checked against jinja2's own sandbox: within them, output is identical.
"""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2.sandbox import ImmutableSandboxedEnvironment

import dsr1
from dsr1.cli import main
from dsr1.errors import Dsr1Error
from dsr1.preprocess.chat_template import TEMPLATE_MAX_CHARS, ChatTemplate, TemplateLimits

INPUTS = Path(__file__).resolve().parent / "inputs" / "templates"
TINY = Path(dsr1.__file__).resolve().parent / "assets" / "dsr1-tiny"
MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
#: short enough to keep the file fast; the loops below would run for hours without it.
QUICK = TemplateLimits(time_s=0.3)
TIME = "render limit; chat templates render in milliseconds"
SIZE = "more than the render limit of"

#: name -> (template, what the one-line error says). Sizes are refused before anything is built.
CASES: dict[str, tuple[str, str]] = {
    "nested_loops": ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", TIME),
    "nested_output": ("{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}", TIME),
    "loop_over_string": ("{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", TIME),
    "block_set": (("{% set x %}{% for i in range(99999) %}{% for j in range(99999) %}{{ i }}{% endfor %}"
                   "{% endfor %}{% endset %}{{ x }}"), TIME),
    "runaway_macro": ("{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}", TIME),
    "slice_filter": ("{{ [1]|slice(10**12)|list }}", TIME),
    "string_times": ("{{ 'x' * 10**10 }}", "a repeated value of about 10000000000 characters"),
    "times_times": ("{{ 'x' * 8000000 * 8000000 }}", SIZE),
    "list_times": ("{{ (range(100000)|list) * 100000 }}", SIZE),
    "doubling_tilde": (("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}"), "a concatenated string"),
    "doubling_plus": (("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                       "{% endfor %}"), "a concatenated value"),
    "join_method": ("{{ ('y' * 100000).join('x' * 100000) }}", "a joined string"),
    "join_filter": ("{{ ('x' * 100000)|join('y' * 100000) }}", "a joined string"),
    "replace_method": ("{{ ('x' * 1000000).replace('x', 'y' * 1000000) }}", "replace()"),
    "replace_filter": ("{{ ('x' * 1000000)|replace('x', 'y' * 1000000) }}", "replace"),
    "center_method": ("{{ 'x'.center(10**10) }}", "padded by center()"),
    "zfill_method": ("{{ 'x'.zfill(10**10) }}", "padded by zfill()"),
    "center_filter": ("{{ 'x'|center(10**10) }}", "a centered string"),
    "indent_filter": ("{{ ('\n' * 1000000)|indent(10**6, blank=True) }}", "an indented string"),
    "wordwrap_filter": ("{{ ('x' * 1000000)|wordwrap(1, wrapstring='y' * 1000000) }}", "a wrapped string"),
    "expandtabs": ("{{ ('\t' * 1000000).expandtabs(1000000) }}", "expandtabs()"),
    "translate": ("{{ ('a' * 1000000).translate({97: 'x' * 1000000}) }}", "translate()"),
    "format_width": ("{{ '{:>10000000000}'.format('x') }}", "a formatted string"),
    "format_nested_width": ("{{ '{:>{}}'.format('x', 10**10) }}", "a formatted string"),
    "format_map": ("{{ '{a:>10000000000}'.format_map({'a': 1}) }}", "a formatted string"),
    "percent_width": ("{{ '%10000000000s' % 'x' }}", "a formatted string"),
    "percent_star": ("{{ '%*s' % (10**10, 'x') }}", "a formatted string"),
    "format_filter": ("{{ '%10000000000s'|format('x') }}", "a formatted string"),
    "batch_fill": ("{{ [1]|batch(10**10, 'x')|list }}", "a filled batch"),
    "tojson_indent": ("{{ ([['x'] * 1000] * 1000)|tojson(indent=1000) }}", "JSON text"),
    "power": ("{{ 2 ** 100000000 }}", "an integer of more than 65536 bits"),
    "squaring": ("{% set ns = namespace(n=3) %}{% for i in range(100) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
                 "an integer of more than"),
    "string_of_list": ("{% set s = 'x' * 3000000 %}{{ [s, s, s]|string }}", "filter string"),
    "output_value": ("{{ dict(a='x' * 5000000, b='y' * 5000000) }}", SIZE),
    "sandbox": ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "sandbox forbids: access to attribute"),
    "mutation": ("{{ messages.append(1) }}", "sandbox forbids"),
    "syntax": ("{% for %}", "has a syntax error at line 1"),
    "unknown_filter": ("{{ x|nosuchfilter }}", "No filter named 'nosuchfilter'"),
    "undefined": ("{{ foo.bar }}", "uses an undefined value: 'foo' is undefined"),
    "recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed too deeply"),
    "recursive_loop": ("{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}", "recursed too deeply"),
    "include": ("{% include 'other.jinja' %}", "failed: TypeError: no loader"),
    "lipsum": ("{{ lipsum(10**9) }}", "'lipsum' is undefined"),
    "int_to_str": ("{{ 10 ** 5000 }}", "Exceeds the limit (4300 digits)"),
    "raise_exception": ("{{ raise_exception('roles must alternate') }}", "chat template error: roles must alternate"),
}


def render(source: str, limits: TemplateLimits = QUICK, **variables: Any) -> str:
    return ChatTemplate(source, "'test-model'", limits).render(messages=MESSAGES, **variables)


@pytest.mark.parametrize("name", sorted(CASES))
def test_adversarial_template_is_one_line_error(name: str) -> None:
    source, message = CASES[name]
    with pytest.raises(Dsr1Error) as err:
        render(source)
    text = str(err.value)
    assert message in text and text.startswith("chat template") and "'test-model'" in text
    assert "\n" not in text and len(text) < 600


#: templates in the style of real checkpoints (Llama 3, ChatML with tools, a Mistral-like one
#: with raise_exception and loop.index): the limits must not change what they render.
REAL = {
    "llama3": (
        "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
    ),
    "chatml_tools": (
        "{%- if tools %}<|im_start|>system\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n"
        "{%- endif %}{%- for message in messages %}{{ '<|im_start|>' ~ message.role ~ '\n' ~ message.content }}"
        "{%- if not loop.last %}<|im_end|>\n{% endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "mistral": (
        "{%- set ns = namespace(n=0, sys='') %}{%- for message in messages %}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
        "{%- set ns.n = ns.n + 1 %}{%- if message['role'] == 'user' %}{{ '[INST] %s [/INST]' % message['content'] }}"
        "{%- else %}{{ message['content'] ~ eos_token }}{%- endif %}{%- endfor %}"
        "{{ '{:>4}|{}'.format(ns.n, messages|map(attribute='role')|join(',')) }}{{ 'x'.center(9, '-') }}"
        "{{ (messages|selectattr('role', 'equalto', 'user')|list|length) * 2 }}{{ '%05d' % 42 }}"
        "{{ 'a\tb'.expandtabs(4) }}{{ 'abc'.replace('b', 'B') }}{{ ['p', 'q']|batch(3, '-')|list }}"
    ),
}
VARIABLES = {"bos_token": "<s>", "eos_token": "</s>", "add_generation_prompt": True,
             "tools": [{"name": "get_weather", "parameters": {"city": {"type": "string"}}}]}


def reference(source: str, **variables: Any) -> str:
    """jinja2's own immutable sandbox, configured as the tokenizer's."""
    from jinja2 import ext

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    return env.from_string(source).render(**variables)


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_templates_render_as_in_jinja2(name: str) -> None:
    long_chat = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i} " * 40} for i in range(200)]
    for messages in (MESSAGES, long_chat):
        got = ChatTemplate(REAL[name], "'m'").render(messages=messages, **VARIABLES)
        assert got == reference(REAL[name], messages=messages, **VARIABLES)


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=40), times=st.integers(-3, 400_000), max_chars=st.integers(1, 2_000_000))
def test_within_the_limit_output_is_exact_and_beyond_it_refused(text: str, times: int, max_chars: int) -> None:
    """``s * n`` and ``s ~ s``: the exact string while it fits, the size error once it would not."""
    limits = TemplateLimits(time_s=60, max_chars=max_chars)
    expected = text * times
    try:
        got = ChatTemplate("{{ s * n }}{{ s ~ s }}", "'m'", limits).render(s=text, n=times)
    except Dsr1Error as err:
        assert SIZE in str(err)
        assert len(expected) > max_chars or 2 * len(text) > max_chars or len(expected) + 2 * len(text) > max_chars
    else:
        assert got == expected + text + text and len(got) <= max_chars


def test_output_is_counted_as_it_streams() -> None:
    """Many small pieces, each harmless, add up past the limit: refused while streaming."""
    limits = TemplateLimits(time_s=60, max_chars=10_000)
    assert len(render("{% for i in range(1000) %}0123456789{% endfor %}", limits)) == 10_000
    with pytest.raises(Dsr1Error, match="would make a prompt of about 10010 characters"):
        render("{% for i in range(1001) %}0123456789{% endfor %}", limits)


def test_limits_are_per_render_and_per_thread() -> None:
    """A runaway template in one thread stops with the time error; renders in other threads at the
    same time are unaffected and correct (no signals: none of these runs on the main thread)."""
    good = ChatTemplate(REAL["llama3"], "'good'")
    bad = ChatTemplate(CASES["nested_loops"][0], "'bad'", QUICK)
    expected = reference(REAL["llama3"], messages=MESSAGES, **VARIABLES)
    results: dict[str, Any] = {}

    def run(name: str, template: ChatTemplate) -> None:
        try:
            results[name] = [template.render(messages=MESSAGES, **VARIABLES) for _ in range(20)]
        except Dsr1Error as err:
            results[name] = err

    threads = [threading.Thread(target=run, args=(f"good{i}", good)) for i in range(3)]
    threads.append(threading.Thread(target=run, args=("bad", bad)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results["bad"], Dsr1Error) and TIME in str(results["bad"]) and "'bad'" in str(results["bad"])
    for i in range(3):
        assert results[f"good{i}"] == [expected] * 20


def test_source_size_is_limited() -> None:
    with pytest.raises(Dsr1Error, match="characters long, more than the 1048576 a template may have"):
        ChatTemplate("x" * (2**20 + 1), "'m'")


def test_compiled_template_cannot_run_without_limits() -> None:
    """The instrumented template only runs through ChatTemplate.render (which sets the budget)."""
    template = ChatTemplate("{% for i in range(3) %}{{ i }}{% endfor %}", "'m'")
    with pytest.raises(RuntimeError, match="outside ChatTemplate.render"):
        template._template.render()


# --- through the tokenizer, the plugin options and the CLI -------------------------------------


def model_dir(tmp_path: Path, template_file: str | None = None, template: str | None = None) -> Path:
    """dsr1-tiny's tokenizer (no weights) with another chat template in chat_template.jinja."""
    out = tmp_path / "model"
    out.mkdir()
    for name in ("tokenizer.json", "special_tokens_map.json", "config.json"):
        shutil.copy(TINY / name, out / name)
    cfg = json.loads((TINY / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    text = (INPUTS / template_file).read_text() if template_file else template
    (out / "chat_template.jinja").write_text(text or "")
    return out


#: tests/reliability/inputs/templates/<file> -> what the error says.
INPUT_FILES = {
    "nested_loops.jinja": TIME,
    "string_bomb.jinja": "a repeated value of about 4000000000 characters",
    "doubling.jinja": "a concatenated string",
    "sandbox_escape.jinja": "sandbox forbids",
    "runaway_macro.jinja": TIME,
}


@pytest.mark.parametrize("name", sorted(INPUT_FILES))
def test_checkpoint_templates_name_their_file(tmp_path: Path, name: str) -> None:
    from dsr1.auto import AutoTokenizer

    path = model_dir(tmp_path, name)
    config = {"preprocess": {"name": "tokenizers", "options": {"template_time_limit_s": 0.3}}}
    tok = AutoTokenizer.from_pretrained(path, config)
    with pytest.raises(Dsr1Error) as err:
        tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert INPUT_FILES[name] in str(err.value)
    assert f"chat template from {str(path / 'chat_template.jinja')!r}" in str(err.value)


def test_limits_are_plugin_options(tmp_path: Path) -> None:
    from dsr1.auto import AutoTokenizer

    path = model_dir(tmp_path, template="{{ 'x' * n }}")
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.template_limits.max_chars == TEMPLATE_MAX_CHARS
    assert tok.apply_chat_template(MESSAGES, tokenize=False, n=1000) == "x" * 1000
    small = {"preprocess": {"name": "tokenizers", "options": {"template_max_chars": 999}}}
    with pytest.raises(Dsr1Error, match="more than the render limit of 999"):
        AutoTokenizer.from_pretrained(path, small).apply_chat_template(MESSAGES, tokenize=False, n=1000)
    with pytest.raises(Dsr1Error, match="template_time_limit_s"):
        AutoTokenizer.from_pretrained(path, {"preprocess": {"name": "tokenizers",
                                                            "options": {"template_time_limit_s": 0}}})


def test_generate_chat_refuses_a_runaway_template_before_loading_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The directory has no weights at all: the template's error comes first, as one line."""
    path = model_dir(tmp_path, "nested_loops.jinja")
    config = tmp_path / "engine.yaml"
    config.write_text("preprocess:\n  name: tokenizers\n  options:\n    template_time_limit_s: 0.3\n")
    code = main(["generate", "hi", "--chat", "--model", str(path), "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("dsr1: error: chat template from ") and err.count("\n") == 1
    assert TIME in err and "Traceback" not in err
