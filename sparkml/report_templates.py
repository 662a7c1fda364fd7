"""The report's HTML (sparkml.report): Jinja2 templates, every value escaped by the environment
(autoescape), numbers through the `fmt` filter. A builder renders its section with
`render(name, **values)`; the page template puts the sections together.
"""

from __future__ import annotations

import functools

from markupsafe import Markup

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd}
.grid{display:flex;flex-wrap:wrap;gap:10px}.card{width:170px;font-size:12px;word-break:break-all}
.card img{width:160px;height:160px;object-fit:cover}.note{color:#666;font-size:14px}.bad{color:#a00}"""


def fmt(v, digits: int = 3) -> str:
    """A figure as the report shows it: 3 significant digits below 1, 2 decimals above; - for none."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{max(digits - 1, 1)}f}"
    return str(v)


_MACROS = """
{% macro img(src, alt, width=None) %}<img src="{{ src }}" alt="{{ alt }}"{% if width %} width="{{ width }}"{% endif %}>{% endmacro %}
{% macro table(header, rows) %}<table><tr>{% for h in header %}<th>{{ h }}</th>{% endfor %}</tr>
{%- for r in rows %}<tr>{% for c in r %}<td>{{ c|fmt }}</td>{% endfor %}</tr>{% endfor %}</table>{% endmacro %}
{% macro curves(c) %}{% if c %}<h3>Training curves ({{ c.task }})</h3>
{{ img(c.src, c.task ~ " training curves") }}{% endif %}{% endmacro %}
"""

TEMPLATES = {
    "macros": _MACROS,
    "img": """{% import "macros" as m %}{{ m.img(src, alt, width) }}""",
    "page": """<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>instalearn report</title>
<style>{{ css }}</style></head><body><h1>instalearn: what this run produced</h1>
<p class="note">Lake <code>{{ lake }}</code>.</p>
<ul>{% for title, _ in sections %}<li><a href="#s{{ loop.index0 }}">{{ title }}</a></li>{% endfor %}</ul>
{% if not_run %}<p>Not run (no output in this lake):</p><ul>{% for title, job in not_run %}<li>{{ title }}: run {{ job }}</li>{% endfor %}</ul>
{% endif %}
{% if stale %}<p class="bad">Not shown (stale, partial or unreadable):</p><ul>{% for what, why in stale %}<li>{{ what }}: {{ why }}</li>{% endfor %}</ul>
{% endif %}
{% for title, body in sections %}<h2 id="s{{ loop.index0 }}">{{ title }}</h2>
{{ body }}
{% endfor %}</body></html>
""",
    "accounting": """{% import "macros" as m %}<p>Every stage accounts for its input: input = output + rejected (+ duplicates removed).</p>
<table><tr>{% for h in ["stage → output", "input", "output", "rejected by reason", "duplicates by kind", "balanced", "seconds"] %}<th>{{ h }}</th>{% endfor %}</tr>
{%- for r in rows %}<tr><td>{{ r.what }}</td><td>{{ r.input|fmt }}</td><td>{{ r.output|fmt }}</td><td>{{ r.rejected }}</td><td>{{ r.duplicates }}</td>
<td>{% if r.balanced %}yes{% else %}<span class="bad">NO</span>{% endif %}</td><td>{{ r.seconds|fmt }}</td></tr>{% endfor %}</table>
{% if rejected %}<h3>Rejected examples</h3><div class="grid">
{%- for c in rejected %}<div class="card">{% if c.src %}{{ m.img(c.src, c.post_id) }}{% else %}<p class="note">(no picture: the bytes do not decode)</p>{% endif %}
<br><b>{{ c.reason }}</b> ({{ c.stage }})<br>{{ c.post_id }}<br><span class="note">{{ c.detail }}</span></div>{% endfor %}</div>
{% endif %}
{% if duplicates %}<h3>Near-duplicates found (the hardest: most bits apart)</h3><div class="grid">
{%- for c in duplicates %}<div class="card" style="width:260px">{% for p in c.pics %}{{ m.img(p.src, p.alt, 120) }}{% endfor %}
<br>{{ c.post_id }} re-posts {{ c.canonical }} ({{ c.bits }} bits apart)</div>{% endfor %}</div>
{% endif %}""",
    "city": """{% import "macros" as m_ %}<p>Test top-1 <b>{{ test.top1|fmt }}</b> on {{ test.rows }} test images (published 26.3% on a 200K
subset; chance {{ chance|fmt }}). {{ m.world }} process(es) on {{ m.device }}.</p>
{{ m_.table(["city", "test accuracy (this run)", "published"], rows) }}
{{ m_.img(per_class, "per-city accuracy") }}
{{ m_.img(confusion, "confusion matrix") }}
{{ m_.curves(curves) }}""",
    "retrieval": """{% import "macros" as m_ %}<p>Query = the city's name, relevant = a test image of that city; {{ m.test_images }} test images,
embeddings <code>{{ m.embeddings }}</code> ({{ m.metric }}).</p>
<table><tr>{% for h in ["city", "P@100 (%)", "AP (%)", "relevant", "chance P (%)"] %}<th>{{ h }}</th>{% endfor %}</tr>
{%- for r in rows %}<tr>{% for c in r %}<td>{{ c|fmt }}</td>{% endfor %}</tr>{% endfor %}
<tr><td><b>mean</b></td><td>{{ m.mean.mean_precision_at_100|fmt }}</td><td>{{ m.mean.mean_average_precision|fmt }}</td><td></td><td></td></tr>
<tr><td>published (GoogLeNet regressor, InstaCities1M)</td><td>{{ published.mean_precision_at_100|fmt }}</td>
<td>{{ published.mean_average_precision|fmt }}</td><td></td><td></td></tr></table>
<h3>Retrieval examples (the original's queries)</h3>
{% if sheets is none %}<p class="note">This evaluate_retrieval run did not rank the example queries: run jobs/evaluate_retrieval.py again.</p>
{% else %}{% for s in sheets %}{{ m_.img(s.src, s.alt) }}
{% endfor %}{% endif %}
{% if unknown %}<p class="note">Not in this run's LDA vocabulary: {{ unknown|join(", ") }}.</p>
{% endif %}{{ m_.curves(curves) }}""",
    "likability": """{% import "macros" as m %}{% if svm %}<p>Average precision on the test split (positive rate {{ svm.rate }}: a classifier that knows
nothing scores about that).</p>
{{ m.table(["classifier", "layer", "variant", "test AP", "published"], svm.rows) }}
{% set r = svm.ranked %}{% if r.get("note") %}<p class="note">{{ r.note }}</p>
{% else %}<h3>Top {{ r.top }} test images by the {{ r.title }}</h3>
{{ m.img(r.top_sheet.src, r.top_sheet.alt) }}
<h3>Bottom {{ r.bottom }}</h3>
{{ m.img(r.bottom_sheet.src, r.bottom_sheet.alt) }}
{% endif %}{% endif %}
{% if cnn %}<h3>Fine-tuned CNN</h3><p>Test accuracy {{ cnn.test.get("accuracy")|fmt }} (published 57%), AP {{ cnn.test.get("ap")|fmt }}.</p>
{{ m.curves(curves) }}{% endif %}""",
    "exploration": """{% import "macros" as m_ %}<p>{{ m.rows }} images, features: {{ m.features }}; K-Means k = {{ m.k }} (best silhouette at
k = {{ m.best_silhouette_k }}).</p>
{{ m_.table(["k", "silhouette"], silhouettes) }}
{{ m_.img("explore/silhouette.png", "silhouette per k") }}
{{ m_.table(["cluster", "images", "labels"], clusters) }}
{% if m.get("labels_note") %}<p class="note">{{ m.labels_note }}</p>
{% endif %}{% if skipped %}<p class="note">k not measured: {{ skipped }}</p>
{% endif %}<h3>t-SNE map</h3>
{{ m_.img("explore/tsne.png", "t-SNE map") }}
<h3>Clusters (closest to the centre first)</h3>
{% for c, name in m.sheets.items() %}{{ m_.img("explore/" ~ name, "cluster " ~ c) }}
{% endfor %}""",
    "scoring": """{% import "macros" as m %}<p>{{ s.output_rows }} of {{ s.input_rows }} new images scored from <code>{{ s.input }}</code>
({{ s.images_per_s }} images/s); rejected: {{ rejected }}.</p>
{{ m.table(["model", "version", "rows"], rows) }}
{% if missing %}<p>Not scored with:</p><ul>{% for k, v in missing.items() %}<li>{{ k }}: {{ v }}</li>{% endfor %}</ul>
{% endif %}""",
}


@functools.lru_cache(maxsize=1)
def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.DictLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=False)
    env.filters["fmt"] = fmt
    return env


def render(name: str, **values) -> Markup:
    """Template `name` with the values (escaped); Markup, so a page can hold it as it is."""
    return Markup(_environment().get_template(name).render(css=Markup(CSS), **values))
