import shutil

import pytest

from textadapt import TextadaptError
from textadapt.config import Settings
from textadapt.datasets import known_datasets, load_spec
from textadapt.prompts import check_templates, list_templates, render


def test_every_template_renders_for_every_shipped_dataset():
    settings = Settings()
    templates = list_templates(settings.prompts_dir)
    assert {t.template_set for t in templates} >= {"generic", "targeted"}
    for path in known_datasets(settings.dataset_search_path).values():
        check_templates(templates, load_spec(path))


def test_targeted_questions_carry_the_domain_and_generic_ones_do_not(fmnist):
    templates = list_templates(Settings().prompts_dir, ["generic", "targeted"])
    assert sum(t.template_set == "targeted" for t in templates) >= 4
    for t in templates:
        text = render(t, fmnist, "sandal")
        assert "sandal" in text
        assert (fmnist.prompting.domain in text) == (t.template_set == "targeted"), t.name
        assert t.intent, f"{t.path} states no intent at its top"


def copy_set(tmp_path, body: str):
    root = tmp_path / "prompts"
    (root / "mine").mkdir(parents=True)
    (root / "mine" / "q.j2").write_text(body)
    return list_templates(root, ["mine"])[0]


def test_undefined_variable_names_file_line_and_variable(tmp_path, fmnist):
    t = copy_set(tmp_path, "{# intent #}\nWhat is {{ class_name }}\nin {{ dataset.colour }}?\n")
    with pytest.raises(TextadaptError, match=r"q.j2:3: undefined variable: .*'colour'"):
        render(t, fmnist, "bag")


def test_syntax_error_names_file_and_line(tmp_path, fmnist):
    t = copy_set(tmp_path, "{# intent #}\nWhat is\n{{ class_name }\n")
    with pytest.raises(TextadaptError, match=r"q.j2:3: template syntax error"):
        render(t, fmnist, "bag")


def test_templates_render_in_the_sandbox(tmp_path, fmnist):
    t = copy_set(tmp_path, "{{ class_name.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TextadaptError, match="sandbox|undefined"):
        render(t, fmnist, "bag")


def test_unknown_template_set_is_named(tmp_path):
    shutil.copytree(Settings().prompts_dir, tmp_path / "p")
    with pytest.raises(TextadaptError, match=r"no template set \['nope'\]"):
        list_templates(tmp_path / "p", ["generic", "nope"])


def test_template_options_set_parsing_and_sampling():
    templates = {t.name: t for t in list_templates(Settings().prompts_dir)}
    assert templates["targeted/look"].parse == "sentence" and templates["targeted/look"].sampling_overrides() == {}
    assert templates["attributes/descriptors"].parse == "list"
    assert templates["attributes/descriptors"].sampling_overrides() == {"max_tokens": 80, "stop": ()}
    meta = templates["meta/questions"]
    assert meta.parse == "questions" and meta.sampling_overrides()["temperature"] == 0.7
    assert "parse:" not in meta.intent and meta.intent.startswith("Meta-prompting")


def test_contrastive_questions_name_the_confusable_classes(fmnist):
    t = {t.name: t for t in list_templates(Settings().prompts_dir, ["contrastive"])}["contrastive/apart"]
    text = render(t, fmnist, "shirt")  # the spec's [prompting.confusable] table
    assert "a T-shirt or top or a pullover or a coat" in text
    assert "a sandal" in render(t, fmnist, "sneaker", confusable=["sandal"])


def test_meta_prompted_questions_render_with_the_class(fmnist):
    from textadapt.prompts import questions_from

    meta = {t.name: t for t in list_templates(Settings().prompts_dir, ["meta"])}["meta/questions"]
    assert "{}" in render(meta, fmnist, "")  # rendered once per dataset, with an example slot
    qs = questions_from(meta, "What does {} look like?\nHow is {} shaped?")
    assert [q.name for q in qs] == ["meta/questions/0", "meta/questions/1"]
    assert render(qs[0], fmnist, "ankle boot") == "What does an ankle boot look like? Answer in one sentence."
    assert qs[0].source_hash != qs[1].source_hash and qs[0].template_set == "meta"


def test_bad_template_option_is_named(tmp_path, fmnist):
    t = copy_set(tmp_path, "{# intent\n   parse: poem #}\nWhat is {{ class_name }}?")
    with pytest.raises(TextadaptError, match=r"q.j2: parse: 'poem' is not one of"):
        check_templates([t], fmnist)
