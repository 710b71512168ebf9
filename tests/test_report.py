"""The HTML report, built from a real (small) run's objects: Fashion-MNIST test images, the tiny
open_clip backbone, TAP heads trained on hand-written descriptions, a real DuckDB file."""

import base64
import copy
import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from textadapt import harness, pipeline, plots
from textadapt.config import RunOptions
from textadapt.datasets import load_test_images, restrict
from textadapt.encoders import encode_images
from textadapt.report import RunReport, best_adapted, html_path, render_html, render_markdown, write_report
from textadapt.scoring import predict, score
from textadapt.store import Generation, Store

EVIL = '<script>alert("pwned")</script> & a <b>bold</b> claim'
DESCRIPTIONS = {  # set -> class -> texts, as an LLM might have written them
    "generic": {
        "T-shirt or top": ["a short-sleeved cotton top", "a plain t-shirt with a round neck", EVIL],
        "trouser": ["long trousers with two legs", "a pair of pants with a waistband"],
        "pullover": ["a knitted pullover with long sleeves", "a warm wool sweater"],
    },
    "targeted": {
        "T-shirt or top": ["a grey photo of a t-shirt seen from the front", "a small greyscale top on black"],
        "trouser": ["a greyscale photo of two long trouser legs", "trousers laid flat, seen from above"],
        "pullover": ["a greyscale pullover with sleeves spread out", "a thick jumper photographed flat"],
    },
}


class Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts (tags inside a cell dropped, entities decoded)."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tables, self._row, self._cell = [], None, None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def gain(delta, low, high) -> str:
    """A delta and its interval as the report shows them, from DuckDB's numbers."""
    return f"{100 * delta:+.1f} ({100 * low:+.1f}, {100 * high:+.1f})"


def table_starting(html: str, *header: str) -> list[list[str]]:
    found = [t for t in Tables(html).tables if t and tuple(t[0][: len(header)]) == header]
    assert len(found) == 1, f"expected one table with header {header}"
    return found[0]


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, tiny_backbone, fmnist):
    """A real run's pieces, scored and saved once per module (training and encoding take a minute here)."""
    home = tmp_path_factory.mktemp("report-home")
    spec, images = restrict(fmnist, load_test_images(fmnist, home), 3, 60)
    store = Store(home / "textadapt.duckdb")
    run_id = "fashion-mnist-test-0001"
    store.start_run(run_id, spec.name, {})
    entries, tokens = [], {}
    for set_name, per_class in DESCRIPTIONS.items():
        for class_name, texts in per_class.items():
            for k, text in enumerate(texts):
                key = f"{set_name}-{class_name}-{k}"
                tokens[key] = (10 + k, len(text.split()))
                store.add_generation(
                    Generation(
                        key=key,
                        dataset=spec.name,
                        class_name=class_name,
                        template=f"{set_name}/look",
                        template_hash="h",
                        model="test",
                        prompt="?",
                        params={},
                        sample_index=k,
                        raw_text=text,
                        description=text,
                        rejected=None,
                        prompt_tokens=tokens[key][0],
                        completion_tokens=tokens[key][1],
                        seconds=0.5,
                    )
                )
                entries.append((set_name, key, spec.classes.index(class_name), text, None))
    selection = pipeline.select(entries)
    store.link_generations(run_id, selection.links)
    options = RunOptions(dataset="fashion-mnist", methods=["tap-head", "zs-head"], seed=1, seeds=2, steps=20)
    config = harness.HarnessConfig.from_options(options, steps=20)
    free, _ = harness.training_free(tiny_backbone, spec, store, selection.sets, set())
    trained, _ = harness.adapted(
        tiny_backbone, spec, store, selection.sets, harness.teacher_prototypes(free), config, log=lambda *_: None
    )
    image_emb, _ = encode_images(tiny_backbone, images, store)
    results = harness.evaluate(free + trained, image_emb, images.labels, len(spec.classes), ["plain"], None)
    # A method the report has never heard of: it must show up everywhere all the same.
    w = np.random.default_rng(0).normal(size=trained[0].weights[0].shape)
    s = score(predict(image_emb, w), images.labels, 3)
    results.append(
        harness.MethodResult("future-method:x", harness.Classifier("future-method:x", "adapted", [w], [0]), "plain", s, [s])
    )
    gains = harness.gains(results, images.labels, len(spec.classes))
    best = harness.save(store, run_id, spec, results, gains, images)
    scores = {r.method: r.score for r in results}
    heads = {c.method: c.heads[0] for c in trained}
    report = RunReport(
        run_id=run_id,
        spec=spec,
        backbone_spec="textadapt-tiny:random",
        backbone_id=tiny_backbone.id,
        untrained=True,
        arch=tiny_backbone.arch,
        llm="test",
        image_source=images.source,
        n_images=len(images),
        generation=pipeline.GenerationStats(planned=len(entries), cached=len(entries), made=0),
        sets=selection.sets,
        scores=scores,
        heads=heads,
        best_baseline=best,
        text_encoder_calls=0,
        image_encoder_calls=len(images),
        steps=20,
        seed=1,
        stage_seconds={"generation": 1.5, "training": 0.25, "scoring": 0.125},
        examples={c: DESCRIPTIONS["generic"][c][-1:] for c in spec.classes},
        results=results,
        seeds=config.seeds,
        llm_usage=store.llm_usage(run_id),
        gains=gains,
    )
    yield report, store, tokens
    store.close()


@pytest.fixture
def run(scored_run):
    """The scored run: the report (a copy each test may change), the store (open), and the tokens per generation."""
    report, store, tokens = scored_run
    return copy.deepcopy(report), store, tokens


def test_html_report_is_self_contained_and_matches_the_scores(run, tmp_path):
    report, store, tokens = run
    md = write_report(report, tmp_path / "reports")
    page = html_path(md).read_text(encoding="utf-8")
    assert html_path(md).parent == md.parent and html_path(md).suffix == ".html"

    # Self-contained: nothing fetched from anywhere, every image inline.
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<link" not in page and "@import" not in page
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    assert len(images) == page.count("<img") == 4  # gains, per class, confusion matrix, time per stage
    for _, data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 150

    # LLM text is escaped: the page has no script at all, and the description reads as written.
    assert "<script" not in page.lower() and "<b>bold" not in page
    assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt; &amp; a &lt;b&gt;bold&lt;/b&gt; claim" in page
    examples = table_starting(page, "class", "generic", "targeted", "examples")
    assert examples[1][0] == "T-shirt or top" and examples[1][1:3] == ["3", "2"] and examples[1][3] == EVIL

    # Per-class numbers are the ones DuckDB holds for this run, for every method (the unknown one too).
    methods = [r.method for r in report.results]
    assert "future-method:x" in methods and "zs-head:targeted" in methods
    per_class = table_starting(page, "class", "images", *methods)
    rows = store.sql(
        "SELECT method, class_index, n_images, accuracy, delta, delta_low, delta_high FROM class_results "
        f"WHERE run_id = '{report.run_id}'"
    )[1]
    db = {(m, i): (n, acc, (delta, low, high)) for m, i, n, acc, delta, low, high in rows}
    kinds = dict(store.sql(f"SELECT method, kind FROM results WHERE run_id = '{report.run_id}'")[1])
    adapted = [m for m in methods if kinds[m] == "adapted"]
    assert len(adapted) == 5  # tap-head and zs-head on two sets, and the unknown one
    assert per_class[0][2 + len(methods) :] == [f"delta {m}" for m in adapted]
    for i, row in enumerate(per_class[1:]):
        assert row[0] == report.spec.classes[i] and row[1] == str(db[(methods[0], i)][0])
        assert row[2 : 2 + len(methods)] == [f"{100 * db[(m, i)][1]:.1f}" for m in methods]
        assert row[2 + len(methods) :] == [gain(*db[(m, i)][2]) for m in adapted]
        assert all(low <= delta <= high for m in adapted for delta, low, high in [db[(m, i)][2]])

    gains = table_starting(page, "method", "kind", "scoring", "training texts", "top-1 %")
    results = {
        m: row
        for m, *row in store.sql(
            "SELECT method, kind, top1, top1_std, mean_per_class, mean_per_class_std, baseline, delta_top1, delta_top1_low, "
            "delta_top1_high, delta_mean_per_class, delta_mean_per_class_low, delta_mean_per_class_high "
            f"FROM results WHERE run_id = '{report.run_id}'"
        )[1]
    }
    assert [r[0] for r in gains[1:]] == methods

    def pm(x, std):
        return f"{100 * x:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")

    best_top1, best_mean = results[report.best_baseline][1], results[report.best_baseline][3]
    for r in gains[1:]:
        kind, top1, top1_std, mean, mean_std, baseline, *deltas = results[r[0]]
        assert baseline == report.best_baseline and deltas[0] == pytest.approx(top1 - best_top1)
        assert deltas[3] == pytest.approx(mean - best_mean)
        if r[0] == report.best_baseline:
            assert r[4:] == [pm(top1, top1_std), pm(mean, mean_std), "reference", "reference"]
        else:
            assert r[1] == kind and r[4:] == [pm(top1, top1_std), pm(mean, mean_std), gain(*deltas[:3]), gain(*deltas[3:])]
    assert results["tap-head:generic"][2] is not None  # two seeds: a spread is shown
    assert gains[methods.index("tap-head:generic") + 1][3] == str(len(report.sets["generic"].texts))

    # The confusion matrix is the best adapted method's.
    top = best_adapted(report)
    assert top == max(adapted, key=lambda m: results[m][1])
    assert f"Confusion matrix: <code>{top}</code>" in page

    # Tokens: the sum over the run's generations, per template set and in all.
    usage = table_starting(page, "template set", "generations", "prompt tokens", "completion tokens")
    assert usage[1][:4] == [
        "generic",
        "7",
        str(sum(p for k, (p, _) in tokens.items() if k.startswith("generic"))),
        str(sum(c for k, (_, c) in tokens.items() if k.startswith("generic"))),
    ]
    assert usage[-1][:4] == [
        "all",
        str(len(tokens)),
        str(sum(p for p, _ in tokens.values())),
        str(sum(c for _, c in tokens.values())),
    ]
    assert table_starting(page, "stage", "seconds")[1:] == [["generation", "1.5"], ["training", "0.2"], ["scoring", "0.1"]]
    assert page.startswith("<!DOCTYPE html>") and "UNTRAINED BACKBONE" in page


def test_confusion_matrix_agrees_with_the_per_class_accuracy(run):
    report, _, _ = run
    for r in report.results:
        s, seeds = r.score, len(r.per_seed)  # the mean over seeds; its confusion counts are summed over them
        assert s.confusion.shape == (3, 3)
        assert (s.confusion.sum(axis=1) == seeds * s.n_per_class).all()
        np.testing.assert_allclose(np.diag(s.confusion) / (seeds * s.n_per_class), s.per_class)
        assert np.trace(s.confusion) / s.confusion.sum() == pytest.approx(s.top1)
        for p in r.per_seed:
            assert (p.confusion.sum(axis=1) == p.n_per_class).all()


def test_a_train_only_report_says_so_and_draws_no_scores(run, tmp_path):
    report, _, _ = run
    report.scores, report.results, report.best_baseline = {}, [], None
    page = html_path(write_report(report, tmp_path / "r")).read_text()
    assert "trains the heads without scoring them" in page
    assert page.count("<img") == 1  # time per stage only


def test_many_classes_keep_the_largest_gains_and_losses():
    rng = np.random.default_rng(3)
    base = rng.uniform(size=300)
    head = base.copy()
    head[17], head[230] = base[17] + 0.9, base[230] - 0.9  # one big gain, one big loss
    shown = plots.shown_classes({"zs": base, "head": head}, "zs")
    assert len(shown) == plots.MAX_CLASSES_SHOWN and {17, 230} <= set(shown.tolist())
    assert list(shown) == sorted(shown)
    png = plots.per_class_accuracy([f"class {i}" for i in range(300)], {"zs": base, "head": head}, "zs")
    assert png.startswith(b"\x89PNG")


def test_stored_gains_are_the_scores_with_intervals_around_them(run):
    report, store, _ = run
    best = report.scores[report.best_baseline]
    for r in report.results:
        # the interval's point is the reported delta (correctness averaged over seeds = the mean over seeds' accuracy)
        assert report.gains.top1_interval(r.method).value == pytest.approx(r.score.top1 - best.top1, abs=1e-12)
        m = report.gains.methods.index(r.method)
        np.testing.assert_allclose(report.gains.per_class[m], r.score.per_class - best.per_class, atol=1e-12)
        # every seed's prediction of every test image is in the cache, and scores what the report says
        predicted = store.predictions(report.run_id, r.method)
        _, labels = store.run_images(report.run_id)
        assert predicted.shape == (len(r.per_seed), report.n_images)
        assert (predicted == labels).mean(axis=1).tolist() == pytest.approx([s.top1 for s in r.per_seed])
    hashes, _ = store.run_images(report.run_id)
    embedded = store.sql(
        "SELECT count(DISTINCT image_hash) FROM image_embeddings WHERE image_hash IN "
        f"(SELECT image_hash FROM run_images WHERE run_id = '{report.run_id}')"
    )[1][0][0]
    assert embedded == len(set(hashes)) > 1  # the hashes are the image embeddings' keys


def test_names_and_texts_cannot_add_markup_to_either_report(run, tmp_path):
    from markdown_it import MarkdownIt

    report, _, _ = run
    evil = ["top | <script>alert(1)</script>", "trouser `x` **y** [z](http://e.com)", "pull\\over_"]
    report.spec = report.spec.model_copy(update={"classes": evil})
    report.examples = {evil[0]: ["a | b <img src=x onerror=alert(1)>"]}
    path = write_report(report, tmp_path)
    html, markdown = html_path(path).read_text(), path.read_text()
    # The Markdown as a Markdown renderer (GFM tables, raw HTML allowed) shows it: the same text, no tag, no link.
    rendered = MarkdownIt("commonmark").enable("table").render(markdown)
    for page in (html, rendered):
        assert "<script" not in page and "<img src=x" not in page and "<a href" not in page
        per_class = table_starting(page, "class", "images")
        assert [row[0] for row in per_class[1:]] == evil and all(len(row) == len(per_class[0]) for row in per_class)
        examples = table_starting(page, "class", "generic", "targeted", "examples")
        assert examples[1][-1].strip('"') == "a | b <img src=x onerror=alert(1)>"
    # Every HTML table scrolls inside its own container, so a wide one never widens the page.
    assert html.count("<table") == html.count('<div class="scroll"><table>') >= 6
    assert re.search(r"\.scroll \{[^}]*overflow-x: auto", html) and re.search(r"img \{[^}]*max-width: 100%", html)


def test_the_untrained_warning_is_one_text_in_every_output(run, tmp_path):
    from textadapt.report import gains_markdown, untrained_warning

    report, _, _ = run
    path = write_report(report, tmp_path)
    warning = "".join(p if isinstance(p, str) else p.text for p in untrained_warning(report.arch).parts)
    html = re.sub(r"<[^>]+>", "", html_path(path).read_text())
    assert warning in html.replace("&#39;", "'")
    assert warning in path.read_text().replace("`", "") and "UNTRAINED BACKBONE" not in gains_markdown(report)
    report.untrained = False
    assert "UNTRAINED" not in render_markdown(report) and "UNTRAINED" not in render_html(report)
