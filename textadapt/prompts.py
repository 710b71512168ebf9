"""Prompt templates: plain Jinja files under ``prompts/SET/NAME.j2``, one question each.

A template is named ``SET/NAME`` (``targeted/look``). Its first lines are a Jinja comment saying
what it asks and which variables it uses, and may set ``key: value`` options:

- ``parse: sentence`` (default: the answer is one description), ``parse: list`` (one descriptor per
  line or a JSON list: each item is a description), or ``parse: questions`` (meta-prompting: the
  answer is a list of question templates with ``{}`` for the class; each is then asked for every
  class, as ``SET/NAME/i``). A ``questions`` template is rendered once per dataset, without a class;
- ``max_tokens``, ``temperature``, ``stop`` (``none`` for no stop string): this template's sampling.

It renders in Jinja's sandbox (templates are shared) with undefined variables as errors, and
these variables:

- ``class_name``: the class being described, as written in the dataset spec;
- ``dataset``: ``name``, ``title``, ``domain``, ``category``, ``task`` and ``classes`` from the spec;
- ``confusable``: the classes most easily confused with this one (the spec's
  ``[prompting.confusable]`` table, else the nearest class names in the backbone's text space).

Filter ``article`` prefixes "a" or "an": ``{{ class_name | article }}``.
The template's source hash is part of every generation's cache key, so editing one template
regenerates exactly that template's rows.

The shipped sets each vary one thing: ``generic`` asks TAP's five generic questions with no word
about the dataset; ``targeted`` asks the same five with the dataset's domain; ``contrastive`` and
``attributes`` (DCLIP-style feature lists) ask other kinds of question. A dataset spec may carry its
own targeted questions (``[prompting] targeted = [...]``, TAP's per-dataset wording with the domain
as the head noun): ``templates_for`` then makes them the dataset's ``targeted`` set, named
``targeted/spec/0``, ``targeted/spec/1``, ..., each question's text being its template source (and
so part of its cache key), asked with " Answer in one sentence." appended.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from textadapt import TextadaptError, read_text_file
from textadapt.datasets import DatasetSpec


def article(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


OPTION = re.compile(r"^\s*(parse|max_tokens|temperature|stop)\s*:\s*(.+?)\s*$")
PARSE_MODES = ("sentence", "list", "questions")
QUESTION_SUFFIX = " Answer in one sentence."


@dataclass(frozen=True)
class PromptTemplate:
    name: str  # "targeted/look"; a meta-prompted question: "meta/questions/3"
    path: Path
    source: str  # Jinja source; for a meta-prompted question, the question with {} for the class
    question: bool = False  # written by the LLM from a ``parse: questions`` template
    origin: str = ""  # for a question from a dataset spec: where it is ("dtd.toml: prompting.targeted[2]")

    @property
    def template_set(self) -> str:
        return self.name.split("/", 1)[0]

    @property
    def source_hash(self) -> str:
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()

    def _header(self) -> list[str]:
        m = re.match(r"\s*\{#(.*?)#\}", self.source, re.S)
        return m.group(1).splitlines() if m and not self.question else []

    @property
    def intent(self) -> str:
        if self.question:
            return f"meta-prompted question from {self.path.name}"
        if self.origin:
            return f"the dataset's own targeted question ({self.origin})"
        return " ".join(" ".join(line for line in self._header() if not OPTION.match(line)).split())

    @property
    def options(self) -> dict[str, str]:
        opts = dict(m.groups() for line in self._header() if (m := OPTION.match(line)))
        if opts.get("parse", "sentence") not in PARSE_MODES:
            raise TextadaptError(f"{self.path}: parse: {opts['parse']!r} is not one of {PARSE_MODES}")
        return opts

    @property
    def parse(self) -> str:
        return "sentence" if self.question else self.options.get("parse", "sentence")

    def sampling_overrides(self) -> dict:
        """This template's own sampling settings (header options), over the run's."""
        if self.question:
            return {}
        out: dict = {}
        for key, value in self.options.items():
            try:
                if key == "max_tokens":
                    out["max_tokens"] = int(value)
                elif key == "temperature":
                    out["temperature"] = float(value)
                elif key == "stop":
                    out["stop"] = () if value == "none" else (value.strip("\"'"),)
            except ValueError:
                raise TextadaptError(f"{self.path}: option {key}: {value!r} is not a number") from None
        return out


@functools.lru_cache(maxsize=512)
def _compile(source: str, filename: str) -> jinja2.Template:
    """Compile exactly the hashed source, under the file's name so errors point into the file."""
    env = SandboxedEnvironment(
        loader=jinja2.FunctionLoader(lambda _name: (source, filename, lambda: True)), undefined=jinja2.StrictUndefined
    )
    env.filters["article"] = article
    return env.get_template(filename)


def list_templates(root: Path, sets: list[str] | None = None) -> list[PromptTemplate]:
    """Every template of the given sets (all sets if None), sorted by name."""
    root = Path(root)
    if sets is not None:
        missing = [s for s in sets if not (root / s).is_dir()]
        if missing:
            have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            raise TextadaptError(f"no template set {missing} in {root}; sets there: {have}")
    out = []
    for path in sorted(root.glob("*/*.j2")):
        name = f"{path.parent.name}/{path.stem}"
        if sets is None or path.parent.name in sets:
            out.append(PromptTemplate(name, path, read_text_file(path)))
    if sets is not None:
        empty = [s for s in sets if not any(t.template_set == s for t in out)]
        if empty:
            raise TextadaptError(f"template set(s) {empty} in {root} hold no .j2 file")
    return out


SPEC_SET = "targeted"  # the set a spec's own questions stand in for


def spec_questions(spec: DatasetSpec) -> list[PromptTemplate]:
    """A spec's own targeted questions as templates ``targeted/spec/I`` (the question's text is the source)."""
    out = []
    for i, q in enumerate(spec.prompting.targeted):
        where = f"{spec.path.name if spec.path else spec.name}: prompting.targeted[{i}]"
        text = q.strip()
        if not text.endswith(QUESTION_SUFFIX.strip()):
            text += QUESTION_SUFFIX
        path = Path(f"{spec.path or spec.name}#prompting.targeted[{i}]")
        out.append(PromptTemplate(f"{SPEC_SET}/spec/{i}", path, text, origin=where))
    return out


def templates_for(root: Path, sets: list[str] | None, spec: DatasetSpec) -> list[PromptTemplate]:
    """The templates a run of ``spec`` asks, sorted by name: ``list_templates``, with the spec's own targeted
    questions (if it has any) as its ``targeted`` set instead of the files in ``root/targeted``."""
    if not spec.prompting.targeted or (sets is not None and SPEC_SET not in sets):
        return list_templates(root, sets)
    others = None if sets is None else [s for s in sets if s != SPEC_SET]
    files = [t for t in list_templates(root, others) if t.template_set != SPEC_SET] if others != [] else []
    return sorted(files + spec_questions(spec), key=lambda t: t.name)


def default_confusable(spec: DatasetSpec, class_name: str, k: int = 3) -> list[str]:
    """The spec's confusable classes for ``class_name``, else its neighbours in the class list."""
    if class_name in spec.prompting.confusable:
        return spec.prompting.confusable[class_name]
    i = spec.classes.index(class_name) if class_name in spec.classes else 0
    others = spec.classes[i + 1 :] + spec.classes[:i]
    return others[:k]


def prompt_variables(spec: DatasetSpec, class_name: str, confusable: list[str] | None = None) -> dict:
    return {
        "class_name": class_name,
        "confusable": confusable if confusable is not None else default_confusable(spec, class_name),
        "dataset": {
            "name": spec.name,
            "title": spec.title or spec.name,
            "domain": spec.prompting.domain,
            "category": spec.prompting.category,
            "task": spec.prompting.task,
            "classes": list(spec.classes),
        },
    }


def _template_line(exc: BaseException, path: Path) -> int | None:
    """The template line of an error raised while rendering (Jinja maps its frames onto the file)."""
    tb, line = exc.__traceback__, None
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename) == path:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def render(template: PromptTemplate, spec: DatasetSpec, class_name: str, confusable: list[str] | None = None) -> str:
    """The exact text sent to the LLM; errors name the template file, its line and the variable.

    A ``parse: questions`` template is rendered without a class (pass ``class_name=""``).
    """
    if template.question:
        return template.source.replace("{}", article(class_name)) + QUESTION_SUFFIX
    try:
        text = _compile(template.source, str(template.path)).render(**prompt_variables(spec, class_name, confusable))
    except jinja2.TemplateSyntaxError as e:
        raise TextadaptError(f"{template.path}:{e.lineno}: template syntax error: {e.message}") from None
    except jinja2.UndefinedError as e:
        line = _template_line(e, template.path)
        raise TextadaptError(
            f"{template.path}:{line or '?'}: undefined variable: {e.message}. "
            f"Templates get: class_name, dataset.{{name,title,domain,category,task,classes}}"
        ) from None
    except jinja2.exceptions.SecurityError as e:
        raise TextadaptError(f"{template.path}: refused by the template sandbox: {e}") from None
    text = " ".join(text.split())
    if not text:
        raise TextadaptError(f"{template.path}: renders to an empty prompt for class {class_name!r}")
    return text


def check_templates(templates: list[PromptTemplate], spec: DatasetSpec) -> None:
    """Render every template for every class before any LLM call, so a typo costs nothing."""
    for t in templates:
        t.sampling_overrides()
        for c in [""] if t.parse == "questions" else spec.classes:
            render(t, spec, c)


def questions_from(template: PromptTemplate, answer: str) -> list[PromptTemplate]:
    """The question templates an LLM wrote in answer to a ``parse: questions`` template."""
    return [PromptTemplate(f"{template.name}/{i}", template.path, q, question=True) for i, q in enumerate(answer.splitlines())]
