//! The report of a run: one self-contained HTML page (inline CSS, inline SVG, no script,
//! nothing fetched) with the verdict, the checker's figures and examples, a timeline of the
//! faults, the directory's moves and each node's state, the load chart, and the tables of
//! faults and moves.

use crate::check::{clock, since, Verdict};
use crate::history::{Estate, FaultKind, History, Sample};
use coexist_load::report::html_escape as esc;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

const STYLE: &str = "
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
body { padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h3 { font-size: 1em; margin-bottom: 0.3em; }
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
p.sub, figcaption { color: #666; margin-top: 0; } figcaption { font-size: 0.9em; }
p.verdict { font-size: 1.3em; font-weight: 700; padding: 0.4em 0.7em; display: inline-block; }
p.pass { background: #e3f4e8; color: #0a6b2e; } p.fail { background: #fbe4e4; color: #a11; }
table { border-collapse: collapse; margin: 0.5em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.7em; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; } thead th { background: #f4f4f4; }
td.bad { color: #a11; font-weight: 600; } .text { text-align: left !important; max-width: 40em; }
ul.ex { font-family: ui-monospace, monospace; font-size: 0.85em; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; border: 1px solid #eee; }
span.lg { white-space: nowrap; margin-right: 0.9em; }
span.sw { display: inline-block; width: 1em; height: 0.8em; margin-right: 0.3em; }
";

/// Width of the timeline, its label column and right margin, a row's height (px).
const WIDTH: f64 = 1100.0;
const LEFT: f64 = 120.0;
const RIGHT: f64 = 20.0;
const ROW: f64 = 18.0;
/// Rows a lane may stack before marks lose their labels.
const MAX_ROWS: usize = 4;
/// A node sample covers up to this long (ms) when the next one is late.
const SAMPLE_COVER_MS: i64 = 5_000;

/// A fault kind's name (as in the history files) and colour.
fn kind_style(k: FaultKind) -> (&'static str, &'static str) {
    match k {
        FaultKind::PgFailover => ("pg_failover", "#9467bd"),
        FaultKind::PgFailoverLost => ("pg_failover_lost", "#5b2c83"),
        FaultKind::LdapDown => ("ldap_down", "#17becf"),
        FaultKind::NodeKill => ("node_kill", "#e377c2"),
        FaultKind::NodePartition => ("node_partition", "#bcbd22"),
        FaultKind::HopThrottle => ("hop_throttle", "#ff9896"),
        FaultKind::HopRefuse => ("hop_refuse", "#8c564b"),
        FaultKind::NatsDown => ("nats_down", "#9ecae1"),
        FaultKind::SlowLink => ("slow_link", "#c7c7c7"),
        FaultKind::SlowDisk => ("slow_disk", "#7f7f7f"),
    }
}

fn estate_colour(e: Estate) -> &'static str {
    match e {
        Estate::Onprem => "#6b6ecf",
        Estate::Cloud => "#1f77b4",
    }
}

/// A node's state in a sample: not up, up but not ready (draining), ready.
const NODE_STATES: [(&str, &str); 3] = [
    ("not up", "#d62728"),
    ("up, not ready", "#ff7f0e"),
    ("ready", "#2ca02c"),
];

/// The report page of a run: `h` its history, `v` the checker's verdict on it,
/// `load_chart_svg` the load run's chart (an SVG document, inlined as given), `title` the
/// page's title.
pub fn html(h: &History, v: &Verdict, load_chart_svg: Option<&str>, title: &str) -> String {
    let (s0, s1) = (h.span_ms.0, h.span_ms.1.max(h.span_ms.0 + 1_000));
    let t = esc(title);
    let mut p = String::with_capacity(64 * 1024);
    let _ = write!(
        p,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{t}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{t}</h1>\n\
         <p class=\"sub\">From {} to {} UTC ({:.0} s). Rules: max lag {}, delivery attempt {}, \
         sampling slack {}.</p>\n",
        clock(s0),
        clock(s1),
        (s1 - s0) as f64 / 1000.0,
        secs(v.rules.max_lag_ms),
        secs(v.rules.attempt_ms),
        secs(v.rules.slack_ms),
    );
    let n = v.violations();
    if v.passed() {
        p.push_str("<p class=\"verdict pass\">PASSED: no violations</p>\n");
    } else {
        let _ = writeln!(
            p,
            "<p class=\"verdict fail\">FAILED: {n} violation{}</p>",
            if n == 1 { "" } else { "s" }
        );
    }
    figures(&mut p, v);
    examples(&mut p, v);
    p.push_str("<h2>Timeline</h2>\n<figure>\n");
    timeline(&mut p, h, s0, s1);
    p.push_str(
        "<figcaption>Seconds since the start. Faults by target, the directory's moves (a mark \
         from asked to in force), and each node's state from its samples.</figcaption>\n\
         </figure>\n",
    );
    legend(&mut p, h);
    if let Some(svg) = load_chart_svg {
        let _ = writeln!(
            p,
            "<h2>Load</h2>\n<figure>\n{}\n<figcaption>The load run's chart.</figcaption>\n\
             </figure>",
            inline_svg(svg)
        );
    }
    tables(&mut p, h, s0);
    p.push_str("</body>\n</html>\n");
    p
}

fn secs(ms: i64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

/// The SVG document as an element of the page.
fn inline_svg(svg: &str) -> &str {
    svg.trim_start()
        .strip_prefix("<?xml")
        .and_then(|rest| rest.split_once("?>").map(|(_, r)| r.trim_start()))
        .unwrap_or(svg)
}

/// `k: n, k: n` or `none`.
fn by_key<K: std::fmt::Display>(m: &BTreeMap<K, u64>) -> String {
    let s: Vec<String> = m.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    if s.is_empty() {
        "none".into()
    } else {
        s.join(", ")
    }
}

fn figures(p: &mut String, v: &Verdict) {
    let bound = v.rules.max_lag_ms + v.rules.attempt_ms;
    let stale_delivery = format!("{} ({})", secs(v.max_stale_delivery_ms), secs(bound));
    let (unack, dupx, errors) = (
        v.unacknowledged_deliveries,
        v.duplicates_explained,
        v.session_errors,
    );
    p.push_str(
        "<h2>Figures</h2>\n<table>\n<thead><tr><th>measure</th><th>value</th></tr></thead>\n\
         <tbody>\n",
    );
    let mut row = |name: &str, value: &dyn std::fmt::Display, bad: bool| {
        let class = if bad { " class=\"bad\"" } else { "" };
        let value = esc(&value.to_string());
        let _ = writeln!(p, "<tr><td>{name}</td><td{class}>{value}</td></tr>");
    };
    row("acknowledged recipients", &v.acknowledged, false);
    row("delivered (of those)", &v.delivered, false);
    row("delivered without an acknowledgement", &unack, false);
    row("recipient deliveries judged for routing", &v.routed, false);
    let bad = v.max_stale_delivery_ms > bound;
    row("largest stale delivery (bound)", &stale_delivery, bad);
    row("duplicates explained by a fault", &dupx, false);
    row("deferred 4xx by code", &by_key(&v.deferred_by_code), false);
    row("sessions without a final reply", &errors, false);
    row("stale samples by node", &by_key(&v.stale_by_node), false);
    row(
        "mailbox states read from the nodes after the run",
        &v.final_checked,
        false,
    );
    for (name, c) in v.classes() {
        row(name, &c.count, c.count > 0);
    }
    p.push_str("</tbody>\n</table>\n");
}

fn examples(p: &mut String, v: &Verdict) {
    p.push_str("<h2>Violations</h2>\n");
    if v.passed() {
        p.push_str("<p>None.</p>\n");
    }
    for (name, c) in v.classes() {
        if c.count == 0 {
            continue;
        }
        let shown = if c.examples.len() as u64 == c.count {
            String::new()
        } else {
            format!(" (the first {} shown)", c.examples.len())
        };
        let _ = writeln!(
            p,
            "<h3>{}: {}{shown}</h3>\n<ul class=\"ex\">",
            esc(name),
            c.count
        );
        for e in &c.examples {
            let _ = writeln!(p, "<li>{}</li>", esc(e));
        }
        p.push_str("</ul>\n");
    }
}

/// A mark on a lane: from `x0` to `x1` (px), a colour, a label, a tooltip.
struct Mark {
    x0: f64,
    x1: f64,
    fill: &'static str,
    label: String,
    tip: String,
}

/// Draws a lane of marks stacked in rows so labels do not overlap; returns its height.
fn lane(svg: &mut String, y: f64, name: &str, mut marks: Vec<Mark>) -> f64 {
    marks.sort_by(|a, b| a.x0.total_cmp(&b.x0));
    let mut ends: Vec<f64> = Vec::new();
    let mut body = String::new();
    for m in &marks {
        let reach = m.x1.max(m.x0 + 6.5 * m.label.chars().count() as f64 + 6.0);
        let free = ends.iter().position(|&e| e <= m.x0);
        let (row, labelled) = match free {
            Some(r) => (r, true),
            None if ends.len() < MAX_ROWS => {
                ends.push(f64::MIN);
                (ends.len() - 1, true)
            }
            None => {
                let r = (0..ends.len())
                    .min_by(|&a, &b| ends[a].total_cmp(&ends[b]))
                    .unwrap_or(0);
                (r, false)
            }
        };
        if let Some(e) = ends.get_mut(row) {
            *e = e.max(if labelled { reach } else { m.x1 });
        }
        let top = y + row as f64 * ROW + 2.0;
        let _ = write!(
            body,
            "<rect x=\"{:.1}\" y=\"{top:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\" \
             fill-opacity=\"0.85\"><title>{}</title></rect>",
            m.x0,
            (m.x1 - m.x0).max(2.0),
            ROW - 4.0,
            m.fill,
            esc(&m.tip)
        );
        if labelled {
            let _ = write!(
                body,
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" stroke=\"#fff\" stroke-width=\"3\" \
                 paint-order=\"stroke\">{}</text>",
                m.x0 + 3.0,
                top + ROW - 8.0,
                esc(&m.label)
            );
        }
        body.push('\n');
    }
    let height = ends.len().max(1) as f64 * ROW;
    let _ = writeln!(
        svg,
        "<g class=\"lane\"><line x1=\"0\" x2=\"{WIDTH}\" y1=\"{y:.1}\" y2=\"{y:.1}\" \
         stroke=\"#eee\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"end\">{}</text>\n{body}</g>",
        LEFT - 8.0,
        y + ROW - 5.0,
        esc(name)
    );
    height
}

fn timeline(p: &mut String, h: &History, s0: i64, s1: i64) {
    let dur = (s1 - s0).max(1);
    let plot = WIDTH - LEFT - RIGHT;
    let x = |ms: i64| LEFT + (ms - s0).clamp(0, dur) as f64 / dur as f64 * plot;
    let at = |ms: i64| since(ms, s0);
    let mut svg = String::new();
    let mut y = 8.0;
    if !h.moves.is_empty() {
        let marks = h
            .moves
            .iter()
            .map(|m| {
                let n = m.addresses.len();
                let (state, from, to) = (m.state.as_str(), at(m.from_ms), at(m.to_ms));
                Mark {
                    x0: x(m.from_ms),
                    x1: x(m.to_ms),
                    fill: estate_colour(m.state),
                    label: format!("{} ({n})", m.source),
                    tip: format!("{}: {n} mailboxes to {state}, {from} to {to}", m.source),
                }
            })
            .collect();
        y += lane(&mut svg, y, "directory", marks);
    }
    let targets: BTreeSet<&str> = h.faults.iter().map(|f| f.target.as_str()).collect();
    for target in targets {
        let marks = h
            .faults
            .iter()
            .filter(|f| f.target == target)
            .map(|f| {
                let (kind, fill) = kind_style(f.kind);
                let (from, to) = (at(f.start_ms), at(f.end_ms));
                Mark {
                    x0: x(f.start_ms),
                    x1: x(f.end_ms),
                    fill,
                    label: kind.to_string(),
                    tip: format!("{kind} on {target}, {from} to {to}: {}", f.detail),
                }
            })
            .collect();
        y += lane(&mut svg, y, target, marks);
    }
    y += 6.0;
    let mut nodes: BTreeMap<&str, Vec<&Sample>> = BTreeMap::new();
    for s in &h.samples {
        nodes.entry(s.node.as_str()).or_default().push(s);
    }
    for (node, mut samples) in nodes {
        samples.sort_by_key(|s| s.at_ms);
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"end\">{}</text>",
            LEFT - 8.0,
            y + 11.0,
            esc(node)
        );
        for (state, from, to) in node_runs(&samples) {
            let (name, fill) = NODE_STATES[state];
            let _ = writeln!(
                svg,
                "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"12\" fill=\"{fill}\">\
                 <title>{} {name} {} to {}</title></rect>",
                x(from),
                (x(to) - x(from)).max(1.0),
                esc(node),
                at(from),
                at(to)
            );
        }
        y += 16.0;
    }
    let step = tick_step_s(dur as f64 / 1000.0);
    let axis = y + 4.0;
    let _ = writeln!(
        svg,
        "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{axis:.1}\" y2=\"{axis:.1}\" stroke=\"#444\"/>",
        WIDTH - RIGHT
    );
    let mut t = 0;
    while t * 1000 <= dur {
        let tx = x(s0 + t * 1000);
        let _ = writeln!(
            svg,
            "<line x1=\"{tx:.1}\" x2=\"{tx:.1}\" y1=\"0\" y2=\"{axis:.1}\" stroke=\"#ddd\" \
             stroke-dasharray=\"2,3\"/><text x=\"{tx:.1}\" y=\"{:.1}\" font-size=\"11\" \
             text-anchor=\"middle\">{t}</text>",
            axis + 14.0
        );
        t += step;
    }
    let height = axis + 22.0;
    let _ = writeln!(
        p,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {WIDTH} {height:.0}\" font-family=\"sans-serif\">\n{svg}</svg>"
    );
}

/// A node's samples as runs of one state: (state index, from, to), each sample covering
/// until the next one (at most [`SAMPLE_COVER_MS`]).
fn node_runs(samples: &[&Sample]) -> Vec<(usize, i64, i64)> {
    let mut runs: Vec<(usize, i64, i64)> = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        let state = usize::from(s.up) + usize::from(s.up && s.ready);
        let cover = s.at_ms + SAMPLE_COVER_MS;
        let end = samples
            .get(i + 1)
            .map_or(s.at_ms + 1_000, |n| n.at_ms.min(cover));
        match runs.last_mut() {
            Some(r) if r.0 == state && r.2 == s.at_ms => r.2 = end,
            _ => runs.push((state, s.at_ms, end)),
        }
    }
    runs
}

/// A tick step (s) giving at most about 16 ticks.
fn tick_step_s(dur_s: f64) -> i64 {
    let steps = [
        10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 28800,
    ];
    steps
        .into_iter()
        .find(|&s| dur_s / s as f64 <= 16.0)
        .unwrap_or(86400)
}

fn legend(p: &mut String, h: &History) {
    let sw = |p: &mut String, colour: &str, name: &str| {
        let _ = write!(
            p,
            "<span class=\"lg\"><span class=\"sw\" style=\"background:{colour}\"></span>\
             {name}</span> "
        );
    };
    p.push_str("<p class=\"legend\">");
    let mut kinds: Vec<FaultKind> = Vec::new();
    for f in &h.faults {
        if !kinds.contains(&f.kind) {
            kinds.push(f.kind);
            let (name, colour) = kind_style(f.kind);
            sw(p, colour, name);
        }
    }
    for e in [Estate::Onprem, Estate::Cloud] {
        if h.moves.iter().any(|m| m.state == e) {
            sw(p, estate_colour(e), &format!("move to {}", e.as_str()));
        }
    }
    for (name, colour) in NODE_STATES {
        sw(p, colour, name);
    }
    p.push_str("</p>\n");
}

fn tables(p: &mut String, h: &History, s0: i64) {
    let at = |ms: i64| esc(&format!("{} ({})", since(ms, s0), clock(ms)));
    let mut faults: Vec<_> = h.faults.iter().collect();
    faults.sort_by_key(|f| f.start_ms);
    let _ = writeln!(
        p,
        "<h2>Faults ({})</h2>\n<table>\n<thead><tr><th>kind</th><th class=\"text\">target</th>\
         <th>start</th><th>end</th><th>duration</th><th class=\"text\">detail</th></tr>\
         </thead>\n<tbody>",
        faults.len()
    );
    for f in faults {
        let _ = writeln!(
            p,
            "<tr><td>{}</td><td class=\"text\">{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td class=\"text\">{}</td></tr>",
            kind_style(f.kind).0,
            esc(&f.target),
            at(f.start_ms),
            at(f.end_ms),
            esc(&secs(f.end_ms - f.start_ms)),
            esc(&f.detail)
        );
    }
    let _ = writeln!(
        p,
        "</tbody>\n</table>\n<h2>Directory moves ({})</h2>\n<table>\n<thead><tr><th>source</th>\
         <th>state</th><th>mailboxes</th><th>asked</th><th>in force</th></tr></thead>\n<tbody>",
        h.moves.len()
    );
    for m in &h.moves {
        let _ = writeln!(
            p,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&m.source),
            m.state.as_str(),
            m.addresses.len(),
            at(m.from_ms),
            at(m.to_ms)
        );
    }
    p.push_str("</tbody>\n</table>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::check;
    use serde_json::json;

    #[test]
    fn the_page_draws_the_fault_lanes_and_the_verdict_and_escapes_text() {
        let t0: i64 = 1_700_000_000_000;
        let fault = |kind: &str, target: &str, start: i64, detail: &str| {
            json!({"start_ms": t0 + start, "end_ms": t0 + start + 30_000, "kind": kind,
                "target": target, "detail": detail})
        };
        let sample = |at: i64, up: bool, ready: bool| {
            json!({"at_ms": t0 + at, "node": "mx1", "up": up, "ready": ready, "applied": 1,
                "postgres_up": null, "queue": null})
        };
        let mut h = History {
            initial: [("a@corp.test".to_string(), Estate::Onprem)].into(),
            span_ms: (t0, t0 + 300_000),
            ..History::default()
        };
        let faults = json!([
            fault("node_kill", "mx2", 30_000, "<script>alert(1)</script>"),
            fault("pg_failover", "pg1", 120_000, "promote pg2")
        ]);
        let moves = json!([{"from_ms": t0 + 60_000, "to_ms": t0 + 65_000, "state": "cloud",
            "source": "batch 1", "addresses": ["a@corp.test"]}]);
        let samples = json!([
            sample(0, true, true),
            sample(1_000, false, false),
            sample(2_000, true, false)
        ]);
        h.faults = serde_json::from_value(faults).expect("faults");
        h.moves = serde_json::from_value(moves).expect("moves");
        h.samples = serde_json::from_value(samples).expect("samples");
        let svg = "<?xml version=\"1.0\"?>\n<svg id=\"load\"></svg>";
        let page = html(&h, &check(&h), Some(svg), "weekend <1>");
        assert!(page.contains("PASSED: no violations"), "{page}");
        assert!(page.contains("<title>weekend &lt;1&gt;</title>"));
        for lane in [
            ">directory</text>",
            ">mx2</text>",
            ">pg1</text>",
            ">mx1</text>",
        ] {
            assert!(page.contains(lane), "no lane {lane}");
        }
        assert!(page.contains(">node_kill</text>") && page.contains(">batch 1 (1)</text>"));
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!page.contains("<script") && !page.contains("<?xml"));
        assert!(page.contains("<figure>\n<svg id=\"load\"></svg>"));
        assert!(page.contains("fill=\"#ff7f0e\"") && page.contains("fill=\"#d62728\""));
        let sent = json!({"at_ms": t0, "node": "mx1", "qid": "Q1", "accepted": ["a@corp.test"],
            "refused": []});
        h.sent.push(serde_json::from_value(sent).expect("sent"));
        let page = html(&h, &check(&h), None, "t");
        assert!(page.contains("FAILED: 1 violation<") && page.contains("lost: a@corp.test"));
        assert!(!page.contains("<h2>Load</h2>"));
    }
}
