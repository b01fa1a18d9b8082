//! The HTML report: one page, self-contained (inline CSS, charts as inline SVG, no script,
//! nothing fetched from elsewhere), so it can be attached to a change request and opened
//! offline. One run, or several side by side with each later run's ratio to the first.

use crate::RenderError as ReportError;
use coexist_load::report::{Percentiles, RunReport};
use std::collections::BTreeSet;
use std::fmt::Write;

use coexist_load::report::html_escape as esc;

/// Which way a measure is better, for colouring ratios.
#[derive(Clone, Copy, PartialEq)]
enum Better {
    Higher,
    Lower,
    Neither,
}

const STYLE: &str = "
body { font-family: system-ui, -apple-system, 'Segoe UI', 'DejaVu Sans', sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
p.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.7em; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f4f4f4; }
tr.group td { background: #fafafa; font-weight: 600; text-align: left; }
td.better { color: #0a6b2e; font-weight: 600; }
td.worse { color: #a11; font-weight: 600; }
td.text { text-align: left; max-width: 28em; }
figure { margin: 1em 0; }
figure svg { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #666; font-size: 0.9em; }
";

/// The report page for `runs` (the first is the reference for ratios).
pub fn html(runs: &[RunReport]) -> Result<String, ReportError> {
    let first = runs.first().ok_or(ReportError::Empty)?;
    let several = runs.len() > 1;
    let title = if several {
        format!(
            "coexist load report: {}",
            runs.iter()
                .map(|r| r.label.as_str())
                .collect::<Vec<_>>()
                .join(" vs ")
        )
    } else {
        format!("coexist load report: {}", first.label)
    };
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{t}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{t}</h1>\n\
         <p class=\"sub\">{runs} started {started}; report written {now} by coexist {ver}.{ratios}</p>\n",
        t = esc(&title),
        runs = if several { "Runs" } else { "Run" },
        started = esc(
            &runs
                .iter()
                .map(|r| r.started_at.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        now = coexist_base::clock::now_utc().format("%Y-%m-%d %H:%M UTC"),
        ver = env!("CARGO_PKG_VERSION"),
        ratios = if several {
            format!(
                " Ratios are each run divided by the first ({}); green is better, red worse.",
                esc(&first.label)
            )
        } else {
            String::new()
        },
    );

    h.push_str("<h2>Summary</h2>\n");
    summary(&mut h, runs);

    h.push_str("<h2>Charts</h2>\n");
    let _ = writeln!(
        h,
        "<figure id=\"chart\">{}<figcaption>Each point is one bucket of {}; \
         latency is per message, from MAIL to the final reply.</figcaption></figure>",
        inline_svg(&crate::chart::svg(runs)?),
        runs.iter()
            .map(|r| format!("{} s ({})", r.series_bucket_s, esc(&r.label)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if several {
        for r in runs {
            let _ = writeln!(
                h,
                "<details><summary>{} alone (p50, p99, p99.9)</summary><figure>{}</figure></details>",
                esc(&r.label),
                inline_svg(&crate::chart::svg(std::slice::from_ref(r))?)
            );
        }
    }

    h.push_str("<h2>Parameters</h2>\n");
    parameters(&mut h, runs);

    if runs.iter().any(|r| r.skipped.is_some()) {
        h.push_str("<h2>Replay: messages not sent</h2>\n");
        skipped(&mut h, runs);
    }
    h.push_str("</body>\n</html>\n");
    Ok(h)
}

/// The SVG document as an element of the page.
fn inline_svg(svg: &str) -> &str {
    svg.trim_start()
        .strip_prefix("<?xml")
        .and_then(|rest| rest.split_once("?>").map(|(_, r)| r.trim_start()))
        .unwrap_or(svg)
}

fn header(h: &mut String, runs: &[RunReport], ratios: bool) {
    h.push_str("<table>\n<thead><tr><th>measure</th>");
    for r in runs {
        let _ = write!(h, "<th>{}</th>", esc(&r.label));
    }
    if ratios {
        for r in &runs[1..] {
            let _ = write!(h, "<th>{} / {}</th>", esc(&r.label), esc(&runs[0].label));
        }
    }
    h.push_str("</tr></thead>\n<tbody>\n");
}

fn group(h: &mut String, runs: &[RunReport], name: &str) {
    let cols = if runs.len() > 1 {
        2 * runs.len()
    } else {
        runs.len() + 1
    };
    let _ = writeln!(
        h,
        "<tr class=\"group\"><td colspan=\"{cols}\">{}</td></tr>",
        esc(name)
    );
}

/// A row of numbers, one per run, then the ratio of each later run to the first.
fn row(h: &mut String, name: &str, values: &[Option<f64>], fmt: fn(f64) -> String, better: Better) {
    let _ = write!(h, "<tr><td>{}</td>", esc(name));
    for v in values {
        let _ = write!(h, "<td>{}</td>", v.map(fmt).unwrap_or_else(|| "–".into()));
    }
    if values.len() > 1 {
        for v in &values[1..] {
            match (values[0], *v) {
                (Some(a), Some(b)) if a > 0.0 && b.is_finite() => {
                    let ratio = b / a;
                    let class = match better {
                        Better::Higher if ratio > 1.05 => " class=\"better\"",
                        Better::Higher if ratio < 0.95 => " class=\"worse\"",
                        Better::Lower if ratio < 0.95 => " class=\"better\"",
                        Better::Lower if ratio > 1.05 => " class=\"worse\"",
                        _ => "",
                    };
                    let _ = write!(h, "<td{class}>{ratio:.2}×</td>");
                }
                _ => h.push_str("<td>–</td>"),
            }
        }
    }
    h.push_str("</tr>\n");
}

fn int(v: f64) -> String {
    let s = format!("{v:.0}");
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 && c.is_ascii_digit() {
            out.push(',');
        }
        out.push(c);
    }
    out
}
fn ms(v: f64) -> String {
    format!("{v:.2} ms")
}
fn secs(v: f64) -> String {
    format!("{v:.2} s")
}
fn rate(v: f64) -> String {
    format!("{} msg/s", int(v))
}
fn mbs(v: f64) -> String {
    format!("{v:.1} MB/s")
}

fn summary(h: &mut String, runs: &[RunReport]) {
    let several = runs.len() > 1;
    header(h, runs, several);
    let col = |f: &dyn Fn(&RunReport) -> Option<f64>| runs.iter().map(f).collect::<Vec<_>>();
    group(h, runs, "Volume");
    row(
        h,
        "messages sent",
        &col(&|r| Some(r.sent as f64)),
        int,
        Better::Neither,
    );
    row(
        h,
        "messages accepted",
        &col(&|r| Some(r.accepted as f64)),
        int,
        Better::Neither,
    );
    row(
        h,
        "recipients accepted",
        &col(&|r| Some(r.accepted_recipients as f64)),
        int,
        Better::Neither,
    );
    let codes: BTreeSet<&String> = runs.iter().flat_map(|r| r.refused_by_code.keys()).collect();
    for code in codes {
        let label = if code.is_empty() {
            "recipients refused (no code)".to_string()
        } else {
            format!("recipients refused with {code}")
        };
        row(
            h,
            &label,
            &col(&|r| Some(r.refused_by_code.get(code).copied().unwrap_or(0) as f64)),
            int,
            Better::Lower,
        );
    }
    row(
        h,
        "connection errors",
        &col(&|r| Some(r.connection_errors as f64)),
        int,
        Better::Lower,
    );
    row(
        h,
        "duration",
        &col(&|r| Some(r.elapsed_s)),
        secs,
        Better::Lower,
    );

    group(h, runs, "Throughput");
    row(
        h,
        "acceptance rate",
        &col(&|r| Some(r.msg_per_s)),
        rate,
        Better::Higher,
    );
    row(
        h,
        "data rate",
        &col(&|r| Some(r.mb_per_s)),
        mbs,
        Better::Higher,
    );
    let late = runs
        .iter()
        .any(|r| r.open_loop.late > 0 || r.open_loop.max_lag_ms > 0.0);
    if late {
        row(
            h,
            "open loop: messages started > 100 ms late",
            &col(&|r| Some(r.open_loop.late as f64)),
            int,
            Better::Lower,
        );
        row(
            h,
            "open loop: largest lag",
            &col(&|r| Some(r.open_loop.max_lag_ms)),
            ms,
            Better::Lower,
        );
    }

    type Pick = fn(&coexist_load::report::Latencies) -> &Percentiles;
    let phases: [(&str, Pick); 5] = [
        ("message, MAIL to final reply", |l| &l.message),
        ("connect", |l| &l.connect),
        ("greeting, EHLO, STARTTLS", |l| &l.ehlo_tls),
        ("MAIL and RCPT", |l| &l.mail_rcpt),
        ("DATA to final reply", |l| &l.data),
    ];
    for (name, pick) in phases {
        if runs.iter().all(|r| pick(&r.latency).count == 0) {
            continue;
        }
        group(h, runs, &format!("Latency: {name}"));
        let p = |f: fn(&Percentiles) -> f64| {
            runs.iter()
                .map(|r| {
                    let p = pick(&r.latency);
                    (p.count > 0).then(|| f(p))
                })
                .collect::<Vec<_>>()
        };
        row(h, "p50", &p(|p| p.p50_ms), ms, Better::Lower);
        row(h, "p90", &p(|p| p.p90_ms), ms, Better::Lower);
        row(h, "p99", &p(|p| p.p99_ms), ms, Better::Lower);
        row(h, "p99.9", &p(|p| p.p99_9_ms), ms, Better::Lower);
        row(h, "max", &p(|p| p.max_ms), ms, Better::Lower);
    }

    if runs.iter().any(|r| r.routes.is_some()) {
        group(h, runs, "Per route, from the relay's metrics (recipients)");
        let names: BTreeSet<&String> = runs
            .iter()
            .flat_map(|r| r.routes.iter().flat_map(|x| x.totals.keys()))
            .collect();
        for name in names {
            let get = |f: fn(&coexist_load::report::RouteTotals) -> u64| {
                runs.iter()
                    .map(|r| {
                        r.routes
                            .as_ref()
                            .map(|x| x.totals.get(name).map(f).unwrap_or(0) as f64)
                    })
                    .collect::<Vec<_>>()
            };
            row(
                h,
                &format!("{name}: accepted at RCPT"),
                &get(|t| t.accepted),
                int,
                Better::Neither,
            );
            row(
                h,
                &format!("{name}: delivered"),
                &get(|t| t.sent),
                int,
                Better::Neither,
            );
            let share = runs
                .iter()
                .map(|r| {
                    let routes = r.routes.as_ref()?;
                    let all: u64 = routes.totals.values().map(|t| t.sent).sum();
                    let mine = routes.totals.get(name).map(|t| t.sent).unwrap_or(0);
                    (all > 0).then(|| 100.0 * mine as f64 / all as f64)
                })
                .collect::<Vec<_>>();
            row(
                h,
                &format!("{name}: share of deliveries"),
                &share,
                |v| format!("{v:.1} %"),
                Better::Neither,
            );
            row(
                h,
                &format!("{name}: deferred"),
                &get(|t| t.deferred),
                int,
                Better::Lower,
            );
            row(
                h,
                &format!("{name}: bounced"),
                &get(|t| t.bounced),
                int,
                Better::Lower,
            );
        }
    }
    if runs.iter().any(|r| r.skipped.is_some()) {
        group(h, runs, "Replay");
        row(
            h,
            "messages found in the files",
            &col(&|r| r.skipped.as_ref().map(|s| s.found as f64)),
            int,
            Better::Neither,
        );
        row(
            h,
            "messages skipped",
            &col(&|r| r.skipped.as_ref().map(|s| s.total() as f64)),
            int,
            Better::Lower,
        );
    }
    h.push_str("</tbody></table>\n");
}

fn parameters(h: &mut String, runs: &[RunReport]) {
    header(h, runs, false);
    let text = |h: &mut String, name: &str, f: &dyn Fn(&RunReport) -> String| {
        let _ = write!(h, "<tr><td>{}</td>", esc(name));
        for r in runs {
            let _ = write!(h, "<td class=\"text\">{}</td>", esc(&f(r)));
        }
        h.push_str("</tr>\n");
    };
    let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
    text(h, "target", &|r| r.parameters.target.clone());
    text(h, "traffic", &|r| r.parameters.traffic.clone());
    text(h, "messages asked for", &|r| {
        int(r.parameters.messages as f64)
    });
    text(h, "concurrent sessions", &|r| {
        r.parameters.concurrency.to_string()
    });
    text(h, "messages per session", &|r| {
        r.parameters.per_session.to_string()
    });
    text(
        h,
        "pacing",
        &|r| match (&r.parameters.timing, r.parameters.rate) {
            (Some(t), _) => format!("original timing ({t})"),
            (None, Some(rate)) => format!("open loop, {rate} msg/s"),
            (None, None) => "closed loop (as fast as the server answers)".into(),
        },
    );
    text(h, "STARTTLS", &|r| yes(r.parameters.tls));
    text(h, "PIPELINING", &|r| yes(r.parameters.pipelining));
    text(h, "CHUNKING (BDAT)", &|r| yes(r.parameters.chunking));
    text(h, "phases measured apart", &|r| yes(r.parameters.phases));
    text(h, "time limit", &|r| {
        format!("{} s", r.parameters.max_seconds)
    });
    text(h, "relay metrics", &|r| {
        r.routes
            .as_ref()
            .map(|x| format!("{} ({} failed scrapes)", x.url, x.scrape_errors))
            .unwrap_or_else(|| "not scraped".into())
    });
    text(h, "started", &|r| r.started_at.clone());
    text(h, "coexist version", &|r| r.coexist_version.clone());
    h.push_str("</tbody></table>\n");
}

fn skipped(h: &mut String, runs: &[RunReport]) {
    h.push_str("<table>\n<thead><tr><th>run</th><th>reason</th><th>messages</th><th>first of them</th></tr></thead>\n<tbody>\n");
    for r in runs {
        let Some(s) = &r.skipped else { continue };
        if s.reasons.is_empty() {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td class=\"text\">none skipped</td><td>0</td><td></td></tr>",
                esc(&r.label)
            );
        }
        for (reason, c) in &s.reasons {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td class=\"text\">{}</td><td>{}</td><td class=\"text\">{}</td></tr>",
                esc(&r.label),
                esc(&describe(reason)),
                c.count,
                esc(&c.examples.join(", "))
            );
        }
    }
    h.push_str("</tbody></table>\n");
}

/// A skip reason in words.
fn describe(reason: &str) -> String {
    match reason {
        "unreadable" => "file could not be read".into(),
        "unparseable" => "no parseable header section".into(),
        "no_sender" => "no sender (no From header and no --from)".into(),
        "no_recipients" => "no recipients (no To or Cc header and no --to)".into(),
        "no_date" => "no Date or Received date (needed by --timing)".into(),
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coexist_load::report::sample;

    #[test]
    fn the_page_is_self_contained_escaped_and_compares_runs() {
        let mut b = sample("coexist", 5, 1.0);
        b.msg_per_s *= 6.0;
        b.latency.message.p99_ms = 3.0;
        b.skipped = Some(coexist_load::report::Skipped {
            found: 3,
            used: 2,
            ..Default::default()
        });
        b.skipped
            .as_mut()
            .unwrap()
            .add("no_recipients", "<x>.eml".into());
        let page = html(&[sample("postfix", 5, 1.0), b]).unwrap();
        assert!(page.starts_with("<!DOCTYPE html>"));
        for needle in ["http://", "https://", "<script", "<link", "@import", "src="] {
            let outside_svg = page.replace("http://www.w3.org/2000/svg", "");
            let outside_svg = outside_svg.replace("http://127.0.0.1:8025/metrics", "");
            assert!(!outside_svg.contains(needle), "{needle} in the page");
        }
        assert!(page.contains("<th>coexist / postfix</th>"));
        assert!(
            page.contains("<td class=\"better\">6.00×</td>"),
            "acceptance ratio"
        );
        assert!(
            page.contains("<td class=\"better\">0.33×</td>"),
            "p99 ratio"
        );
        assert!(page.contains("generated &lt;&amp;&gt; mail"));
        assert!(page.contains("&lt;x&gt;.eml") && !page.contains("<x>"));
        assert!(page.contains("cloud: share of deliveries"));
        assert_eq!(page.matches("<svg").count(), 3, "comparison + one per run");
        assert!(matches!(html(&[]), Err(ReportError::Empty)));
    }
}
