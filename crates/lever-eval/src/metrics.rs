//! Metrics of generated answers, and the bootstrap confidence interval of a mean.
//!
//! `exact_match`, `f1` and `contains` compare answers after SQuAD's normalization
//! (`normalize_answer` in the SQuAD v1.1 evaluation script, as lm-evaluation-harness and
//! HELM use it): lower case, ASCII punctuation removed, the articles a/an/the removed,
//! whitespace collapsed. `f1` is SQuAD's token F1 over those words. `regex` extracts the
//! answer with a pattern from both the output and the reference (GSM8K's `#### 42`) and
//! compares them after removing the `ignore` patterns, as lm-eval's `exact_match` with
//! `regexes_to_ignore` does.

use std::collections::HashMap;

use regex::Regex;

#[derive(Debug, Clone)]
pub enum Metric {
    ExactMatch,
    F1,
    Contains,
    Regex(RegexAnswer),
    /// Multiple choice by log-likelihood (lm-eval `acc`).
    Acc,
    /// Multiple choice by log-likelihood per character (lm-eval `acc_norm`).
    AccNorm,
    /// Perplexity of the target given the prompt (per token).
    Perplexity,
}

#[derive(Debug, Clone)]
pub struct RegexAnswer {
    pattern: Regex,
    target_pattern: Regex,
    last: bool,
    ignore: Vec<Regex>,
}

impl Metric {
    pub fn new(
        name: &str,
        pattern: Option<&str>,
        target_pattern: Option<&str>,
        pick: Option<&str>,
        ignore: &[String],
    ) -> std::result::Result<Metric, String> {
        let compile = |what: &str, p: &str| {
            Regex::new(p).map_err(|e| format!("{what} {p:?}: {}", one_line(&e.to_string())))
        };
        let m = match name {
            "exact_match" | "em" => Metric::ExactMatch,
            "f1" => Metric::F1,
            "contains" => Metric::Contains,
            "acc" => Metric::Acc,
            "acc_norm" => Metric::AccNorm,
            "perplexity" => Metric::Perplexity,
            "regex" => {
                let Some(p) = pattern else {
                    return Err(
                        "regex needs `pattern` (the answer is its group 1, else the whole match)"
                            .into(),
                    );
                };
                let pattern = compile("pattern", p)?;
                let target_pattern = compile("target_pattern", target_pattern.unwrap_or(p))?;
                let last = match pick.unwrap_or("first") {
                    "first" => false,
                    "last" => true,
                    other => return Err(format!("pick {other:?}: expected first or last")),
                };
                let ignore = ignore
                    .iter()
                    .map(|p| compile("ignore", p))
                    .collect::<std::result::Result<_, _>>()?;
                Metric::Regex(RegexAnswer {
                    pattern,
                    target_pattern,
                    last,
                    ignore,
                })
            }
            other => {
                return Err(format!(
                    "unknown metric {other:?} (expected exact_match, f1, contains, regex, acc, acc_norm or perplexity)"
                ));
            }
        };
        if !matches!(m, Metric::Regex(_))
            && (pattern.is_some()
                || target_pattern.is_some()
                || pick.is_some()
                || !ignore.is_empty())
        {
            return Err(format!(
                "{name}: pattern, target_pattern, pick and ignore belong to regex"
            ));
        }
        Ok(m)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Metric::ExactMatch => "exact_match",
            Metric::F1 => "f1",
            Metric::Contains => "contains",
            Metric::Regex(_) => "regex",
            Metric::Acc => "acc",
            Metric::AccNorm => "acc_norm",
            Metric::Perplexity => "perplexity",
        }
    }

    pub fn is_multiple_choice(&self) -> bool {
        matches!(self, Metric::Acc | Metric::AccNorm)
    }

    pub fn generates(&self) -> bool {
        matches!(
            self,
            Metric::ExactMatch | Metric::F1 | Metric::Contains | Metric::Regex(_)
        )
    }

    /// Score a generated `output` against `target`: (score in 0..1, extracted answer for
    /// `regex` when the pattern matched the output).
    pub fn score_text(&self, output: &str, target: &str) -> (f64, Option<String>) {
        match self {
            Metric::ExactMatch => (f64::from(u8::from(exact_match(output, target))), None),
            Metric::F1 => (token_f1(output, target), None),
            Metric::Contains => (f64::from(u8::from(contains(output, target))), None),
            Metric::Regex(r) => r.score(output, target),
            Metric::Acc | Metric::AccNorm | Metric::Perplexity => (0.0, None),
        }
    }
}

impl RegexAnswer {
    fn find(&self, re: &Regex, text: &str) -> Option<String> {
        let caps = if self.last {
            re.captures_iter(text).last()
        } else {
            re.captures(text)
        }?;
        let m = caps.get(1).or_else(|| caps.get(0))?;
        Some(m.as_str().to_string())
    }

    fn clean(&self, s: &str) -> String {
        let mut s = s.to_string();
        for re in &self.ignore {
            s = re.replace_all(&s, "").into_owned();
        }
        s.trim().to_string()
    }

    fn score(&self, output: &str, target: &str) -> (f64, Option<String>) {
        let want = self
            .find(&self.target_pattern, target)
            .unwrap_or_else(|| target.to_string());
        match self.find(&self.pattern, output) {
            Some(got) => {
                let ok = self.clean(&got) == self.clean(&want);
                (f64::from(u8::from(ok)), Some(got))
            }
            None => (0.0, None),
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// SQuAD's `normalize_answer`.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    no_punct
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn exact_match(output: &str, target: &str) -> bool {
    normalize_answer(output) == normalize_answer(target)
}

pub fn contains(output: &str, target: &str) -> bool {
    let t = normalize_answer(target);
    // Word boundaries: "4" is not contained in "14".
    let o = format!(" {} ", normalize_answer(output));
    !t.is_empty() && o.contains(&format!(" {t} "))
}

/// SQuAD's token F1 (0 or 1 when either side has no tokens, as `compute_f1` in SQuAD 2.0).
pub fn token_f1(output: &str, target: &str) -> f64 {
    let o = normalize_answer(output);
    let t = normalize_answer(target);
    let o: Vec<&str> = o.split_whitespace().collect();
    let t: Vec<&str> = t.split_whitespace().collect();
    if o.is_empty() || t.is_empty() {
        return f64::from(u8::from(o == t));
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for w in &t {
        *counts.entry(w).or_default() += 1;
    }
    let mut common = 0i64;
    for w in &o {
        if let Some(c) = counts.get_mut(w)
            && *c > 0
        {
            *c -= 1;
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let p = common as f64 / o.len() as f64;
    let r = common as f64 / t.len() as f64;
    2.0 * p * r / (p + r)
}

/// A statistic of resampled examples; `stat(indices)` computes it on one resample.
/// Returns the 2.5th and 97.5th percentiles over `iters` resamples (percentile bootstrap,
/// seeded, so a report is reproducible).
pub fn bootstrap_ci(
    n: usize,
    iters: usize,
    seed: u64,
    stat: &dyn Fn(&[usize]) -> f64,
) -> Option<(f64, f64)> {
    if n == 0 || iters == 0 {
        return None;
    }
    let mut rng = lever_model::rng::SplitMix64(seed);
    let mut idx = vec![0usize; n];
    let mut stats: Vec<f64> = (0..iters)
        .map(|_| {
            for i in idx.iter_mut() {
                *i = rng.below(n);
            }
            stat(&idx)
        })
        .collect();
    stats.sort_by(f64::total_cmp);
    let q = |p: f64| stats[((p * (iters - 1) as f64).round() as usize).min(iters - 1)];
    Some((q(0.025), q(0.975)))
}

/// The mean of `xs` with its 95% bootstrap interval.
pub fn mean_ci(xs: &[f64], iters: usize, seed: u64) -> (f64, Option<(f64, f64)>) {
    let mean = xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    let ci = bootstrap_ci(xs.len(), iters, seed, &|idx| {
        idx.iter().map(|&i| xs[i]).sum::<f64>() / idx.len() as f64
    });
    (mean, ci)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn squad_normalization_and_f1() {
        assert_eq!(normalize_answer("The  Cat, sat!"), "cat sat");
        assert!(exact_match("an Apple.", "apple"));
        assert!(!exact_match("apples", "apple"));
        // SQuAD: pred "the cat sat on mat" vs gold "cat on the mat": common {cat, on, mat}=3,
        // p = 3/4, r = 3/3 -> f1 = 6/7.
        assert!((token_f1("the cat sat on mat", "cat on the mat") - 6.0 / 7.0).abs() < 1e-12);
        assert_eq!(token_f1("", ""), 1.0);
        assert_eq!(token_f1("x", ""), 0.0);
        assert_eq!(token_f1("dog", "cat"), 0.0);
        assert!(contains("The answer is 4.", "4"));
        assert!(!contains("The answer is 14.", "4"));
    }

    #[test]
    fn regex_extracts_gsm8k_answers() {
        let m = Metric::new(
            "regex",
            Some(r"#### (\-?[0-9\.\,]+)"),
            None,
            None,
            &[",".into(), r"\$".into(), r"\.$".into()],
        )
        .unwrap();
        let target = "48/2 = 24\n#### 1,072";
        assert_eq!(
            m.score_text("so 1072.\n#### 1072", target),
            (1.0, Some("1072".into()))
        );
        assert_eq!(m.score_text("#### 1,072.", target).0, 1.0);
        assert_eq!(m.score_text("#### 107", target).0, 0.0);
        assert_eq!(m.score_text("the answer is 1072", target), (0.0, None));
        let last = Metric::new(
            "regex",
            Some(r"(-?[0-9]+)"),
            Some(r"#### (\d+)"),
            Some("last"),
            &[],
        )
        .unwrap();
        assert_eq!(last.score_text("3 + 4 = 7", "#### 7").0, 1.0);
        assert!(Metric::new("regex", None, None, None, &[]).is_err());
        assert!(
            Metric::new("regex", Some("("), None, None, &[])
                .unwrap_err()
                .contains("pattern")
        );
        assert!(Metric::new("f1", Some("x"), None, None, &[]).is_err());
    }

    #[test]
    fn bootstrap_interval_brackets_the_mean_and_is_reproducible() {
        let xs: Vec<f64> = (0..200).map(|i| f64::from(u8::from(i % 4 == 0))).collect();
        let (m, ci) = mean_ci(&xs, 1000, 0);
        let (lo, hi) = ci.unwrap();
        assert!((m - 0.25).abs() < 1e-12);
        assert!(lo < m && m < hi, "{lo} {m} {hi}");
        // Normal approximation: 1.96 * sqrt(.25 * .75 / 200) = 0.060.
        assert!((hi - lo - 0.12).abs() < 0.03, "{lo} {hi}");
        assert_eq!(mean_ci(&xs, 1000, 0).1, ci);
        // All equal: a zero-width interval.
        assert_eq!(mean_ci(&[1.0; 5], 100, 3).1, Some((1.0, 1.0)));
        assert_eq!(mean_ci(&[], 100, 3).1, None);
    }
}
