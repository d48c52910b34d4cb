//! Eval outputs: `<run>.json` (everything), `<run>.md` (the table by hardness), `<run>.png` (EX by hardness).

use super::Report;
use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub fn write(report: &Report, out: &Path) -> Result<()> {
    let json = out.join(format!("{}.json", report.run));
    std::fs::write(&json, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("cannot write {}", json.display()))?;
    std::fs::write(out.join(format!("{}.md", report.run)), markdown(report))?;
    let png = out.join(format!("{}.png", report.run));
    if let Err(e) = plot(report, &png) {
        tracing::warn!("no chart ({}): {e:#}", png.display());
    }
    Ok(())
}

/// The hardness buckets in their natural order (easy, medium, hard, extra).
fn ordered(r: &Report) -> Vec<(String, super::Bucket)> {
    super::spider_match::Hardness::ALL
        .iter()
        .filter_map(|h| r.summary.by_hardness.get(h.as_str()).map(|b| (h.as_str().to_string(), b.clone())))
        .collect()
}

fn pct(x: f64) -> String {
    format!("{:.1}", 100.0 * x)
}

pub fn markdown(r: &Report) -> String {
    let s = &r.summary;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Eval `{}`: {} via {}\n",
        r.run,
        r.model,
        serde_json::to_string(&r.via).unwrap_or_default().trim_matches('"')
    );
    let _ = writeln!(md, "- Questions: {}", r.selection);
    let _ = writeln!(
        md,
        "- Machine: {} (load average {} at start, {} at end)",
        r.machine, r.load_avg_start, r.load_avg_end
    );
    let _ = writeln!(md, "- Started {}, wall time {:.0} s", r.started_utc, r.wall_s);
    if let Some(h) = &r.model_sha256 {
        let _ = writeln!(md, "- Model sha256: `{h}`");
    }
    let _ = writeln!(md, "- Command: `{}`\n", r.command);
    let _ = writeln!(md, "| hardness | n | execution accuracy % | exact-set-match % |");
    let _ = writeln!(md, "|---|---:|---:|---:|");
    for (h, b) in ordered(r) {
        let _ = writeln!(md, "| {h} | {} | {} | {} |", b.n, pct(b.ex), pct(b.exact_set));
    }
    let _ = writeln!(md, "| **all** | **{}** | **{}** | **{}** |\n", s.n, pct(s.ex), pct(s.exact_set));
    let _ = writeln!(md, "| metric | value |");
    let _ = writeln!(md, "|---|---:|");
    let _ = writeln!(md, "| exact match after normalization | {}% |", pct(s.exact));
    let _ = writeln!(md, "| exact match, values masked | {}% |", pct(s.exact_novalues));
    let _ = writeln!(md, "| valid SQL (one read-only query that parses) | {}% |", pct(s.valid_sql));
    let _ = writeln!(md, "| schema adherence (every table/column exists) | {}% |", pct(s.schema_ok));
    let _ = writeln!(md, "| no answer (ask error) | {} |", s.ask_errors);
    if s.repaired_asks + s.voted + s.refusals > 0 {
        let _ = writeln!(md, "| asks answered by the greedy answer alone (sure, and it plans) | {} |", s.greedy_alone);
        let _ = writeln!(
            md,
            "| asks repaired from PostgreSQL's errors (answered after repair) | {} ({}) |",
            s.repaired_asks, s.repaired_answered
        );
        let margin = s.mean_vote_margin.map_or("–".into(), |m| format!("{m:.2}"));
        let _ = writeln!(md, "| asks decided by a vote among several results (mean margin) | {} ({margin}) |", s.voted);
        let _ = writeln!(md, "| refused as unanswerable | {} |", s.refusals);
    }
    let _ = writeln!(md, "| prediction failed to execute | {} |", s.exec_errors);
    let _ = writeln!(md, "| latency p50 / p95 | {:.2} s / {:.2} s |", s.latency_p50_s, s.latency_p95_s);
    if let Some(t) = s.decode_tok_s_p50 {
        let _ = writeln!(md, "| decode tokens/s (p50) | {t:.1} |");
    }
    if let Some(p) = s.prompt_tokens_p50 {
        let _ = writeln!(md, "| prompt tokens (p50) | {p} |");
    }
    if let Some(rc) = s.table_recall {
        let _ = writeln!(md, "| gold-table recall of the context (of {} parsed) | {}% |", s.table_recall_n, pct(rc));
    }
    if let Some(k) = s.context_tables_p50 {
        let _ = writeln!(md, "| tables shown (p50) | {k} |");
    }
    if !r.context_mismatches.is_empty() {
        let _ = writeln!(
            md,
            "\nContext through the extension differed from core's for: {}",
            r.context_mismatches.join(", ")
        );
    }
    md
}

fn font_path() -> Option<PathBuf> {
    [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// Register DejaVu Sans as plotters' "sans-serif" (once per process).
pub fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let font = font_path().ok_or("no DejaVuSans.ttf (apt-get install fonts-dejavu-core)".to_string())?;
        let bytes: &'static [u8] = Box::leak(std::fs::read(&font).map_err(|e| e.to_string())?.into_boxed_slice());
        plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes)
            .map_err(|_| format!("cannot read {}", font.display()))
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

/// Bars of execution accuracy (and exact-set-match) by hardness.
pub fn plot(r: &Report, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    register_font()?;

    let mut cats: Vec<(String, usize, f64, f64)> =
        ordered(r).into_iter().map(|(h, b)| (h, b.n, b.ex, b.exact_set)).collect();
    cats.push(("all".into(), r.summary.n, r.summary.ex, r.summary.exact_set));
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!("{} — Spider execution accuracy by hardness", r.model);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..cats.len() as f64, 0f64..118f64)?;
    let labels: Vec<String> = cats.iter().map(|c| format!("{} (n={})", c.0, c.1)).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(cats.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < labels.len() {
                labels[i].clone()
            } else {
                String::new()
            }
        })
        .y_desc("%")
        .y_labels(7)
        .y_label_formatter(&|y| if *y <= 100.0 { format!("{y:.0}") } else { String::new() })
        .label_style(("sans-serif", 15))
        .draw()?;
    let ex_color = RGBColor(52, 101, 164);
    let em_color = RGBColor(204, 121, 56);
    chart
        .draw_series(
            cats.iter().enumerate().map(|(i, c)| {
                Rectangle::new([(i as f64 + 0.12, 0.0), (i as f64 + 0.5, 100.0 * c.2)], ex_color.filled())
            }),
        )?
        .label("execution accuracy")
        .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], ex_color.filled()));
    chart
        .draw_series(
            cats.iter().enumerate().map(|(i, c)| {
                Rectangle::new([(i as f64 + 0.5, 0.0), (i as f64 + 0.88, 100.0 * c.3)], em_color.filled())
            }),
        )?
        .label("exact-set-match")
        .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], em_color.filled()));
    chart.draw_series(cats.iter().enumerate().map(|(i, c)| {
        Text::new(format!("{:.1}", 100.0 * c.2), (i as f64 + 0.18, 100.0 * c.2 + 4.0), ("sans-serif", 14))
    }))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}
