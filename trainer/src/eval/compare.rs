//! `copilot-trainer eval-compare`: several eval reports side by side — execution accuracy, what changed against a
//! baseline on the same questions (gained, lost, exact McNemar p), latency, and what the answer pipeline did.

use super::score::summarize;
use super::Report;
use anyhow::{Context, Result};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Clone)]
pub struct CompareArgs {
    /// Eval reports (`<run>.json`).
    pub reports: Vec<PathBuf>,
    /// Output stem: writes `<out>.json` and `<out>.md`.
    #[arg(long)]
    pub out: PathBuf,
    /// The run the others are compared with (its `run` name), for reports on Spider dev questions.
    #[arg(long)]
    pub baseline: Option<String>,
    /// The same for reports on Spider-Syn's questions.
    #[arg(long)]
    pub syn_baseline: Option<String>,
    /// Score every run on the questions all runs of its split (Spider dev, Spider-Syn) asked, so a run over a
    /// sample and runs over every question are compared on the same questions.
    #[arg(long)]
    pub common: bool,
}

/// `reports` cut to the questions every report of the same split asked, their summaries recomputed.
fn on_common_questions(reports: &mut [Report]) {
    let syn = |r: &Report| r.selection.contains("Spider-Syn");
    for split in [false, true] {
        let mut common: Option<HashSet<usize>> = None;
        for r in reports.iter().filter(|r| syn(r) == split) {
            let asked: HashSet<usize> = r.records.iter().map(|x| x.index).collect();
            common = Some(match common {
                Some(c) => c.intersection(&asked).copied().collect(),
                None => asked,
            });
        }
        let Some(common) = common else { continue };
        for r in reports.iter_mut().filter(|r| syn(r) == split) {
            r.records.retain(|x| common.contains(&x.index));
            r.summary = summarize(&r.records);
        }
    }
}

/// Two-sided exact McNemar p-value for `b` vs `c` discordant pairs.
pub fn mcnemar(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // P(X <= k) for X ~ Binomial(n, 1/2), doubled, capped at 1; in logs to stay finite for large n.
    let ln_half_n = -(n as f64) * std::f64::consts::LN_2;
    let mut ln_c = 0f64; // ln C(n, 0)
    let mut p = 0f64;
    for i in 0..=k {
        if i > 0 {
            ln_c += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        p += (ln_c + ln_half_n).exp();
    }
    (2.0 * p).min(1.0)
}

pub fn run(args: &CompareArgs) -> Result<()> {
    let mut reports = Vec::new();
    for p in &args.reports {
        let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        let r: Report =
            serde_json::from_str(&text).with_context(|| format!("{} is not an eval report", p.display()))?;
        reports.push(r);
    }
    if args.common {
        on_common_questions(&mut reports);
    }
    let by_name: HashMap<&str, &Report> = reports.iter().map(|r| (r.run.as_str(), r)).collect();
    let mut rows = Vec::new();
    let mut md = Vec::new();
    md.push("| run | questions | n | EX | vs baseline (gained / lost, McNemar p) | p50 | p95 | repaired (answered) | voted | refused |".to_string());
    md.push("|---|---|---|---|---|---|---|---|---|---|".to_string());
    for r in &reports {
        let syn = r.selection.contains("Spider-Syn");
        let base = if syn { args.syn_baseline.as_deref() } else { args.baseline.as_deref() };
        let (mut gained, mut lost) = (0usize, 0usize);
        let mut compared = None;
        if let Some(b) = base.and_then(|b| by_name.get(b)).filter(|b| b.run != r.run) {
            let theirs: HashMap<usize, bool> = b.records.iter().map(|x| (x.index, x.ex)).collect();
            for x in &r.records {
                match theirs.get(&x.index) {
                    Some(true) if !x.ex => lost += 1,
                    Some(false) if x.ex => gained += 1,
                    _ => {}
                }
            }
            compared = Some(b.run.clone());
        }
        let s = &r.summary;
        let p = mcnemar(gained, lost);
        let vs = match &compared {
            Some(_) => format!("+{gained} / −{lost}, p = {p:.2e}"),
            None => "–".into(),
        };
        md.push(format!(
            "| {} | {} | {} | **{:.1} %** | {} | {:.2} s | {:.2} s | {} ({}) | {} | {} |",
            r.run,
            if syn { "Spider-Syn" } else { "Spider dev" },
            s.n,
            100.0 * s.ex,
            vs,
            s.latency_p50_s,
            s.latency_p95_s,
            s.repaired_asks,
            s.repaired_answered,
            s.voted,
            s.refusals
        ));
        rows.push(serde_json::json!({
            "run": r.run, "questions": if syn { "spider-syn" } else { "spider-dev" }, "n": s.n, "ex": s.ex,
            "baseline": compared, "gained": gained, "lost": lost, "mcnemar_p": p,
            "latency_p50_s": s.latency_p50_s, "latency_p95_s": s.latency_p95_s,
            "repaired_asks": s.repaired_asks, "repaired_answered": s.repaired_answered, "voted": s.voted,
            "mean_vote_margin": s.mean_vote_margin, "refusals": s.refusals, "machine": r.machine,
            "command": r.command, "by_hardness": s.by_hardness,
        }));
    }
    // Runs compared across machines say so: the same seeded pipeline can answer differently on another CPU
    // (floating-point sums in another order), so such a pairing measures the change and the machine together.
    let mut machines: Vec<&str> = Vec::new();
    for r in reports.iter() {
        if !machines.contains(&r.machine.as_str()) {
            machines.push(&r.machine);
        }
    }
    let machine = match machines.as_slice() {
        [one] => one.to_string(),
        _ => format!(
            "not the same for every run ({}); paired differences include the machines' floating-point differences",
            reports.iter().map(|r| format!("{} on {}", r.run, r.machine)).collect::<Vec<_>>().join(", ")
        ),
    };
    std::fs::write(
        args.out.with_extension("json"),
        serde_json::to_string_pretty(&serde_json::json!({ "machine": machine, "runs": rows }))?,
    )?;
    let mut f = std::fs::File::create(args.out.with_extension("md"))?;
    writeln!(
        f,
        "# Answer pipeline: what each part adds\n\nMachine: {machine}. Each run's own report has its command.{}\n",
        if args.common {
            " Every run is scored on the questions all runs of its split asked (`--common`)."
        } else {
            ""
        }
    )?;
    writeln!(f, "{}", md.join("\n"))?;
    println!("{}", md.join("\n"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{mcnemar, on_common_questions};
    use crate::eval::Report;

    #[test]
    fn common_questions_cut_each_split_to_what_every_run_asked() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../reports/eval");
        let read = |f: &str| -> Report {
            serde_json::from_str(&std::fs::read_to_string(root.join(f)).expect("committed report")).expect("report")
        };
        // All of dev, a 100-question sample of it, and Spider-Syn (another split: left whole).
        let mut reports = vec![
            read("finetune_tuned_greedy.json"),
            read("dev100_pipeline.json"),
            read("finetune_tuned_syn_greedy.json"),
        ];
        let syn_n = reports[2].records.len();
        let sample: Vec<usize> = reports[1].records.iter().map(|r| r.index).collect();
        assert!(reports[0].records.len() > sample.len());
        on_common_questions(&mut reports);
        let mut asked: Vec<usize> = reports[0].records.iter().map(|r| r.index).collect();
        let mut want = sample.clone();
        asked.sort_unstable();
        want.sort_unstable();
        assert_eq!(asked, want);
        assert_eq!(reports[0].summary.n, sample.len());
        let correct = reports[0].records.iter().filter(|r| r.ex).count();
        assert!((reports[0].summary.ex - correct as f64 / sample.len() as f64).abs() < 1e-9);
        assert_eq!(reports[2].records.len(), syn_n);
        assert_eq!(reports[2].summary.n, syn_n);
    }

    #[test]
    fn exact_mcnemar_matches_the_binomial_tail() {
        assert_eq!(mcnemar(0, 0), 1.0);
        // 41 gained / 19 lost: the published p of the #5 fine-tuning run.
        assert!((mcnemar(41, 19) - 0.006).abs() < 0.001, "{}", mcnemar(41, 19));
        assert!((mcnemar(5, 5) - 1.0).abs() < 1e-9);
        assert!(mcnemar(300, 100) < 1e-20 && mcnemar(300, 100) > 0.0);
    }
}
