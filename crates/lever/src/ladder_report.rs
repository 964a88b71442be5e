//! DIR/report.html: a ladder's ladder.json as one page that a browser opens without a network
//! — the table of rungs, their score (with its interval) against their cost, the loss curves of
//! the training rungs, and the test items on which the rungs disagree.
//!
//! Everything is drawn here, in Rust: the charts are inline SVG, the styles are inline, and
//! every text from the data (questions, answers, names, paths) is HTML-escaped. The page's one
//! script only switches the item view between "only items where rungs disagree" and "all
//! items", then counts the charts laid out with something in them (`data-charts`) and marks the
//! page ready (`<body data-ready="1">`), for the browser test (tests/report_browser.rs).

use serde_json::Value;

/// The report page of `report`, a ladder.json value (docs/ladder.md). Missing fields are shown
/// as "–", never a panic: the page is also rebuilt from a file (`--report-only`).
pub fn html(report: &Value) -> String {
    let rungs: &[Value] = report["rungs"].as_array().map_or(&[], Vec::as_slice);
    let task = text(&report["task"]);
    let mut page = String::new();
    page += "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n";
    page += "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n";
    page += &format!("<title>lever ladder: {}</title>\n", esc(&task));
    page += &format!("<style>{STYLE}</style>\n</head>\n<body>\n");
    page += &header(report, rungs);
    page += "<h2>Rungs</h2>\n";
    page += &table(report, rungs);
    page += "<h2>Score against cost</h2>\n";
    page += &score_chart(report, rungs);
    page += "<h2>Training loss</h2>\n";
    page += &loss_chart(rungs);
    page += "<h2>Items</h2>\n";
    page += &items(report, rungs);
    page += &format!("<script>{SCRIPT}</script>\n</body>\n</html>\n");
    page
}

const STYLE: &str = r#"
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto;
  max-width: 1240px; padding: 0 16px; color: #1d2330; background: #fff; }
h1 { font-size: 1.5em; margin-bottom: 4px; }
h2 { font-size: 1.15em; margin-top: 32px; border-bottom: 1px solid #d8dce4; padding-bottom: 4px; }
.meta { color: #5a6270; margin: 0 0 12px; }
.verdict { background: #eef6ee; border-left: 4px solid #3c8d40; padding: 8px 12px; margin: 12px 0; }
.next { background: #f3f4f8; border-left: 4px solid #7a8394; padding: 8px 12px; margin: 12px 0; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border-bottom: 1px solid #e2e5eb; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f4f8; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.use td:first-child { font-weight: 700; }
.tag { font-size: 0.75em; border-radius: 3px; padding: 0 4px; margin-left: 4px; color: #fff; }
.tag.use { background: #3c8d40; } .tag.best { background: #35609e; }
.real { color: #3c8d40; font-weight: 600; } .noise { color: #7a8394; }
.note { color: #5a6270; font-size: 0.9em; }
svg.chart { background: #fcfcfd; border: 1px solid #e2e5eb; }
svg .grid { stroke: #e6e8ee; } svg .axis { stroke: #5a6270; }
svg text { font-size: 12px; fill: #3a4150; }
svg .label { font-size: 12px; fill: #1d2330; }
#items td.ans, #items td.q, #items td.gold { white-space: pre-wrap; max-width: 340px; }
#items td.right { background: #eaf6ea; } #items td.wrong { background: #fbecec; }
.mark { font-weight: 700; } td.right .mark { color: #2f7a33; } td.wrong .mark { color: #b3261e; }
.id { color: #7a8394; font-size: 0.85em; }
.toggle label { margin-right: 16px; cursor: pointer; }
"#;

/// The item filter, then the count of drawn charts and the ready mark.
const SCRIPT: &str = r##"
(function () {
  var rows = document.querySelectorAll("#items tbody tr");
  var none = document.getElementById("none-disagree");
  function show(all) {
    var shown = 0;
    rows.forEach(function (row) {
      row.hidden = !all && row.dataset.disagree !== "1";
      if (!row.hidden) { shown += 1; }
    });
    if (none) { none.hidden = all || shown > 0; }
  }
  document.querySelectorAll("input[name=items]").forEach(function (input) {
    input.addEventListener("change", function () { show(input.value === "all"); });
  });
  var picked = document.querySelector("input[name=items]:checked");
  show(picked !== null && picked.value === "all");
  // The charts the browser laid out with something in them.
  var drawn = 0;
  document.querySelectorAll("svg.chart").forEach(function (svg) {
    var box = svg.getBBox();
    if (box.width > 0 && box.height > 0) { drawn += 1; }
  });
  document.body.dataset.charts = String(drawn);
  document.body.dataset.ready = "1";
})();
"##;

/// Line colours, one per rung (score chart) or per training (loss chart).
const COLOURS: [&str; 8] = [
    "#35609e", "#c0392b", "#3c8d40", "#8e44ad", "#d35400", "#16a085", "#7f5a3c", "#c2185b",
];

/// HTML-escaped text: safe between tags and inside attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out += "&amp;",
            '<' => out += "&lt;",
            '>' => out += "&gt;",
            '"' => out += "&quot;",
            '\'' => out += "&#39;",
            c => out.push(c),
        }
    }
    out
}

/// A JSON value as text: strings as they are, numbers and the rest as JSON, null as "".
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        v => v.to_string(),
    }
}

/// A number with `digits` decimals, or "–".
fn num(v: &Value, digits: usize) -> String {
    v.as_f64().map_or("–".into(), |x| format!("{x:.digits$}"))
}

/// Seconds and other costs: fewer decimals as they grow.
fn amount(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
        None => "–".into(),
    }
}

/// Escaped text with `quoted` spans (as the verdict writes rung names) in <code>.
fn with_code(s: &str) -> String {
    s.split('`')
        .enumerate()
        .map(|(i, part)| {
            if i % 2 == 1 {
                format!("<code>{}</code>", esc(part))
            } else {
                esc(part)
            }
        })
        .collect()
}

fn header(report: &Value, rungs: &[Value]) -> String {
    let n = rungs.first().map_or(Value::Null, |r| r["n"].clone());
    let mut s = format!(
        "<h1>Ladder: {}</h1>\n<p class=\"meta\">split <b>{}</b> · metric <b>{}</b> · {} items · \
         ladder file {} · folder {}</p>\n",
        esc(&text(&report["task"])),
        esc(&text(&report["split"])),
        esc(&text(&report["metric"])),
        esc(&text(&n)),
        esc(&text(&report["ladder"])),
        esc(&text(&report["out"])),
    );
    let verdict = &report["verdict"];
    if let Some(t) = verdict["text"].as_str() {
        s += &format!(
            "<p class=\"verdict\"><b>Verdict:</b> {}</p>\n",
            with_code(t)
        );
    }
    let next = &verdict["next"];
    if let Some(secs) = next["planned_s"].as_f64() {
        let cost = next["planned_cost"].as_f64().map_or(String::new(), |c| {
            format!(", {c:.3} {}", esc(&text(&report["currency"])))
        });
        let how = if next["calibrated"].as_bool() == Some(true) {
            "calibrated on this machine"
        } else {
            "uncalibrated: <code>lever plan --calibrate</code>"
        };
        s += &format!(
            "<p class=\"next\"><b>Next rung:</b> {} ({} steps), planned {:.1} min{cost} ({how})</p>\n",
            esc(&text(&next["rung"])),
            esc(&text(&next["steps"])),
            secs / 60.0,
        );
    } else if let Some(note) = next["note"].as_str() {
        s += &format!(
            "<p class=\"next\"><b>Next rung:</b> {}: {}</p>\n",
            esc(&text(&next["rung"])),
            with_code(note)
        );
    }
    s
}

/// The table: one row per rung, its score, its comparison with the rung below and its costs.
fn table(report: &Value, rungs: &[Value]) -> String {
    let money = report["price_per_hour"].is_number();
    let currency = esc(&text(&report["currency"]));
    let mut s = String::from("<table id=\"rungs\">\n<thead><tr>");
    let mut heads = vec![
        "rung",
        "score",
        "95% interval",
        "vs rung below (paired, 95%)",
        "seconds (total)",
        "train s",
        "train tokens",
        "peak RAM MB",
        "latency p50 ms",
        "latency p95 ms",
        "prompt tokens / query",
        "index build s",
        "index MB",
    ];
    let money_head = format!("money {currency}");
    if money {
        heads.push(&money_head);
    }
    for h in heads {
        s += &format!("<th>{h}</th>");
    }
    s += "</tr></thead>\n<tbody>\n";
    let verdict = &report["verdict"];
    for r in rungs {
        let name = text(&r["name"]);
        let is = |k: &str| verdict[k].as_str() == Some(name.as_str());
        let mut tags = String::new();
        if is("use") {
            tags += "<span class=\"tag use\">use</span>";
        }
        if is("best") {
            tags += "<span class=\"tag best\">best</span>";
        }
        let ci = match r["ci"].as_array().map(Vec::as_slice) {
            Some([lo, hi]) => format!("[{}, {}]", num(lo, 3), num(hi, 3)),
            _ => "–".into(),
        };
        let below = &r["vs_below"];
        let vs = if below.is_object() {
            let ci = match below["ci"].as_array().map(Vec::as_slice) {
                Some([lo, hi]) => format!(
                    " [{:+.3}, {:+.3}]",
                    lo.as_f64().unwrap_or(0.0),
                    hi.as_f64().unwrap_or(0.0)
                ),
                _ => String::new(),
            };
            let real = if below["significant"].as_bool() == Some(true) {
                "<span class=\"real\">real</span>"
            } else {
                "<span class=\"noise\">within noise</span>"
            };
            format!(
                "{:+.3}{ci} vs {} · {real}",
                below["gain"].as_f64().unwrap_or(0.0),
                esc(&text(&below["rung"]))
            )
        } else {
            "–".into()
        };
        let c = &r["cost"];
        // A rung that shares a training done by another rung: the training's own seconds.
        let train = if c["train_s"].is_number() {
            amount(&c["train_s"])
        } else if c["train_seconds"].is_number() {
            format!("{} (shared)", amount(&c["train_seconds"]))
        } else {
            "–".into()
        };
        let class = if is("use") { " class=\"use\"" } else { "" };
        s += &format!("<tr{class}><td>{}{tags}</td>", esc(&name));
        s += &format!("<td class=\"num\">{}</td>", num(&r["score"], 3));
        s += &format!("<td class=\"num\">{ci}</td><td>{vs}</td>");
        let cells = [
            amount(&r["seconds"]),
            train,
            num(&c["train_tokens"], 0),
            num(&c["peak_rss_mb"], 0),
            amount(&c["latency_p50_ms"]),
            amount(&c["latency_p95_ms"]),
            num(&c["prompt_tokens_per_query"], 1),
            amount(&c["index_build_s"]),
            amount(&c["index_mb"]),
        ];
        for cell in cells {
            s += &format!("<td class=\"num\">{cell}</td>");
        }
        if money {
            s += &format!("<td class=\"num\">{}</td>", num(&c["money"], 4));
        }
        s += "</tr>\n";
    }
    s += "</tbody>\n</table>\n";
    s += "<p class=\"note\">seconds = training + index build + evaluation; a gain is \
          <span class=\"real\">real</span> when its paired-bootstrap interval excludes 0.</p>\n";
    s
}

/// A chart's plotting area in pixels.
const W: f64 = 760.0;
const H: f64 = 380.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 20.0;
const BOTTOM: f64 = 50.0;

/// One axis: values from `lo` to `hi` (linear, or log10) onto pixels `from`..`to`.
struct Scale {
    lo: f64,
    hi: f64,
    log: bool,
    from: f64,
    to: f64,
}

impl Scale {
    /// Linear, widened to round ticks around `lo`..`hi`.
    fn linear(lo: f64, hi: f64, from: f64, to: f64) -> Scale {
        let (lo, hi) = if hi > lo {
            (lo, hi)
        } else {
            (lo - 0.5 * lo.abs().max(1.0), hi + 0.5 * hi.abs().max(1.0))
        };
        let step = nice_step(hi - lo);
        Scale {
            lo: (lo / step).floor() * step,
            hi: (hi / step).ceil() * step,
            log: false,
            from,
            to,
        }
    }

    /// Log10, from the power of ten at or below `lo` to the one at or above `hi` (`lo` > 0).
    fn log(lo: f64, hi: f64, from: f64, to: f64) -> Scale {
        let a = lo.log10().floor();
        let b = hi.log10().ceil().max(a + 1.0);
        Scale {
            lo: 10f64.powf(a),
            hi: 10f64.powf(b),
            log: true,
            from,
            to,
        }
    }

    fn px(&self, v: f64) -> f64 {
        let (v, lo, hi) = if self.log {
            (v.max(self.lo).log10(), self.lo.log10(), self.hi.log10())
        } else {
            (v, self.lo, self.hi)
        };
        self.from + (v - lo) / (hi - lo) * (self.to - self.from)
    }

    /// Tick values and their labels.
    fn ticks(&self) -> Vec<(f64, String)> {
        if self.log {
            let decades = (self.hi / self.lo).log10().round() as i32;
            let mults: &[f64] = if decades <= 2 {
                &[1.0, 2.0, 5.0]
            } else {
                &[1.0]
            };
            let mut out = Vec::new();
            for d in 0..=decades {
                let p = self.lo * 10f64.powi(d);
                for m in mults {
                    let v = p * m;
                    if v <= self.hi * (1.0 + 1e-9) {
                        out.push((v, label(v, v)));
                    }
                }
            }
            out
        } else {
            let step = nice_step(self.hi - self.lo);
            let n = ((self.hi - self.lo) / step).round() as i64;
            (0..=n)
                .map(|i| {
                    let v = self.lo + i as f64 * step;
                    (v, label(v, step))
                })
                .collect()
        }
    }
}

/// A step of 1, 2 or 5 × 10^k that cuts `span` into about five.
fn nice_step(span: f64) -> f64 {
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    mag * if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    }
}

/// A tick label with as many decimals as `step` needs.
fn label(v: f64, step: f64) -> String {
    let digits = (-step.abs().log10().floor()).max(0.0) as usize;
    format!("{v:.digits$}")
}

/// Grid lines, ticks and axis titles of a chart with scales `x` and `y`.
fn axes(x: &Scale, y: &Scale, x_title: &str, y_title: &str) -> String {
    let mut s = String::new();
    for (v, l) in x.ticks() {
        let px = x.px(v);
        s += &format!(
            "<line class=\"grid\" x1=\"{px:.1}\" y1=\"{TOP}\" x2=\"{px:.1}\" y2=\"{:.1}\"/>\
             <text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{l}</text>\n",
            H - BOTTOM,
            H - BOTTOM + 16.0
        );
    }
    for (v, l) in y.ticks() {
        let py = y.px(v);
        s += &format!(
            "<line class=\"grid\" x1=\"{LEFT}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{l}</text>\n",
            W - RIGHT,
            LEFT - 6.0,
            py + 4.0
        );
    }
    s += &format!(
        "<line class=\"axis\" x1=\"{LEFT}\" y1=\"{b:.1}\" x2=\"{r:.1}\" y2=\"{b:.1}\"/>\
         <line class=\"axis\" x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{b:.1}\"/>\n\
         <text class=\"axis-title\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n\
         <text class=\"axis-title\" transform=\"translate(16 {:.1}) rotate(-90)\" \
         text-anchor=\"middle\">{}</text>\n",
        (LEFT + W - RIGHT) / 2.0,
        H - 10.0,
        esc(x_title),
        (TOP + H - BOTTOM) / 2.0,
        esc(y_title),
        b = H - BOTTOM,
        r = W - RIGHT,
    );
    s
}

fn svg_open(id: &str, what: &str) -> String {
    format!(
        "<svg class=\"chart\" id=\"{id}\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" \
         role=\"img\" aria-label=\"{}\">\n",
        esc(what)
    )
}

/// A rung in the score chart.
struct Point {
    name: String,
    seconds: f64,
    score: f64,
    /// The 95% interval.
    ci: Option<(f64, f64)>,
}

/// A training's loss per step: (step, loss).
type Curve = Vec<(f64, f64)>;

/// Each rung's score with its 95% interval (a vertical bar) against its total seconds, the
/// x axis in log scale when the seconds span a factor of ten or more.
fn score_chart(report: &Value, rungs: &[Value]) -> String {
    let points: Vec<Point> = rungs
        .iter()
        .filter_map(|r| {
            let ci = match r["ci"].as_array().map(Vec::as_slice) {
                Some([lo, hi]) => lo.as_f64().zip(hi.as_f64()),
                _ => None,
            };
            Some(Point {
                name: text(&r["name"]),
                seconds: r["seconds"].as_f64().unwrap_or(0.0).max(1e-3),
                score: r["score"].as_f64()?,
                ci,
            })
        })
        .collect();
    if points.is_empty() {
        return "<p class=\"note\">No scored rungs.</p>\n".into();
    }
    let xs = points.iter().map(|p| p.seconds);
    let (x_min, x_max) = (xs.clone().fold(f64::MAX, f64::min), xs.fold(0.0, f64::max));
    let log = x_max / x_min >= 10.0;
    let x = if log {
        Scale::log(x_min, x_max, LEFT, W - RIGHT)
    } else {
        Scale::linear(0.0, x_max * 1.05, LEFT, W - RIGHT)
    };
    let ys: Vec<f64> = points
        .iter()
        .flat_map(|p| {
            let (lo, hi) = p.ci.unwrap_or((p.score, p.score));
            [p.score, lo, hi]
        })
        .collect();
    let (y_min, y_max) = (
        ys.iter().copied().fold(f64::MAX, f64::min),
        ys.iter().copied().fold(f64::MIN, f64::max),
    );
    // Scores in [0, 1] (every metric but perplexity) on the whole of [0, 1].
    let y = if y_min >= 0.0 && y_max <= 1.0 {
        Scale::linear(0.0, 1.0, H - BOTTOM, TOP)
    } else {
        Scale::linear(y_min, y_max, H - BOTTOM, TOP)
    };
    let x_title = format!(
        "cost: seconds (training + index + evaluation){}",
        if log { ", log scale" } else { "" }
    );
    let y_title = format!("{} (95% interval)", text(&report["metric"]));
    let mut s = svg_open("score-chart", "score against cost, per rung");
    s += &axes(&x, &y, &x_title, &y_title);
    let money = report["price_per_hour"].as_f64();
    for (i, p) in points.iter().enumerate() {
        let Point {
            name,
            seconds: secs,
            score,
            ci,
        } = p;
        let colour = COLOURS[i % COLOURS.len()];
        let (px, py) = (x.px(*secs), y.px(*score));
        let mut tip = format!("{name}: {score:.3}");
        if let Some((lo, hi)) = ci {
            tip += &format!(" [{lo:.3}, {hi:.3}]");
        }
        tip += &format!(", {secs:.1} s");
        if let Some(p) = money {
            tip += &format!(", {:.4} {}", p * secs / 3600.0, text(&report["currency"]));
        }
        s += &format!(
            "<g class=\"rung\" data-rung=\"{}\"><title>{}</title>\n",
            esc(name),
            esc(&tip)
        );
        if let Some((lo, hi)) = ci {
            let (a, b) = (y.px(*lo), y.px(*hi));
            s += &format!(
                "<line class=\"ci\" x1=\"{px:.1}\" y1=\"{a:.1}\" x2=\"{px:.1}\" y2=\"{b:.1}\" \
                 stroke=\"{colour}\" stroke-width=\"2\"/>\
                 <line x1=\"{:.1}\" y1=\"{a:.1}\" x2=\"{:.1}\" y2=\"{a:.1}\" stroke=\"{colour}\"/>\
                 <line x1=\"{:.1}\" y1=\"{b:.1}\" x2=\"{:.1}\" y2=\"{b:.1}\" stroke=\"{colour}\"/>\n",
                px - 5.0,
                px + 5.0,
                px - 5.0,
                px + 5.0
            );
        }
        // Labels alternate above and below their point, so neighbours overlap less.
        let dy = if i % 2 == 0 { -8.0 } else { 16.0 };
        s += &format!(
            "<circle class=\"point\" cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"5\" fill=\"{colour}\"/>\
             <text class=\"label\" x=\"{:.1}\" y=\"{:.1}\">{}</text>\n</g>\n",
            px + 8.0,
            py + dy,
            esc(name)
        );
    }
    s += "</svg>\n";
    s
}

/// The training loss per step: one line per training (rungs that share one, as LoRA and
/// LoRA + RAG do, share its line).
fn loss_chart(rungs: &[Value]) -> String {
    // (the rungs that share a training, its loss per step)
    let mut lines: Vec<(Vec<String>, Curve)> = Vec::new();
    for r in rungs {
        let curve: Curve = r["loss_curve"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
            .collect();
        if curve.is_empty() {
            continue;
        }
        let name = text(&r["name"]);
        match lines.iter_mut().find(|(_, c)| *c == curve) {
            Some((names, _)) => names.push(name),
            None => lines.push((vec![name], curve)),
        }
    }
    if lines.is_empty() {
        return "<p class=\"note\">No training rungs in this ladder.</p>\n".into();
    }
    let all = lines.iter().flat_map(|(_, c)| c.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(step, loss) in all {
        (x0, x1, y0, y1) = (x0.min(step), x1.max(step), y0.min(loss), y1.max(loss));
    }
    let x = Scale::linear(x0.min(0.0), x1, LEFT, W - RIGHT);
    let y = Scale::linear(y0, y1, H - BOTTOM, TOP);
    let mut s = svg_open("loss-chart", "training loss per step");
    s += &axes(&x, &y, "step", "training loss");
    for (i, (names, curve)) in lines.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let label = names.join(", ");
        let points: Vec<String> = curve
            .iter()
            .map(|&(step, loss)| format!("{:.1},{:.1}", x.px(step), y.px(loss)))
            .collect();
        s += &format!(
            "<g class=\"training\" data-rungs=\"{}\"><title>{}</title>\n\
             <polyline class=\"loss\" points=\"{}\" fill=\"none\" stroke=\"{colour}\" \
             stroke-width=\"2\"/>\n",
            esc(&label),
            esc(&label),
            points.join(" ")
        );
        // Markers where the steps are few enough to tell apart.
        if curve.len() <= 40 {
            for &(step, loss) in curve {
                s += &format!(
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{colour}\"/>",
                    x.px(step),
                    y.px(loss)
                );
            }
            s += "\n";
        }
        // The legend, right of the plot.
        let ly = TOP + 10.0 + 18.0 * i as f64;
        s += &format!(
            "<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{colour}\" \
             stroke-width=\"3\"/><text class=\"label\" x=\"{:.1}\" y=\"{:.1}\">{}</text>\n</g>\n",
            W - RIGHT + 10.0,
            W - RIGHT + 28.0,
            W - RIGHT + 32.0,
            ly + 4.0,
            esc(&label)
        );
    }
    s += "</svg>\n";
    s
}

/// The test items, each rung's answer marked right or wrong; at first only the items where the
/// rungs disagree (some right, some wrong), with a switch to all items.
fn items(report: &Value, rungs: &[Value]) -> String {
    let items: &[Value] = report["items"].as_array().map_or(&[], Vec::as_slice);
    if items.is_empty() {
        return "<p class=\"note\">ladder.json holds no items.</p>\n".into();
    }
    let names: Vec<String> = rungs.iter().map(|r| text(&r["name"])).collect();
    let disagree = |item: &Value| {
        let marks: Vec<bool> = names
            .iter()
            .filter_map(|n| item["answers"][n.as_str()]["right"].as_bool())
            .collect();
        marks.iter().any(|&m| m) && marks.iter().any(|&m| !m)
    };
    let k = items.iter().filter(|i| disagree(i)).count();
    let mut s = format!(
        "<p class=\"toggle\">\
         <label><input type=\"radio\" name=\"items\" value=\"disagree\" checked> only items where \
         rungs disagree ({k} of {n})</label>\
         <label><input type=\"radio\" name=\"items\" value=\"all\"> all items ({n})</label></p>\n\
         <p class=\"note\" id=\"none-disagree\"{hidden}>The rungs agree on every item.</p>\n",
        n = items.len(),
        hidden = if k > 0 { " hidden" } else { "" },
    );
    s += "<table id=\"items\">\n<thead><tr><th>#</th><th>question</th><th>gold</th>";
    for n in &names {
        s += &format!("<th>{}</th>", esc(n));
    }
    s += "</tr></thead>\n<tbody>\n";
    for (i, item) in items.iter().enumerate() {
        let d = disagree(item);
        s += &format!(
            "<tr data-disagree=\"{}\"{}><td class=\"num\">{}</td>\
             <td class=\"q\">{}<div class=\"id\">{}</div></td><td class=\"gold\">{}</td>",
            u8::from(d),
            if d { "" } else { " hidden" },
            i + 1,
            esc(&text(&item["question"])),
            esc(&text(&item["id"])),
            esc(&text(&item["gold"])),
        );
        for n in &names {
            let a = &item["answers"][n.as_str()];
            if a.is_null() {
                s += "<td class=\"ans\">–</td>";
                continue;
            }
            let output = text(&a["output"]);
            let shown = if output.trim().is_empty() {
                "<em>(empty)</em>".to_string()
            } else {
                esc(&output)
            };
            s += &match a["right"].as_bool() {
                Some(true) => {
                    format!("<td class=\"ans right\"><span class=\"mark\">✓</span> {shown}</td>")
                }
                Some(false) => {
                    format!("<td class=\"ans wrong\"><span class=\"mark\">✗</span> {shown}</td>")
                }
                None => format!(
                    "<td class=\"ans\">{shown} <span class=\"id\">({})</span></td>",
                    num(&a["score"], 3)
                ),
            };
        }
        s += "</tr>\n";
    }
    s += "</tbody>\n</table>\n";
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A ladder.json of three rungs (one trained) on three items, an answer holding a script.
    fn sample() -> Value {
        let answer = |output: &str, right: bool| json!({"output": output, "score": f64::from(u8::from(right)), "right": right});
        json!({
            "task": "squad-open", "split": "test", "metric": "contains",
            "ladder": "ladder.toml", "out": "out", "price_per_hour": 0.1, "currency": "USD",
            "rungs": [
                {"name": "zero-shot", "score": 0.25, "ci": [0.0, 0.5], "n": 3, "seconds": 4.0,
                 "cost": {"eval_s": 4.0, "latency_p50_ms": 900.0, "latency_p95_ms": 1300.0,
                          "prompt_tokens_per_query": 40.0, "peak_rss_mb": 300.0, "money": 0.0001}},
                {"name": "rag", "score": 0.5, "ci": [0.25, 0.75], "n": 3, "seconds": 60.0,
                 "vs_below": {"rung": "zero-shot", "gain": 0.25, "ci": [0.0, 0.5], "significant": false},
                 "cost": {"eval_s": 8.0, "index_build_s": 52.0, "index_mb": 3.5,
                          "prompt_tokens_per_query": 300.0, "money": 0.0017}},
                {"name": "lora", "score": 0.75, "ci": [0.5, 1.0], "n": 3, "seconds": 400.0,
                 "vs_below": {"rung": "rag", "gain": 0.25, "ci": [0.05, 0.45], "significant": true},
                 "cost": {"eval_s": 5.0, "train_s": 395.0, "train_tokens": 12000, "money": 0.011},
                 "loss_curve": [[1, 2.5], [2, 2.1], [3, 1.9], [4, 1.6]]},
            ],
            "items": [
                {"id": "test.jsonl:1", "question": "Who developed the lithium-ion battery?",
                 "gold": "John B. Goodenough",
                 "answers": {"zero-shot": answer("Sony", false), "rag": answer("John B. Goodenough", true),
                             "lora": answer("<script>alert(1)</script>", false)}},
                {"id": "test.jsonl:2", "question": "Capital of France?", "gold": "Paris",
                 "answers": {"zero-shot": answer("Paris", true), "rag": answer("Paris", true),
                             "lora": answer("Paris", true)}},
                {"id": "test.jsonl:3", "question": "A & B?", "gold": "C",
                 "answers": {"zero-shot": answer("", false), "rag": answer("D", false),
                             "lora": answer("C", true)}},
            ],
            "verdict": {"best": "lora", "use": "lora", "text": "use `lora`: the best score",
                        "next": {"rung": "full fine-tuning", "method": "full", "steps": 4,
                                 "planned_s": 600.0, "planned_cost": 0.02, "calibrated": false}},
        })
    }

    #[test]
    fn the_report_escapes_answers_and_draws_a_point_per_rung_and_the_loss_curve() {
        let page = html(&sample());
        // The answer's script is text, not a script: the page has one script, its own.
        assert!(!page.contains("<script>alert"), "unescaped answer");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert_eq!(page.matches("<script").count(), 1);
        assert!(page.contains("A &amp; B?"));
        // One point per rung, labelled with its name; the seconds span two decades: log x.
        assert_eq!(page.matches("<circle class=\"point\"").count(), 3);
        let chart = &page[page.find("id=\"score-chart\"").unwrap()..];
        let chart = &chart[..chart.find("</svg>").unwrap()];
        for name in ["zero-shot", "rag", "lora"] {
            assert!(chart.contains(&format!(">{name}</text>")), "{name}");
        }
        assert!(page.contains("seconds (training + index + evaluation), log scale"));
        // The loss curve: one polyline of four points.
        let at = page.find("<polyline class=\"loss\" points=\"").unwrap();
        let points = page[at..].split('"').nth(3).unwrap();
        assert_eq!(points.split(' ').count(), 4, "{points}");
        // Items 1 and 3 split the rungs, item 2 does not: shown at first, hidden.
        assert_eq!(page.matches("<tr data-disagree=\"1\">").count(), 2);
        assert_eq!(page.matches("<tr data-disagree=\"0\" hidden>").count(), 1);
        assert!(page.contains("only items where rungs disagree (2 of 3)"));
        // Self-contained: nothing from the network.
        assert!(!page.contains("http://") && !page.contains("https://"));
        assert!(page.contains("document.body.dataset.ready = \"1\""));
        // The table: the verdict's rung tagged, the significant gain marked real, the money.
        assert!(page.contains("lora<span class=\"tag use\">use</span>"));
        assert!(page.contains("+0.250 [+0.050, +0.450] vs rag · <span class=\"real\">real</span>"));
        assert!(page.contains("<th>money USD</th>"));
        assert!(page.contains("<b>Verdict:</b> use <code>lora</code>: the best score"));
    }

    #[test]
    fn a_ladder_json_with_fields_missing_still_renders() {
        for v in [
            json!({}),
            json!({"rungs": [{"name": "a"}], "items": [{"answers": 3}]}),
            json!({"rungs": [{"name": "a", "score": 0.5, "ci": [0.5, 0.5], "seconds": 0,
                              "loss_curve": [[1, 2.0]]}]}),
            json!({"rungs": [{"name": "a", "score": 12.5, "seconds": 3}], "metric": "perplexity",
                   "items": [{"id": "x", "answers": {"a": {"output": "y", "score": 12.5, "right": null}}}]}),
        ] {
            let page = html(&v);
            assert!(page.ends_with("</html>\n"), "{v}");
        }
    }

    #[test]
    fn scales_round_their_ends_and_map_onto_pixels() {
        let s = Scale::linear(0.13, 0.87, 0.0, 100.0);
        assert_eq!((s.lo, s.hi), (0.0, 1.0));
        assert_eq!(s.px(0.5), 50.0);
        let t: Vec<String> = s.ticks().into_iter().map(|t| t.1).collect();
        assert_eq!(t, ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        let l = Scale::log(4.0, 400.0, 0.0, 300.0);
        assert_eq!((l.lo, l.hi), (1.0, 1000.0));
        assert!((l.px(10.0) - 100.0).abs() < 1e-9);
        assert_eq!(l.ticks().len(), 4);
    }
}
