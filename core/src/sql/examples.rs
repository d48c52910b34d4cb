//! Verified examples: which question→SQL pairs users taught to show the model next to a new question.
//!
//! Ranking is lexical — Okapi BM25 over the examples' questions, words lowercased and reduced by a light suffix
//! stemmer — so it needs no model, is the same on every machine, and is cheap for the few thousand examples one
//! database holds. The examples a caller may see are chosen before ranking (the extension reads them through
//! row-level security, as the caller); this module only orders them.

use std::collections::HashMap;

/// BM25's term-frequency saturation and length normalization (the usual values).
const K1: f32 = 1.2;
const B: f32 = 0.75;

/// Words too common in questions to tell examples apart.
const STOPWORDS: &[&str] = &[
    "a", "all", "an", "and", "any", "are", "as", "at", "be", "by", "did", "do", "does", "each", "every", "for", "from",
    "give", "has", "have", "how", "i", "in", "is", "it", "its", "list", "me", "of", "on", "or", "please", "return",
    "show", "that", "the", "their", "them", "there", "these", "this", "those", "to", "was", "were", "what", "when",
    "where", "which", "who", "whose", "with",
];

/// The words of `text` as the ranker compares them: lowercased alphanumeric runs, stopwords dropped, a plural or
/// verb suffix removed (`singers` → `singer`, `countries` → `country`, `held` stays).
pub fn terms(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .filter(|w| !STOPWORDS.contains(&w.as_str()))
        .map(|w| stem(&w))
        .collect()
}

fn stem(w: &str) -> String {
    let n = w.chars().count();
    if n <= 3 || !w.is_ascii() {
        return w.to_string();
    }
    if let Some(s) = w.strip_suffix("ies") {
        return format!("{s}y");
    }
    // `classes`, `boxes`, `matches` lose `es`; `courses`, `houses`, `cases` only their `s` (below).
    if let Some(s) = w.strip_suffix("es").filter(|s| ["ss", "x", "z", "ch", "sh"].iter().any(|e| s.ends_with(e))) {
        return s.to_string();
    }
    for suffix in ["ing", "ed", "s"] {
        if let Some(s) = w.strip_suffix(suffix) {
            if s.len() >= 3 && !s.ends_with('s') {
                return s.to_string();
            }
        }
    }
    w.to_string()
}

/// Rank `documents` (examples' questions) for `query`: the indexes of at most `k` documents sharing a word with
/// it, best first (ties: the earlier document first), with their BM25 scores.
pub fn rank(query: &str, documents: &[&str], k: usize) -> Vec<(usize, f32)> {
    let docs: Vec<Vec<String>> = documents.iter().map(|d| terms(d)).collect();
    rank_terms(query, &docs, k)
}

/// [`rank`] over documents already cut into their [`terms`], for a caller that needs those terms too.
pub fn rank_terms(query: &str, docs: &[Vec<String>], k: usize) -> Vec<(usize, f32)> {
    if docs.is_empty() || k == 0 {
        return Vec::new();
    }
    let mut df: HashMap<&str, usize> = HashMap::new();
    for d in docs {
        let mut seen: Vec<&str> = d.iter().map(String::as_str).collect();
        seen.sort_unstable();
        seen.dedup();
        for t in seen {
            *df.entry(t).or_default() += 1;
        }
    }
    let n = docs.len() as f32;
    let avg_len = (docs.iter().map(Vec::len).sum::<usize>() as f32 / n).max(1.0);
    let mut q = terms(query);
    q.sort_unstable();
    q.dedup();
    let mut scored: Vec<(usize, f32)> = docs
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            let len = d.len() as f32;
            let score: f32 = q
                .iter()
                .filter_map(|t| {
                    let f = d.iter().filter(|w| *w == t).count() as f32;
                    if f == 0.0 {
                        return None;
                    }
                    let df = df.get(t.as_str()).copied().unwrap_or(0) as f32;
                    let idf = ((n - df + 0.5) / (df + 0.5) + 1.0).ln();
                    Some(idf * f * (K1 + 1.0) / (f + K1 * (1.0 - B + B * len / avg_len)))
                })
                .sum();
            (score > 0.0).then_some((i, score))
        })
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(k);
    scored
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_drop_stopwords_and_fold_plurals() {
        assert_eq!(terms("How many singers are from France?"), vec!["many", "singer", "france"]);
        assert_eq!(terms("List the countries' names"), vec!["country", "name"]);
        assert_eq!(terms("cities hosting boxes"), vec!["city", "host", "box"]);
        // A plural and its singular meet, also where the singular ends in `e` or `ss`.
        assert_eq!(terms("courses course classes class matches"), vec!["course", "course", "class", "class", "match"]);
        assert_eq!(terms("Ünïcode wörds stay"), vec!["ünïcode", "wörds", "stay"]);
        assert!(terms("  ?? !! ").is_empty());
    }

    #[test]
    fn the_closest_question_ranks_first_and_unrelated_ones_not_at_all() {
        let docs = [
            "How many singers do we have?",
            "What is the average age of all singers from France?",
            "Show the names of stadiums with capacity over 5000",
            "How many concerts were held in 2014?",
        ];
        let r = rank("how many singers are from France", &docs, 3);
        assert_eq!(r[0].0, 1, "{r:?}");
        assert_eq!(r[1].0, 0, "{r:?}");
        assert!(r.iter().all(|(i, _)| *i != 2), "a question sharing no word is not returned: {r:?}");
        assert!(r.windows(2).all(|w| w[0].1 >= w[1].1), "best first: {r:?}");
        assert_eq!(rank("stadium capacity", &docs, 1), vec![(2, rank("stadium capacity", &docs, 1)[0].1)]);
    }

    #[test]
    fn rare_words_weigh_more_than_common_ones() {
        let docs = ["count the orders", "count the orders by region", "count the invoices"];
        // "invoices" appears once, "orders" twice: the invoice question wins a query naming both once.
        assert_eq!(rank("count orders invoices", &docs, 3)[0].0, 2);
    }

    #[test]
    fn empty_inputs_rank_nothing() {
        assert!(rank("anything", &[], 3).is_empty());
        assert!(rank("", &["a question"], 3).is_empty());
        assert!(rank("question", &["a question"], 0).is_empty());
    }
}
