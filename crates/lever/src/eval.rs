//! `lever eval mc`: multiple-choice accuracy by log-likelihood (lever-eval).

use std::time::Instant;

use anyhow::Result;
use lever_eval::McOptions;

use crate::cli::EvalMcArgs;

pub fn mc(a: EvalMcArgs) -> Result<()> {
    let mut items = lever_eval::read_items(&a.data)?;
    if let Some(n) = a.limit {
        items.truncate(n);
    }
    let model = crate::load_model(&a.model)?;
    let opts = McOptions {
        prefix_reuse: !a.no_prefix_cache,
    };
    let bar = crate::progress::counter(items.len() as u64, "scoring");
    let start = Instant::now();
    let result = lever_eval::evaluate(&model, &items, opts, &mut |done, _| {
        bar.set_position(done as u64)
    });
    bar.finish_and_clear();
    let (report, _) = result?;
    let secs = start.elapsed().as_secs_f64();
    let rate = report.n as f64 / secs.max(1e-9);
    eprintln!(
        "{}: {} items in {secs:.2} s, {rate:.2} examples/s ({})",
        a.data.display(),
        report.n,
        if opts.prefix_reuse {
            "prefix reuse"
        } else {
            "no prefix reuse"
        }
    );
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["examples_per_s"] = serde_json::json!(rate);
        println!("{v}");
    } else {
        let se = |s: Option<f64>| s.map_or(String::new(), |s| format!(" ± {s:.4}"));
        println!("acc       {:.4}{}", report.acc, se(report.acc_stderr));
        println!(
            "acc_norm  {:.4}{}",
            report.acc_norm,
            se(report.acc_norm_stderr)
        );
        println!("n         {}", report.n);
    }
    Ok(())
}
