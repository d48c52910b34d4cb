//! A scripted backend for tests: answers come from a JSON file instead of a model, so the answer pipeline around
//! the model (checking, repair, the vote, refusals) can be tested with exact, chosen answers.
//!
//! `copilot.model = 'script:/path/rules.json'` (the extension) or [`Scripted::load`]. The file holds rules, tried
//! in order; the first whose `match` is a substring of the request's last user message (the question, or a repair
//! turn carrying PostgreSQL's error) answers it:
//!
//! ```json
//! {"rules": [
//!   {"match": "how many singers", "answers": ["SELECT count(*) FROM singers", "SELECT count(*) FROM singer"],
//!    "p_unanswerable": 0.1}
//! ]}
//! ```
//!
//! The first answer is the "greedy" one; a request for k candidates gets the first k (fewer if the rule has
//! fewer; with `skip_greedy`, the second to the k-th). `"min_p": [0.9, 0.4]` gives the answers' confidences
//! ([`Candidate::min_p`]; none when absent). `"closeness": 0.6` plays a sentence encoder: a judged request that
//! carries its grounding gets this as the question's closeness to the schema, and no verdict when it reaches the
//! grounding's `min_similarity` (as the local engine does). A request no rule matches gets an answer with no SQL in
//! it. Not a model: never used to answer users.

use crate::engine::backend::{Backend, Candidate, GenerateRequest, Generation, StopReason};
use crate::error::CoreError;
use crate::sql::extract::extract_sql;
use crate::sql::prompt::ASSISTANT_PRIMER;
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Deserialize)]
struct Rule {
    #[serde(rename = "match")]
    pattern: String,
    answers: Vec<String>,
    #[serde(default)]
    p_unanswerable: Option<f32>,
    #[serde(default)]
    min_p: Vec<f32>,
    #[serde(default)]
    closeness: Option<f32>,
}

#[derive(Debug, Clone, Deserialize)]
struct Script {
    rules: Vec<Rule>,
}

/// The scripted backend (see the module documentation).
#[derive(Debug)]
pub struct Scripted {
    rules: Vec<Rule>,
}

impl Scripted {
    pub fn load(path: &Path) -> Result<Scripted, CoreError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CoreError::Model(format!("cannot read the script {}: {e}", path.display())))?;
        let script: Script = serde_json::from_str(&text)
            .map_err(|e| CoreError::Model(format!("{} is not a valid answer script: {e}", path.display())))?;
        Ok(Scripted { rules: script.rules })
    }

    fn candidate(text: &str, min_p: Option<f32>) -> Candidate {
        Candidate {
            text: text.to_string(),
            sql: extract_sql(&format!("{ASSISTANT_PRIMER}{text}")),
            generated_tokens: text.split_whitespace().count(),
            min_p,
        }
    }
}

impl Backend for Scripted {
    fn generate(&mut self, req: &GenerateRequest, cancel: &dyn Fn() -> bool) -> Result<Generation, CoreError> {
        if req.rank_tables {
            // The script plays no sentence encoder for tables: they are chosen by their words.
            return Ok(Generation::ranked(Vec::new()));
        }
        if req.sampling.rows().is_empty() {
            return Err(CoreError::Inference("skip_greedy needs at least two candidates".into()));
        }
        if cancel() {
            return Err(CoreError::Cancelled);
        }
        let rule = self.rules.iter().find(|r| req.question.contains(&r.pattern));
        let mut cands: Vec<Candidate> = match rule {
            Some(r) if r.answers.len() > usize::from(req.sampling.skip_greedy) => req
                .sampling
                .rows()
                .filter_map(|i| Some(Scripted::candidate(r.answers.get(i)?, r.min_p.get(i).copied())))
                .collect(),
            _ => vec![Scripted::candidate("I have no scripted answer for that.", None)],
        };
        let greedy = cands.remove(0);
        let closeness = rule.and_then(|r| r.closeness).filter(|_| req.judge && req.grounding.is_some());
        let near = req.close_to_a_table(closeness);
        Ok(Generation {
            text: greedy.text,
            sql: greedy.sql,
            prompt_tokens: req.question.split_whitespace().count() + 1,
            generated_tokens: greedy.generated_tokens,
            min_p: greedy.min_p,
            prefill_s: 0.0,
            decode_s: 0.0,
            stop: StopReason::Eos,
            prefix_tokens: 0,
            prefix_cache_hit: false,
            decoded_rows: greedy.generated_tokens + cands.iter().map(|c| c.generated_tokens).sum::<usize>(),
            twin_rows: 0,
            samples: cands,
            p_unanswerable: if req.judge && !near {
                Some(rule.and_then(|r| r.p_unanswerable).unwrap_or(0.0))
            } else {
                None
            },
            closeness,
            draft: Default::default(),
            table_closeness: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::backend::Sampling;

    #[test]
    fn the_first_matching_rule_answers_with_as_many_candidates_as_asked() {
        let dir = std::env::temp_dir().join(format!("copilot-script-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rules.json");
        std::fs::write(
            &path,
            r#"{"rules": [{"match": "singers", "answers": ["SELECT 1", "SELECT 2", "SELECT 3"], "p_unanswerable": 0.25},
                          {"match": "", "answers": ["SELECT 0"]}]}"#,
        )
        .unwrap();
        let mut s = Scripted::load(&path).unwrap();
        let mut req = GenerateRequest { question: "how many singers?".into(), judge: true, ..Default::default() };
        req.sampling = Sampling { candidates: 2, ..Sampling::default() };
        let g = s.generate(&req, &|| false).unwrap();
        assert_eq!(g.sql.as_deref(), Some("SELECT 1"));
        assert_eq!(g.samples.iter().map(|c| c.sql.clone().unwrap()).collect::<Vec<_>>(), vec!["SELECT 2"]);
        assert_eq!(g.p_unanswerable, Some(0.25));
        // Without the greedy answer: the second and third.
        req.sampling = Sampling { candidates: 3, skip_greedy: true, ..Sampling::default() };
        let g = s.generate(&req, &|| false).unwrap();
        let sqls: Vec<String> = g.candidates().into_iter().map(|c| c.sql.unwrap()).collect();
        assert_eq!(sqls, vec!["SELECT 2", "SELECT 3"]);
        req.sampling = Sampling::default();
        req.question = "anything else".into();
        assert_eq!(s.generate(&req, &|| false).unwrap().sql.as_deref(), Some("SELECT 0"));
        assert!(matches!(s.generate(&req, &|| true), Err(CoreError::Cancelled)));
        // A judged request with its grounding: a rule's closeness at the minimum spares it the verdict.
        std::fs::write(
            &path,
            r#"{"rules": [{"match": "musicians", "answers": ["SELECT 1"], "p_unanswerable": 0.9, "closeness": 0.5}]}"#,
        )
        .unwrap();
        let mut s = Scripted::load(&path).unwrap();
        let grounding = crate::sql::suggest::Grounding { min_similarity: 0.5, ..Default::default() };
        req.question = "how many musicians?".into();
        req.grounding = Some(Box::new(grounding.clone()));
        let g = s.generate(&req, &|| false).unwrap();
        assert_eq!((g.closeness, g.p_unanswerable), (Some(0.5), None));
        req.grounding = Some(Box::new(crate::sql::suggest::Grounding { min_similarity: 0.6, ..grounding }));
        let g = s.generate(&req, &|| false).unwrap();
        assert_eq!((g.closeness, g.p_unanswerable), (Some(0.5), Some(0.9)));
        req.grounding = None;
        assert_eq!(s.generate(&req, &|| false).unwrap().closeness, None);
        // A ranking of tables: no scores from the script (tables are chosen by their words), nothing generated.
        let rank = GenerateRequest { rank_tables: true, ..req.clone() };
        let a = s.generate(&rank, &|| false).unwrap().answer();
        assert_eq!((a.table_closeness, a.candidates.len()), (Some(Vec::new()), 0));
        std::fs::write(&path, "not json").unwrap();
        assert!(Scripted::load(&path).unwrap_err().to_string().contains("not a valid answer script"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
