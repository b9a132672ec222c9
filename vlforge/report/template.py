"""The report page's Jinja2 template: one HTML file with its CSS and a few lines of plain JS.

Every number read from manifest.json or metrics.jsonl is printed through the `num` macro, which
puts the exact value in `data-value` and its name in `data-metric` (the test reads them back).
The sample grid is split into pages that JS shows one at a time; without JS every page shows.
Nothing is fetched: images are data URIs, plots inline SVG, the favicon an empty data URI.
"""

from __future__ import annotations

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{{ title }}</title>
<style>
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d2330; background: #f6f7f9; }
header { background: #1d2330; color: #fff; padding: 16px 28px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 2px 0; color: #c9cfdb; font-size: 12px; }
nav { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #dde1e8; padding: 6px 28px; z-index: 2; }
nav a { margin-right: 16px; color: #3366cc; text-decoration: none; }
main { padding: 8px 28px 40px; }
section { background: #fff; border: 1px solid #dde1e8; border-radius: 6px; padding: 12px 18px; margin: 16px 0; }
h2 { margin: 4px 0 10px; font-size: 18px; }
h3 { margin: 14px 0 6px; font-size: 15px; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; }
.card { border: 1px solid #dde1e8; border-radius: 6px; padding: 8px 12px; min-width: 120px; }
.card .label { color: #5a6273; font-size: 12px; }
.card .num { font-size: 20px; font-weight: 600; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { border-bottom: 1px solid #e6e9ef; padding: 3px 10px; text-align: left; vertical-align: top; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.reasons { color: #5a6273; font-size: 12px; }
.plots { display: flex; flex-wrap: wrap; gap: 14px; }
.plot svg { max-width: 100%; height: auto; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 14px; }
.sample { border: 1px solid #dde1e8; border-radius: 6px; padding: 8px; font-size: 12px; overflow-wrap: anywhere; }
.sample img { width: 100%; height: auto; border-radius: 4px; background: #eee; }
.sample .caption { font-size: 14px; font-weight: 600; margin: 6px 0; }
.sample .key { color: #5a6273; font-family: ui-monospace, monospace; }
.sample ul { margin: 2px 0 6px; padding-left: 18px; }
.sample h4 { margin: 6px 0 2px; font-size: 12px; color: #5a6273; text-transform: uppercase; letter-spacing: .04em; }
.chip { display: inline-block; background: #eef1f6; border-radius: 10px; padding: 0 7px; margin: 1px 2px; }
.neg { color: #b02a1a; }
.rew { color: #8a5a00; }
.score { color: #5a6273; font-variant-numeric: tabular-nums; }
.pager button { margin: 0 3px 8px 0; padding: 3px 10px; border: 1px solid #c5cbd6; background: #fff; border-radius: 4px; cursor: pointer; }
.pager button.on { background: #3366cc; color: #fff; border-color: #3366cc; }
.muted { color: #5a6273; }
.page[hidden] { display: none; }
</style>
</head>
<body>
{%- macro num(metric, value) -%}
<span class="num" data-metric="{{ metric }}" data-value="{{ value }}">{{ value | fmt }}</span>
{%- endmacro %}
<header>
<h1>{{ title }}</h1>
<p>corpus: {{ corpus_dir }}</p>
<p>samples shown from: {{ shard_origin }}</p>
{% if run %}<p>training run: {{ run.path }}</p>{% endif %}
<p>written {{ generated }} by vlforge {{ version }}</p>
</header>
<nav>
<a href="#funnel">Funnel</a><a href="#failures">Failures</a><a href="#distributions">Distributions</a>
{% if stages %}<a href="#stages">Stages</a>{% endif %}<a href="#samples">Samples</a>
{% if run %}<a href="#training">Training</a>{% endif %}
</nav>
<main>
<section id="overview">
<h2>Overview</h2>
<div class="cards">
<div class="card"><div class="label">input rows</div>{{ num("corpus.rows", corpus.rows) }}</div>
<div class="card"><div class="label">samples kept</div>{{ num("corpus.samples", corpus.samples) }}</div>
<div class="card"><div class="label">shards</div>{{ num("corpus.shards", corpus.shards) }}</div>
{% if corpus.http_requests is not none %}<div class="card"><div class="label">HTTP requests</div>{{ num("corpus.http_requests", corpus.http_requests) }}</div>{% endif %}
{% for status, n in corpus.status_counts.items() %}<div class="card"><div class="label">status {{ status }}</div>{{ num("status." ~ status, n) }}</div>{% endfor %}
{% for name, seconds in corpus.timings.items() %}<div class="card"><div class="label">{{ name }}</div>{{ num("timing." ~ name, seconds) }}</div>{% endfor %}
</div>
</section>

<section id="funnel">
<h2>Filter funnel</h2>
<div class="plots"><div class="plot">{{ plots.funnel }}</div>
<table>
<tr><th>stage</th><th class="n">removed</th><th class="n">remaining</th><th>reasons (status:reason rows)</th></tr>
{% for step in corpus.funnel %}
<tr><td>{{ step.stage }}</td><td class="n">{{ num("funnel." ~ step.stage ~ ".removed", step.removed) }}</td>
<td class="n">{{ num("funnel." ~ step.stage ~ ".remaining", step.remaining) }}</td>
<td class="reasons">{% for name, n in step.reasons %}<span class="chip">{{ name }} {{ num("funnel." ~ step.stage ~ "." ~ name, n) }}</span>{% endfor %}</td></tr>
{% endfor %}
{% for stage in stages %}
<tr><td>{{ stage.name }} <span class="muted">({{ stage.dir }})</span></td><td class="n"></td>
<td class="n">{{ num("stage." ~ stage.name ~ ".samples", stage.samples) }}</td><td></td></tr>
{% endfor %}
</table></div>
</section>

<section id="failures">
<h2>Why rows left</h2>
<div class="plots"><div class="plot">{{ plots.reasons }}</div>
<table>
<tr><th>status:reason</th><th class="n">rows</th></tr>
{% for name, n in corpus.reason_counts | dictsort(by="value", reverse=true) %}
<tr><td>{{ name }}</td><td class="n">{{ num("reason." ~ name, n) }}</td></tr>
{% endfor %}
</table></div>
<h3>Failures by host <span class="muted">(top {{ corpus.hosts | length }} by rows lost)</span></h3>
<table>
<tr><th>host</th><th class="n">rows</th><th class="n">ok</th><th class="n">not ok</th><th>reasons</th></tr>
{% for h in corpus.hosts %}
<tr><td>{{ h.host }}</td><td class="n">{{ num("host." ~ h.host ~ ".rows", h.rows) }}</td><td class="n">{{ num("host." ~ h.host ~ ".ok", h.ok) }}</td>
<td class="n">{{ num("host." ~ h.host ~ ".not_ok", h.not_ok) }}</td>
<td class="reasons">{% for name, n in h.reasons %}<span class="chip">{{ name }} {{ num("host." ~ h.host ~ "." ~ name, n) }}</span>{% endfor %}</td></tr>
{% else %}<tr><td colspan="5" class="muted">no failures</td></tr>{% endfor %}
</table>
</section>

<section id="distributions">
<h2>Distributions</h2>
<p class="muted">Sizes, captions and languages over the {{ corpus.samples }} kept rows (stats.parquet);
boxes, tags, scene graphs and mined negatives over {{ shard.scanned }} samples of {{ shard.shards_read }}/{{ shard.shards }} shard(s).</p>
<div class="plots">{% for svg in distribution_plots %}<div class="plot">{{ svg }}</div>{% endfor %}</div>
{% if top_tags %}<h3>Tag frequencies</h3>
<p>{% for name, n in top_tags %}<span class="chip">{{ name }} {{ num("tag." ~ name, n) }}</span>{% endfor %}</p>{% endif %}
{% if languages %}<h3>Languages</h3>
<p>{% for name, n in languages %}<span class="chip">{{ name }} {{ num("language." ~ name, n) }}</span>{% endfor %}</p>{% endif %}
</section>

{% if stages %}
<section id="stages">
<h2>Later stages</h2>
{% for stage in stages %}
<h3>{{ stage.name }} <span class="muted">{{ stage.dir }}</span></h3>
<table>{% for name, value in stage.figures %}<tr><td>{{ name }}</td><td class="n">{{ num("stage." ~ stage.name ~ "." ~ name, value) }}</td></tr>{% endfor %}</table>
{% endfor %}
</section>
{% endif %}

<section id="samples">
<h2>Samples <span class="muted">({{ samples | length }} shown)</span></h2>
{% if pages | length > 1 %}<div class="pager" id="pager">{% for page in pages %}<button type="button" data-page="{{ loop.index0 }}">{{ loop.index }}</button>{% endfor %}</div>{% endif %}
{% for page in pages %}
<div class="grid page" data-page="{{ loop.index0 }}">
{% for s in page %}
<div class="sample" id="sample-{{ s.key }}">
{% if s.image %}<img src="{{ s.image }}" alt="sample {{ s.key }}" width="{{ s.display_w }}" height="{{ s.display_h }}">{% else %}<p class="muted">no image</p>{% endif %}
<div class="caption">{{ s.caption }}</div>
<div class="key">{{ s.key }}{% if s.size %} · {{ s.size }}{% endif %}{% if s.host %} · {{ s.host }}{% endif %}</div>
{% if s.boxes %}<h4>boxes ({{ s.n_boxes }}, {{ s.boxes | length }} drawn)</h4>
<div>{% for b in s.boxes %}<span class="chip">{{ b.label }} <span class="score">{{ "%.2f" | format(b.score) }}</span></span>{% endfor %}</div>{% endif %}
{% if s.tags %}<h4>tags</h4><div>{% for t in s.tags %}<span class="chip">{{ t.name }} <span class="score">{{ t.score }}</span>{% if t.attributes %} ({{ t.attributes | join(", ") }}){% endif %}</span>{% endfor %}</div>{% endif %}
{% if s.sg %}<h4>scene graph</h4><ul>
{% for o in s.sg.objects %}<li>{{ o }}</li>{% endfor %}
{% for r in s.sg.relations %}<li>{{ r }}</li>{% endfor %}
</ul>{% endif %}
{% if s.negatives %}<h4>hard negatives</h4><ul>{% for n in s.negatives %}<li class="neg">{{ n.caption }} <span class="score">{{ n.score }}</span></li>{% endfor %}</ul>{% endif %}
{% if s.rewrites %}<h4>rewrites</h4><ul>{% for r in s.rewrites %}<li class="rew">{{ r.caption }} <span class="score">{{ r.kind }}: {{ r.change }}</span></li>{% endfor %}</ul>{% endif %}
{% if s.positives %}<h4>positives</h4><ul>{% for p in s.positives %}<li>{{ p.caption }} <span class="score">{{ p.score }}</span></li>{% endfor %}</ul>{% endif %}
</div>
{% endfor %}
</div>
{% else %}<p class="muted">No shards to show.</p>
{% endfor %}
</section>

{% if run %}
<section id="training">
<h2>Training run</h2>
<div class="cards">
<div class="card"><div class="label">last step</div>{{ num("run.last_step", run.last_step) }}</div>
<div class="card"><div class="label">records</div>{{ num("run.records", run.records) }}</div>
{% for name, value in run.config %}<div class="card"><div class="label">{{ name }}</div><span class="num">{{ value }}</span></div>{% endfor %}
</div>
<div class="plots">{% for svg in run.plots %}<div class="plot">{{ svg }}</div>{% endfor %}</div>
<h3>Last logged values</h3>
<table><tr><th>key</th><th class="n">step</th><th class="n">value</th><th class="n">min</th></tr>
{% for row in run.train_table %}<tr><td>{{ row.key }}</td><td class="n">{{ row.step }}</td><td class="n">{{ num("run.last." ~ row.key, row.last) }}</td><td class="n">{{ num("run.min." ~ row.key, row.min) }}</td></tr>{% endfor %}
</table>
{% if run.eval_table %}<h3>Evaluation</h3>
<table><tr><th>metric</th><th class="n">step</th><th class="n">last</th><th class="n">best</th></tr>
{% for row in run.eval_table %}<tr><td>{{ row.key }}</td><td class="n">{{ row.step }}</td><td class="n">{{ num("eval.last." ~ row.key, row.last) }}</td><td class="n">{{ num("eval.max." ~ row.key, row.max) }}</td></tr>{% endfor %}
</table>{% else %}<p class="muted">No evaluation records in metrics.jsonl.</p>{% endif %}
</section>
{% endif %}
</main>
<script>
(function () {
  var pager = document.getElementById("pager");
  if (!pager) { return; }
  var pages = document.querySelectorAll(".page");
  var buttons = pager.querySelectorAll("button");
  function show(n) {
    for (var i = 0; i < pages.length; i++) { pages[i].hidden = i !== n; }
    for (var j = 0; j < buttons.length; j++) { buttons[j].className = j === n ? "on" : ""; }
  }
  pager.addEventListener("click", function (event) {
    var page = event.target.getAttribute("data-page");
    if (page !== null) { show(Number(page)); }
  });
  show(0);
})();
</script>
</body>
</html>
"""
