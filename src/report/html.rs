//! The report page: one self-contained HTML file (inline CSS and SVG, no script, no network),
//! rendered by minijinja with HTML autoescaping on everything but the charts we drew ourselves —
//! model answers are untrusted text and must show as text.

use minijinja::{AutoEscape, Environment, Value};
use serde_json::json;

use super::{charts, ReportData, ReportError};

const TEMPLATE: &str = r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fuselab report: {{ r.experiment }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.sig { color: #0a6; font-weight: bold; } .worse { color: #b22; font-weight: bold; } .paper { color: #557; font-style: italic; }
.muted { color: #777; font-size: .85em; }
pre { white-space: pre-wrap; word-break: break-word; background: #fafafa; border: 1px solid #eee; padding: .5em; margin: 0; max-height: 18em; overflow: auto; font-size: .85em; }
code { font-size: .9em; } .charts { display: flex; flex-wrap: wrap; gap: 1em; } figure { margin: 0; }
.warn { background: #fff4e0; border: 1px solid #f0c070; padding: .5em; }
</style>
</head>
<body>
<h1>{{ r.experiment }}</h1>
<p class="muted">invocation <code>{{ r.invocation }}</code> · started {{ r.started_at }} · fuselab {{ r.fuselab_version }} ·
commit <code>{{ r.git_commit or "unknown" }}</code>{% if r.git_dirty %} <span class="warn">working tree dirty: the stored diff is in the run records</span>{% endif %}</p>

{% if r.variant %}<p class="warn">Variant run: {% for o in r.variant.overrides %}<code>--set {{ o }}</code> {% endfor %}— shown beside the default run <code>{{ r.variant.default_invocation }}</code> (columns marked “(default)”).</p>{% endif %}
<h2 id="benchmarks">Benchmarks</h2>
{% if not r.benches %}<p>No evaluation results in this experiment.</p>{% endif %}
{% if r.benches %}
<table>
<tr><th>benchmark</th>{% for m in r.models %}<th>{{ m[0] }}<br><span class="muted">{{ m[1] }}</span></th>{% endfor %}</tr>
{% for b in r.benches %}
<tr><td>{{ b.bench }}<br><span class="muted">{{ b.kind }}{% if b.scale == "rating" %}, 1–10{% else %}, %{% endif %}</span></td>
{% for m in r.models %}{% set c = cell(b, m[0]) %}
<td class="num">{% if c %}{{ "%.2f"|format(c.score) }} <span class="muted">[{{ "%.2f"|format(c.lo) }}, {{ "%.2f"|format(c.hi) }}]</span>
{% if c.vs_base %}<br><span class="{% if c.vs_base.significant and c.vs_base.diff > 0 %}sig{% elif c.vs_base.significant %}worse{% else %}muted{% endif %}" title="{{ c.vs_base.test }} on {{ c.vs_base.paired_items }} paired items">
{{ "%+.2f"|format(c.vs_base.diff) }} vs base, p={{ "%.2g"|format(c.vs_base.p) }} (Holm {{ "%.2g"|format(c.vs_base.p_holm) }}){% if c.vs_base.significant %} ★{% endif %}</span>{% endif %}
<br><span class="muted">n={{ c.n }}{% if c.n_unscored %}, <b>{{ c.n_unscored }} unscored</b>{% endif %}</span>
{% set pv = b.paper[m[1]] if b.paper else none %}{% if pv is defined and pv is not none %}<br><span class="paper">paper: {{ "%.1f"|format(pv) }}</span>{% endif %}
{% else %}–{% endif %}</td>{% endfor %}</tr>
{% endfor %}
</table>
{% if r.benches|selectattr("paper")|list %}<p class="muted">paper: the FuseChat-3.0 paper's score for the same role (base, SFT, fused) on this benchmark (METHOD.md), with its own harness and the real checkpoints.</p>{% endif %}
<p class="muted">Intervals: 95% bootstrap over items. ★ = different from the base at family-wise 0.05. {{ r.multiple_comparison_note }}</p>
<div class="charts">{% for svg in bars %}<figure>{{ svg }}</figure>{% endfor %}</div>
{% endif %}

{% if r.category_means %}
<h2 id="categories">Per category</h2>
<table>
<tr><th>model</th>{% for c in categories %}<th>{{ c }}</th>{% endfor %}</tr>
{% for m in r.models %}<tr><td>{{ m[0] }}</td>{% for c in categories %}<td class="num">{% set v = r.category_means[m[0]][c] if r.category_means[m[0]] else none %}{% if v is not none %}{{ "%.2f"|format(v) }}{% else %}–{% endif %}</td>{% endfor %}</tr>{% endfor %}
</table>
<p class="muted">Plain mean of the benchmark scores in each category (the paper's convention); rating-scale benchmarks are not averaged with percentages.</p>
{% endif %}

{% if r.fusion %}{% set f = r.fusion %}
<h2 id="fusion">Fusion</h2>
<table>
<tr><th>comparison</th><th>items</th><th>means (%)</th><th>difference [95%]</th><th>p</th></tr>
{% for t in f.tests %}<tr><td>{{ t.a }} vs {{ t.b }}</td><td class="num">{{ t.items }}</td><td class="num">{{ "%.2f"|format(t.a_mean) }} vs {{ "%.2f"|format(t.b_mean) }}</td>
<td class="num {% if t.p < 0.01 and t.diff > 0 %}sig{% elif t.p < 0.01 %}worse{% endif %}">{{ "%+.2f"|format(t.diff) }} [{{ "%+.2f"|format(t.diff_lo) }}, {{ "%+.2f"|format(t.diff_hi) }}]</td><td class="num" title="{{ t.test }}">{{ "%.2g"|format(t.p) }}</td></tr>{% endfor %}
</table>
<p class="muted">Paired over every held-out item of every percent-scale benchmark (exact McNemar test on binary items).</p>
{% if f.gaps %}<table>
<tr><th>category</th><th>base</th><th>{{ f.fused }}</th><th>best source</th><th>gap closed</th></tr>
{% for g in f.gaps %}<tr><td>{{ g.category }}</td><td class="num">{{ "%.2f"|format(g.base) }}</td><td class="num">{{ "%.2f"|format(g.fused) }}</td><td class="num">{{ g.best_source }} {{ "%.2f"|format(g.best_source_score) }}</td>
<td class="num {% if g.closed is not none and g.closed >= 0.5 %}sig{% endif %}">{% if g.closed is not none %}{{ "%.0f"|format(100 * g.closed) }}%{% else %}no source above base{% endif %}</td></tr>{% endfor %}
</table>
<p class="muted">Gap closed = (fused − base) / (best source − base) per category. Overall: {{ f.fused }} {{ "%.2f"|format(f.fused_overall) }}; sources {% for s, v in f.source_overall|items %}{{ s }} {{ "%.2f"|format(v) }}{% if not loop.last %}, {% endif %}{% endfor %}.
{% if f.beats_every_source is not none %}The fused target {% if f.beats_every_source %}<b>beats every single source</b>{% else %}does <b>not</b> beat every single source{% endif %} on average.{% endif %}</p>{% endif %}
{% endif %}

{% if curves %}
<h2 id="training">Training</h2>
<div class="charts">{% for svg in curves %}<figure>{{ svg }}</figure>{% endfor %}</div>
{% endif %}

{% if r.composition %}
<h2 id="composition">Dataset composition</h2>
<table>
<tr>{% for k in composition_cols %}<th>{{ k }}</th>{% endfor %}</tr>
{% for row in composition_rows %}<tr>{% for k in composition_cols %}<td>{{ row[k] }}</td>{% endfor %}</tr>{% endfor %}
</table>
{% endif %}

{% if r.examples %}
<h2 id="answers">Answers side by side</h2>
{% for e in r.examples %}
<h3>{{ e.bench }} · {{ e.item }}</h3>
<pre>{{ e.prompt }}</pre>
<table><tr>{% for a in e.answers %}<th>{{ a[0] }}<br><span class="muted">{{ a[2] }}{% if a[3] is not none %} · {{ a[3] }}{% endif %}</span></th>{% endfor %}</tr>
<tr>{% for a in e.answers %}<td><pre>{{ a[1] }}</pre></td>{% endfor %}</tr></table>
{% endfor %}
{% endif %}

<h2 id="provenance">Provenance</h2>
<p>Every number above comes from the step outputs below; each line's command lists the data, code and parameters behind it.</p>
<table>
<tr><th>step</th><th>outputs</th><th>run</th><th>commit</th><th>parameters</th><th>reproduce</th></tr>
{% for p in r.provenance %}
<tr><td>{{ p.step }}</td><td><code>{{ p.digest[:16] }}</code></td><td><code>{{ p.run_id }}</code></td>
<td><code>{{ (p.git_commit or "unknown")[:12] }}</code>{% if p.git_dirty %} <b>dirty</b>{% endif %}</td>
<td><pre>{{ p.params | tojson(indent=1) }}</pre></td><td><code>{{ p.lineage_command }}</code></td></tr>
{% endfor %}
</table>
</body>
</html>
"#;

/// Render the page.
pub fn render(r: &ReportData) -> Result<String, ReportError> {
    let rerr = |e: minijinja::Error| ReportError::Render(format!("{e:#}"));
    let mut env = Environment::new();
    env.set_auto_escape_callback(|_| AutoEscape::Html);
    let data = serde_json::to_value(r).map_err(|e| ReportError::Render(e.to_string()))?;
    let benches = r.benches.clone();
    env.add_function("cell", move |b: Value, model: String| -> Value {
        let name = b
            .get_attr("bench")
            .ok()
            .map(|v| v.to_string())
            .unwrap_or_default();
        benches
            .iter()
            .find(|x| x.bench == name)
            .and_then(|x| x.cells.iter().find(|c| c.model == model))
            .map(|c| Value::from(minijinja::value::Serde(c)))
            .unwrap_or(Value::from(()))
    });
    env.add_template("report", TEMPLATE).map_err(rerr)?;
    let models: Vec<String> = r.models.iter().map(|m| m.0.clone()).collect();
    let mut bars = Vec::new();
    for (scale, max, label) in [
        ("percent", 100.0, "score (%)"),
        ("rating", 10.0, "rating (1-10)"),
    ] {
        let rows: Vec<_> = r.benches.iter().filter(|b| b.scale == scale).collect();
        if !rows.is_empty() {
            bars.push(Value::from_safe_string(charts::bench_bars(
                &rows, &models, max, label,
            )?));
        }
    }
    let mut curves = Vec::new();
    for c in &r.curves {
        for m in charts::curve_metrics(c) {
            if let Some(svg) = charts::curve(c, &m)? {
                curves.push(Value::from_safe_string(svg));
            }
        }
    }
    let mut categories: Vec<String> = r
        .category_means
        .values()
        .flat_map(|m| m.keys().cloned())
        .collect();
    categories.sort();
    categories.dedup();
    if let Some(i) = categories.iter().position(|c| c == "overall") {
        let o = categories.remove(i);
        categories.push(o);
    }
    let (mut cols, mut rows) = (Vec::new(), Vec::new());
    if let Some(serde_json::Value::Array(list)) = &r.composition {
        for row in list {
            if let serde_json::Value::Object(m) = row {
                for k in m.keys() {
                    if !cols.contains(k) {
                        cols.push(k.clone());
                    }
                }
                rows.push(row.clone());
            }
        }
    }
    let ctx = json!({"r": data, "categories": categories, "composition_cols": cols, "composition_rows": rows});
    let mut ctx = Value::from(minijinja::value::Serde(&ctx));
    ctx = minijinja::context! { bars => bars, curves => curves, ..ctx };
    env.get_template("report")
        .map_err(rerr)?
        .render(ctx)
        .map_err(rerr)
}
