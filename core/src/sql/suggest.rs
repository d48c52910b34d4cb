//! Names the model may have meant: when PostgreSQL says a column or table does not exist, the closest names the
//! schema does have. PostgreSQL's own HINT covers only a column that exists under another alias of the query; a
//! small model that wrote `air_date` for `original_air_date`, or `singers` for `singer`, needs the real name put in
//! front of it, or its repair repeats the mistake.

use crate::sql::schema::Catalog;

/// What PostgreSQL's message says is missing: `column "x" does not exist`, `column t.x does not exist`,
/// `relation "x" does not exist` (the name without quotes or qualifier), and whether it is a table.
pub fn missing_name(message: &str) -> Option<(String, bool)> {
    let rest = message.trim_start_matches("ERROR:").trim();
    let (is_table, rest) = if let Some(r) = rest.strip_prefix("column ") {
        (false, r)
    } else if let Some(r) = rest.strip_prefix("relation ") {
        (true, r)
    } else {
        return None;
    };
    let name = rest.split(" does not exist").next()?.trim().trim_matches('"');
    let name = name.rsplit('.').next()?.trim_matches('"');
    (!name.is_empty()).then(|| (name.to_lowercase(), is_table))
}

/// Levenshtein distance over characters.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// How close `have` is to the `missing` name: lower is closer, `None` when not close at all. A name that contains
/// the other (`air_date` / `original_air_date`), shares a word (`name` / `song_name`), or is a few edits away.
fn closeness(missing: &str, have: &str) -> Option<usize> {
    let have = have.to_lowercase();
    if have == missing {
        return Some(0);
    }
    let d = distance(missing, &have);
    if have.contains(missing) || missing.contains(have.as_str()) {
        return Some(1 + d);
    }
    let words = |s: &str| s.split('_').filter(|w| w.len() > 2).map(str::to_string).collect::<Vec<_>>();
    let (mw, hw) = (words(missing), words(&have));
    if mw.iter().any(|w| hw.contains(w)) {
        return Some(20 + d);
    }
    (d <= 2.max(missing.len() / 4)).then_some(40 + d)
}

/// A sentence naming up to three schema names close to what PostgreSQL said is missing, or `None`.
pub fn similar_names(message: &str, catalog: &Catalog) -> Option<String> {
    let (missing, is_table) = missing_name(message)?;
    let mut found: Vec<(usize, String)> = Vec::new();
    for t in &catalog.tables {
        if is_table {
            if let Some(c) = closeness(&missing, &t.name) {
                found.push((c, t.name.clone()));
            }
        } else {
            for col in &t.columns {
                if let Some(c) = closeness(&missing, &col.name) {
                    found.push((c, format!("{}.{}", t.name, col.name)));
                }
            }
        }
    }
    found.sort();
    found.dedup_by(|a, b| a.1 == b.1);
    let names: Vec<String> = found.into_iter().take(3).map(|(_, n)| n).collect();
    if names.is_empty() {
        return None;
    }
    let what = if is_table { "Tables" } else { "Columns" };
    Some(format!("{what} with similar names in the schema: {}.", names.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::schema::{Column, Table};

    fn catalog() -> Catalog {
        let t = |name: &str, cols: &[&str]| Table {
            schema: String::new(),
            name: name.into(),
            kind: Default::default(),
            columns: cols
                .iter()
                .map(|c| Column { name: c.to_string(), data_type: "text".into(), ..Default::default() })
                .collect(),
            primary_key: vec![],
            foreign_keys: vec![],
            comment: None,
        };
        Catalog {
            tables: vec![
                t("cartoon", &["id", "title", "directed_by", "original_air_date"]),
                t("singer", &["singer_id", "name", "song_name", "country"]),
            ],
        }
    }

    #[test]
    fn postgres_messages_name_what_is_missing() {
        assert_eq!(missing_name("ERROR:  column \"air_date\" does not exist"), Some(("air_date".into(), false)));
        assert_eq!(missing_name("column t2.Name does not exist"), Some(("name".into(), false)));
        assert_eq!(missing_name("ERROR:  relation \"singers\" does not exist"), Some(("singers".into(), true)));
        assert_eq!(missing_name("ERROR:  syntax error at or near \"FROM\""), None);
    }

    #[test]
    fn close_names_are_offered_closest_first() {
        let c = catalog();
        assert_eq!(
            similar_names("ERROR:  column \"air_date\" does not exist", &c).unwrap(),
            "Columns with similar names in the schema: cartoon.original_air_date."
        );
        assert_eq!(
            similar_names("ERROR:  relation \"singers\" does not exist", &c).unwrap(),
            "Tables with similar names in the schema: singer."
        );
        let s = similar_names("ERROR:  column \"singer_name\" does not exist", &c).unwrap();
        assert!(
            s.starts_with("Columns with similar names in the schema: singer.singer_id") || s.contains("singer.name"),
            "{s}"
        );
        assert_eq!(similar_names("ERROR:  column \"zzz\" does not exist", &c), None);
    }
}

/// Words too common to say what a question is about.
const STOPWORDS: &[&str] = &[
    "a",
    "about",
    "after",
    "all",
    "also",
    "an",
    "and",
    "any",
    "are",
    "as",
    "at",
    "average",
    "be",
    "been",
    "before",
    "between",
    "both",
    "but",
    "by",
    "can",
    "count",
    "did",
    "different",
    "distinct",
    "do",
    "does",
    "each",
    "either",
    "every",
    "except",
    "find",
    "first",
    "for",
    "from",
    "give",
    "given",
    "greater",
    "has",
    "have",
    "highest",
    "how",
    "if",
    "in",
    "into",
    "is",
    "it",
    "its",
    "last",
    "least",
    "less",
    "list",
    "lowest",
    "many",
    "maximum",
    "minimum",
    "more",
    "most",
    "much",
    "names",
    "name",
    "not",
    "number",
    "numbers",
    "of",
    "on",
    "one",
    "only",
    "or",
    "order",
    "ordered",
    "other",
    "over",
    "per",
    "return",
    "show",
    "smallest",
    "sorted",
    "than",
    "that",
    "the",
    "their",
    "them",
    "there",
    "these",
    "they",
    "this",
    "those",
    "times",
    "to",
    "top",
    "total",
    "under",
    "what",
    "when",
    "where",
    "which",
    "who",
    "whose",
    "with",
    "without",
    "largest",
    "descending",
    "ascending",
    "biggest",
    "along",
    "amount",
    "same",
];

/// A crude stem: lower case, and a plural or past-tense ending dropped, so `singers` meets `singer`.
fn stem(w: &str) -> String {
    let w = w.to_lowercase();
    for suf in ["ies", "es", "s", "ed", "ing"] {
        if w.len() > suf.len() + 3 && w.ends_with(suf) {
            return w[..w.len() - suf.len()].to_string();
        }
    }
    w
}

/// How much of the question the schema speaks of: the share of the question's content words (not stopwords,
/// numbers or quoted values) that match a word of a table or column name, comment or value hint (same stem, or one
/// containing the other when both have at least four letters). A question about something the schema does not hold
/// scores near 0; one about its tables, near 1. `None` when the question has no content word.
pub fn grounding(question: &str, catalog: &Catalog) -> Option<f32> {
    Grounding::of(question, catalog).map(|g| g.share())
}

/// A question against a schema: which of its content words the schema spells, and — for a question that spells
/// almost none of them — whether it is still close in meaning to one of the tables ([`Grounding::closeness`], with
/// a sentence encoder in the engine): "How many musicians are there?" spells nothing of `singer(singer_id, name,
/// …)` but means it. It crosses to the engine with a request that may put the question to the model's
/// cannot-answer judge; a question close to a table skips the judge.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Grounding {
    /// The question as asked.
    pub question: String,
    /// The question's content words, lower case.
    pub words: Vec<String>,
    /// For each word: does a schema word match it by spelling?
    pub spelled: Vec<bool>,
    /// Each table as a sentence: its name, comment and column names in words (`singer: singer id, name, age`).
    pub tables: Vec<String>,
    /// The question counts as grounded when its vector and some table's have at least this cosine
    /// (`copilot.grounding_similarity`).
    pub min_similarity: f32,
}

/// Tables described for matching by meaning (the first ones, in catalog order).
const MEANING_TABLES: usize = 500;

/// A name in words: `song_release_year` → `song release year`.
fn in_words(name: &str) -> String {
    name.split(|c: char| c == '_' || c.is_whitespace()).filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ")
}

impl Grounding {
    /// The grounding of `question` in `catalog`; `None` when the question has no content word.
    pub fn of(question: &str, catalog: &Catalog) -> Option<Grounding> {
        let mut stems: Vec<String> = Vec::new();
        let mut add = |text: &str| {
            for w in text.split(|c: char| !c.is_alphanumeric()).filter(|w| w.len() > 1) {
                stems.push(stem(w));
            }
        };
        for t in &catalog.tables {
            add(&t.name);
            add(t.comment.as_deref().unwrap_or(""));
            for c in &t.columns {
                add(&c.name);
                add(c.comment.as_deref().unwrap_or(""));
                c.values.iter().for_each(|v| add(v));
            }
        }
        // Quoted values are data, not schema words.
        let mut unquoted = String::new();
        let mut quote: Option<char> = None;
        for ch in question.chars() {
            match quote {
                Some(q) if ch == q => quote = None,
                Some(_) => {}
                None if ch == '"' || ch == '\'' || ch == '“' => quote = Some(if ch == '“' { '”' } else { ch }),
                None => unquoted.push(ch),
            }
        }
        let words: Vec<String> = unquoted
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| w.len() > 1 && !w.chars().all(|c| c.is_ascii_digit()))
            .map(|w| w.to_lowercase())
            .filter(|w| !STOPWORDS.contains(&w.as_str()))
            .collect();
        if words.is_empty() {
            return None;
        }
        let matches = |w: &str| {
            let s = stem(w);
            stems
                .iter()
                .any(|v| *v == s || (s.len() >= 4 && v.len() >= 4 && (v.contains(&s) || s.contains(v.as_str()))))
        };
        let spelled = words.iter().map(|w| matches(w)).collect();
        let tables = catalog
            .tables
            .iter()
            .take(MEANING_TABLES)
            .map(|t| {
                let cols: Vec<String> = t.columns.iter().map(|c| in_words(&c.name)).collect();
                match t.comment.as_deref().map(str::trim).filter(|c| !c.is_empty()) {
                    Some(c) => format!("{} ({c}): {}", in_words(&t.name), cols.join(", ")),
                    None => format!("{}: {}", in_words(&t.name), cols.join(", ")),
                }
            })
            .collect();
        Some(Grounding { question: question.to_string(), words, spelled, tables, min_similarity: 1.0 })
    }

    /// The share of the question's words the schema spells.
    pub fn share(&self) -> f32 {
        self.spelled.iter().filter(|s| **s).count() as f32 / self.words.len().max(1) as f32
    }

    /// How close in meaning the question is to its closest table: the largest `similarity(question, table)` over
    /// the tables' sentences (`None` without tables).
    pub fn closeness(&self, similarity: impl FnOnce(&str, &[&str]) -> Vec<f32>) -> Option<f32> {
        if self.tables.is_empty() {
            return None;
        }
        let tables: Vec<&str> = self.tables.iter().map(String::as_str).collect();
        similarity(&self.question, &tables).into_iter().reduce(f32::max)
    }
}

#[cfg(test)]
mod grounding_tests {
    use super::*;
    use crate::sql::schema::{Column, Table};

    #[test]
    fn a_question_about_the_schema_is_grounded_and_one_about_something_else_is_not() {
        let t = |name: &str, cols: &[&str]| Table {
            schema: String::new(),
            name: name.into(),
            kind: Default::default(),
            columns: cols
                .iter()
                .map(|c| Column { name: c.to_string(), data_type: "text".into(), ..Default::default() })
                .collect(),
            primary_key: vec![],
            foreign_keys: vec![],
            comment: None,
        };
        let c =
            Catalog { tables: vec![t("singer", &["singer_id", "name", "country", "age"]), t("concert", &["year"])] };
        assert_eq!(grounding("How many singers are from France?", &c), Some(0.5)); // singers ✓, france ✗
        assert_eq!(grounding("What is the average age of singers by country?", &c), Some(1.0));
        assert_eq!(grounding("How many flights depart from the airport 'APG'?", &c), Some(0.0));
        assert_eq!(grounding("How many are there?", &c), None);
    }

    #[test]
    fn a_question_that_spells_no_table_is_compared_by_meaning_with_each_table() {
        let col = |n: &str| Column { name: n.into(), data_type: "text".into(), ..Default::default() };
        let table = |name: &str, comment: Option<&str>, cols: Vec<Column>| Table {
            schema: String::new(),
            name: name.into(),
            kind: Default::default(),
            columns: cols,
            primary_key: vec![],
            foreign_keys: vec![],
            comment: comment.map(Into::into),
        };
        let c = Catalog {
            tables: vec![
                table(
                    "singer",
                    Some("People who sing"),
                    vec![col("singer_id"), Column { values: vec!["Netherlands".into()], ..col("citizenship") }],
                ),
                table("concert", None, vec![col("concert_name"), col("year")]),
            ],
        };
        let g = Grounding::of("How many musicians are from 'Singer Land' in Netherlands?", &c).unwrap();
        // The quoted value is not a word of the question; a value hint spells a word.
        assert_eq!(g.words, ["musicians", "netherlands"]);
        assert_eq!(g.spelled, [false, true]);
        assert_eq!(g.tables, ["singer (People who sing): singer id, citizenship", "concert: concert name, year"]);
        let mut asked = None;
        let close = g.closeness(|q, tables| {
            asked = Some((q.to_string(), tables.len()));
            vec![0.3, 0.6]
        });
        assert_eq!(close, Some(0.6));
        assert_eq!(asked, Some(("How many musicians are from 'Singer Land' in Netherlands?".to_string(), 2)));
        assert_eq!(Grounding { tables: vec![], ..g }.closeness(|_, _| vec![1.0]), None);
    }
}
