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


def test_generic_is_taps_five_questions_and_targeted_the_same_five_with_the_domain(fmnist):
    """Issue 11 item 4: the two sets differ in one variable, the dataset's domain. TAP's generic questions
    (LaFTer@9ced649, descriptions/*.py; methods.md): describe what a {c} looks like; how can you identify
    a {c}; what does a {c} look like; describe an image from the internet of a {c}; a caption of an image of a {c}."""
    templates = list_templates(Settings().prompts_dir, ["generic", "targeted"])
    generic = {t.name.split("/")[1]: render(t, fmnist, "sandal") for t in templates if t.template_set == "generic"}
    targeted = {t.name.split("/")[1]: render(t, fmnist, "sandal") for t in templates if t.template_set == "targeted"}
    assert generic == {
        "describe": "Describe what a sandal looks like. Answer in one sentence.",
        "identify": "How can you identify a sandal? Answer in one sentence.",
        "look": "What does a sandal look like? Answer in one sentence.",
        "internet": "Describe an image from the internet of a sandal. Answer in one sentence.",
        "caption": "Write a short caption of an image of a sandal. Answer in one sentence.",
    }
    assert set(targeted) == set(generic)  # twins by name
    domain = fmnist.prompting.domain
    for text in targeted.values():
        assert domain in text and text.endswith("Answer in one sentence."), text
        words = set(text.lower().replace("?", " ").split())
        assert not {"apart", "other", "list", "features"} & words, text  # no contrast, no feature list
    assert all(t.parse == "sentence" for t in templates)
    # the moved questions live in their own sets
    names = {t.name for t in list_templates(Settings().prompts_dir)}
    assert {"attributes/features", "contrastive/distinguish"} <= names


def test_a_specs_own_questions_are_its_targeted_set_and_each_text_is_in_its_key(tmp_path):
    from textadapt.datasets import find_spec
    from textadapt.llm import Sampling
    from textadapt.pipeline import plan_generations
    from textadapt.prompts import templates_for

    settings = Settings()
    dtd = find_spec("dtd", settings.dataset_search_path)
    templates = templates_for(settings.prompts_dir, ["generic", "targeted"], dtd)
    assert [t.name for t in templates if t.template_set == "targeted"] == [f"targeted/spec/{i}" for i in range(5)]
    spec_q = [t for t in templates if t.template_set == "targeted"]
    assert render(spec_q[0], dtd, "interlaced") == "Describe what an interlaced texture looks like. Answer in one sentence."
    assert spec_q[0].intent.startswith("the dataset's own targeted question (dtd.toml: prompting.targeted[0])")
    # another set asked alone ignores the spec's questions; "targeted" alone is only them
    assert [t.template_set for t in templates_for(settings.prompts_dir, ["contrastive"], dtd)] == ["contrastive"] * 4
    assert len(templates_for(settings.prompts_dir, ["targeted"], dtd)) == 5

    # Editing one question changes exactly that question's cache keys.
    edited_path = tmp_path / "dtd.toml"
    edited_path.write_text(dtd.path.read_text().replace("texture on a surface?", "texture on a wall?"))
    from textadapt.datasets import load_spec

    edited = load_spec(edited_path)
    sampling = Sampling()
    before = plan_generations(dtd, spec_q, "m", sampling, 2)
    after = plan_generations(edited, templates_for(settings.prompts_dir, ["targeted"], edited), "m", sampling, 2)
    changed = {p.template.name for p, q in zip(before, after) if p.key != q.key}
    assert changed == {"targeted/spec/1"} and len(before) == 47 * 5 * 2


def test_a_bad_spec_question_is_named_with_its_file_and_field(tmp_path, fmnist):
    from textadapt.datasets import load_spec
    from textadapt.prompts import templates_for

    text = fmnist.path.read_text().replace('name = "fashion-mnist"', 'name = "mine"')
    nameless = text.replace("[prompting]\n", '[prompting]\ntargeted = ["What does it look like?"]\n', 1)
    (tmp_path / "mine.toml").write_text(nameless)
    with pytest.raises(TextadaptError, match=r"mine.toml:\d+: field 'prompting.targeted'.*never uses \{\{ class_name \}\}"):
        load_spec(tmp_path / "mine.toml")
    typo = text.replace("[prompting]\n", '[prompting]\ntargeted = ["What is {{ class_name }} in {{ dataset.colour }}?"]\n', 1)
    (tmp_path / "mine.toml").write_text(typo)
    spec = load_spec(tmp_path / "mine.toml")
    with pytest.raises(TextadaptError, match=r"mine.toml#prompting.targeted\[0\]:1: undefined variable: .*'colour'"):
        check_templates(templates_for(Settings().prompts_dir, ["targeted"], spec), spec)
