//! Schema selection: which tables and columns a question needs, when the whole readable schema does not fit the
//! context budget.
//!
//! Tables are scored against the question lexically — Okapi BM25 ([`crate::sql::examples::rank`]) over each
//! table's name (counted three times), its columns' names, comments and value hints, identifiers split at `_` and
//! case changes — plus a share of their foreign-key neighbours' scores. Then, best first, a table is taken with
//! the tables on the shortest foreign-key path to those already taken and the tables it references that the
//! question names too (a join path stays whole: all or none), as long as the rendered context fits the budget. When
//! it does not, columns go before tables: the new tables' columns that are neither keys nor named by the question are
//! dropped, widest table first, before a table is given up. Tables taken before keep their columns (they rank higher:
//! `addresses` keeps `country` rather than make room for a table the question barely names).
//! Below the budget nothing changes: the catalog is returned as it was. The result depends only on the catalog,
//! the question and the budget (ties go to the name), so the same question sees the same context.
//!
//! What the caller may not read never reaches this module: the extension builds the catalog as the caller.

use crate::sql::examples;
use crate::sql::schema::{Catalog, Table};
use std::collections::{BTreeMap, HashSet, VecDeque};

/// How much of a table's best neighbour's score it inherits: a junction table the question does not name still
/// ranks near the tables it joins.
const NEIGHBOUR_SHARE: f32 = 0.3;
/// The weight of the table-name field against the whole document's (see [`scores`]).
const NAME_WEIGHT: f32 = 1.0;
/// Foreign-key hops allowed on a path joining a table to those already chosen.
const MAX_PATH: usize = 3;

/// What selection did, for `copilot.context(question)` and the benchmark.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Tables in the full catalog, and kept.
    pub tables_total: usize,
    pub tables_kept: usize,
    /// Columns dropped from tables that were kept.
    pub columns_dropped: usize,
    /// The full catalog's cost and the selection's (in the caller's unit, e.g. estimated tokens).
    pub cost_total: usize,
    pub cost_kept: usize,
    /// False when the catalog fitted and was returned unchanged.
    pub selected: bool,
    /// The schemas the selection was narrowed to, when the catalog spans several (see [`focus_schemas`]): the
    /// question's schema first, and a second one the question's words do not tell apart from it.
    pub schemas: Vec<String>,
}

/// The schemas a question is about, when the catalog spans several: first the one whose two best-matching tables
/// match it best together (a question names one table or joins a few, nearly always within one schema; ties go to
/// the name). Tables of other schemas are then shown only on a foreign-key path from the chosen ones: tables of
/// unrelated schemas that happen to share words with the question (`car_1.countries` beside `world_1.country`)
/// otherwise end up joined together in the model's SQL. A second schema is kept beside the first when the question
/// gives no word telling the two apart: every question word the first's two best tables contain is in the
/// second's two best tables too (`How many singers are there?` against a `singer` schema and a `concert_singer`
/// schema that both have a `singer` table). Of several such schemas the strongest is taken, so at most two schemas
/// are shown. Empty for one schema, or when no table matches at all.
fn focus_schemas<'a>(tables: &'a [Table], own: &[f32], words: &[HashSet<String>]) -> Vec<&'a str> {
    // Per schema: its two best tables (score, index), best first.
    let mut best: BTreeMap<&str, [(f32, Option<usize>); 2]> = BTreeMap::new();
    for (i, (t, &s)) in tables.iter().zip(own).enumerate() {
        let b = best.entry(t.schema.as_str()).or_insert([(0.0, None); 2]);
        if s > b[0].0 {
            *b = [(s, Some(i)), b[0]];
        } else if s > b[1].0 {
            b[1] = (s, Some(i));
        }
    }
    if best.len() < 2 {
        return Vec::new();
    }
    let strength = |b: &[(f32, Option<usize>); 2]| b[0].0 + b[1].0;
    // The strongest of `schemas`; ties go to the first (by name).
    let strongest = |schemas: &mut dyn Iterator<Item = (&'a str, f32)>| {
        schemas.fold(None, |acc: Option<(&'a str, f32)>, (s, v)| match acc {
            Some((_, w)) if w >= v => acc,
            _ => Some((s, v)),
        })
    };
    let Some((first, top)) = strongest(&mut best.iter().map(|(s, b)| (*s, strength(b)))) else {
        return Vec::new();
    };
    if top <= 0.0 {
        return Vec::new();
    }
    let matched = |b: &[(f32, Option<usize>); 2]| -> HashSet<&str> {
        b.iter().filter_map(|&(_, i)| i).flat_map(|i| words[i].iter().map(String::as_str)).collect()
    };
    let told = matched(&best[first]);
    let second = strongest(
        &mut best
            .iter()
            .filter(|(s, b)| **s != first && strength(b) > 0.0 && told.is_subset(&matched(b)))
            .map(|(s, b)| (*s, strength(b))),
    );
    std::iter::once(first).chain(second.map(|(s, _)| s)).collect()
}

/// Each schema's closeness in meaning to the question: the sum of the cosines of its two tables closest to it (a
/// question names one table or joins a few); only schemas with a scored table.
fn schema_closeness<'a>(tables: &'a [Table], near: &[Option<f32>]) -> BTreeMap<&'a str, f32> {
    let mut best: BTreeMap<&str, [f32; 2]> = BTreeMap::new();
    for (t, c) in tables.iter().zip(near) {
        let Some(c) = *c else { continue };
        let b = best.entry(t.schema.as_str()).or_insert([f32::MIN; 2]);
        if c > b[0] {
            *b = [c, b[0]];
        } else if c > b[1] {
            b[1] = c;
        }
    }
    best.into_iter().map(|(s, b)| (s, b[0] + b[1].max(0.0))).collect()
}

/// How close in meaning each table is to the question (cosine by the engine's sentence encoder), by schema and
/// name; empty without an encoder.
pub type Closeness = std::collections::HashMap<(String, String), f32>;

/// Tables a schema added for its meaning brings, closest first.
const MEANING_TABLES: usize = 3;

/// `catalog` cut to what `question` needs within `budget`, measured by `cost` (e.g. the rendered context's
/// estimated tokens). `hints` are more texts about the question (verified examples' questions and SQL) scored with
/// it. The catalog is returned unchanged when it fits.
pub fn select(
    catalog: &Catalog,
    question: &str,
    hints: &[&str],
    budget: usize,
    cost: &dyn Fn(&Catalog) -> usize,
) -> (Catalog, Report) {
    select_with(catalog, question, hints, budget, cost, true, &Closeness::new())
}

/// [`select`], with `focus` saying whether a catalog of several schemas is narrowed to the question's schema
/// first (see [`focus_schemas`]), and the tables' `closeness` in meaning to the question: with it the focus also
/// keeps the schema closest in meaning (its two closest tables together, see [`schema_closeness`]) when the words
/// missed it, with its tables closest in meaning, and shows the schemas the closer in meaning first.
pub fn select_with(
    catalog: &Catalog,
    question: &str,
    hints: &[&str],
    budget: usize,
    cost: &dyn Fn(&Catalog) -> usize,
    focus: bool,
    closeness: &Closeness,
) -> (Catalog, Report) {
    let mut sorted = catalog.clone();
    sorted.normalize();
    let total = cost(&sorted);
    let mut report = Report {
        tables_total: sorted.tables.len(),
        tables_kept: sorted.tables.len(),
        cost_total: total,
        cost_kept: total,
        ..Report::default()
    };
    if total <= budget {
        return (catalog.clone(), report);
    }
    report.selected = true;
    let tables = &sorted.tables;
    // Numbers that are words of a table's name (`ledger_7`, `sales_2023`): a question saying them names the table.
    let numbered: HashSet<String> = tables
        .iter()
        .flat_map(|t| examples::terms(&split_ident(&t.name)))
        .filter(|w| !w.chars().any(char::is_alphabetic))
        .collect();
    let query = std::iter::once(question).chain(hints.iter().copied()).collect::<Vec<_>>().join(" ");
    let query = table_words(&query, &numbered);
    let graph = fk_graph(tables);
    let vocab = Vocabulary::new(tables, &query);
    // Each table's document as words, cut once: scored here, and read again to tell schemas apart.
    let docs: Vec<Vec<String>> = tables.iter().map(|t| examples::terms(&document(t, &vocab))).collect();
    let (own, scores) = scores(tables, &docs, &graph, &vocab, &query);
    let mut order: Vec<usize> = (0..tables.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let wanted: HashSet<String> = examples::terms(&query).into_iter().collect();
    // Per table, the columns the query names: by the column's name, or by one of its values (`… from France` needs
    // `country`). Computed once; `fit` consults it for every candidate.
    let named: Vec<HashSet<&str>> = tables
        .iter()
        .map(|t| {
            t.columns
                .iter()
                .filter(|c| {
                    std::iter::once(vocab.words(&c.name))
                        .chain(c.values.iter().cloned())
                        .any(|text| examples::terms(&text).iter().any(|w| wanted.contains(w)))
                })
                .map(|c| c.name.as_str())
                .collect()
        })
        .collect();

    // Tables the query speaks of (or neighbours them), best first; if it speaks of none, the best-connected
    // tables (most foreign keys) fill the budget instead.
    let mut candidates: Vec<usize> = order.iter().copied().filter(|&t| scores[t] > 0.0).collect();
    if focus {
        // The question's words each table contains (its document's terms), for telling schemas apart.
        let words: Vec<HashSet<String>> =
            docs.iter().map(|d| d.iter().filter(|w| wanted.contains(*w)).cloned().collect()).collect();
        let mut schemas = focus_schemas(tables, &own, &words);
        let near: Vec<Option<f32>> =
            tables.iter().map(|t| closeness.get(&(t.schema.clone(), t.name.clone())).copied()).collect();
        let meaning = schema_closeness(tables, &near);
        let strength = |s: &str| meaning.get(s).copied().unwrap_or(f32::MIN);
        // The closest schema; ties go to the name.
        let closest = meaning.iter().fold(None, |acc: Option<(&str, f32)>, (&s, &v)| match acc {
            Some((_, w)) if w >= v => acc,
            _ => Some((s, v)),
        });
        if let Some((closest, _)) = closest {
            // The words' schemas, the closer in meaning first; and the schema closest in meaning, if the words
            // missed it ("nations" for a `country` table).
            schemas.sort_by(|a, b| strength(b).total_cmp(&strength(a)).then(a.cmp(b)));
            let several = tables.iter().any(|t| t.schema != tables[0].schema);
            if several && !schemas.contains(&closest) {
                schemas.push(closest);
            }
        }
        if !schemas.is_empty() {
            // Best first within each schema, the schemas in their order; a schema added by meaning brings its
            // tables closest in meaning.
            let mut focused: Vec<usize> = Vec::new();
            for s in &schemas {
                focused.extend(candidates.iter().copied().filter(|&t| tables[t].schema == *s));
                if closest.is_some_and(|(c, _)| c == *s) {
                    let mut close: Vec<usize> = (0..tables.len())
                        .filter(|&t| tables[t].schema == *s && near[t].is_some() && !focused.contains(&t))
                        .collect();
                    close.sort_by(|&a, &b| near[b].unwrap_or(0.0).total_cmp(&near[a].unwrap_or(0.0)).then(a.cmp(&b)));
                    focused.extend(close.into_iter().take(MEANING_TABLES));
                }
            }
            candidates = focused;
            report.schemas = schemas.into_iter().map(str::to_string).collect();
        }
    }
    if candidates.is_empty() {
        candidates = (0..tables.len()).collect();
        candidates.sort_by(|&a, &b| graph[b].len().cmp(&graph[a].len()).then(a.cmp(&b)));
    }
    let mut chosen: Vec<usize> = Vec::new();
    let mut best = Catalog::default();
    for t in candidates {
        if chosen.contains(&t) {
            continue;
        }
        // The table, the path joining it to what is chosen, and the tables it references that the query names
        // too — and, through a link table (one made of foreign keys), the tables that one joins: all or none.
        let mut with: Vec<usize> = chosen.clone();
        let mut work: Vec<usize> = path_to(&graph, t, &chosen);
        while let Some(u) = work.pop() {
            if with.contains(&u) {
                continue;
            }
            with.push(u);
            if u == t || is_link(&tables[u]) {
                work.extend(graph[u].iter().copied().filter(|&n| own[n] > 0.0 && !with.contains(&n)));
            }
        }
        let new: Vec<usize> = with.iter().copied().filter(|u| !chosen.contains(u)).collect();
        if let Some(fit) = fit(&best, tables, &new, t, &named, budget, cost) {
            chosen = with;
            best = fit;
        }
    }
    report.tables_kept = best.tables.len();
    let kept_columns: usize = best.tables.iter().map(|t| t.columns.len()).sum();
    let full_columns: usize = chosen.iter().map(|&i| tables[i].columns.len()).sum();
    report.columns_dropped = full_columns - kept_columns;
    report.cost_kept = cost(&best);
    (best, report)
}

/// Each table's own score and its score for ranking (plus a share of its best foreign-key neighbour's). The own
/// score has two fields, as BM25F does: the table's whole document (name, columns, comments, values) and its name
/// alone, each with its own word rarities — `country` is a common column among hundreds of wide tables but a rare
/// table name, and a question saying "country" most likely means the table of that name.
fn scores(
    tables: &[Table],
    docs: &[Vec<String>],
    graph: &[Vec<usize>],
    vocab: &Vocabulary,
    query: &str,
) -> (Vec<f32>, Vec<f32>) {
    let names: Vec<Vec<String>> = tables.iter().map(|t| examples::terms(&vocab.words(&t.name))).collect();
    let mut own = vec![0f32; tables.len()];
    for (field, weight) in [(docs, 1.0), (&names[..], NAME_WEIGHT)] {
        for (i, s) in examples::rank_terms(query, field, tables.len()) {
            own[i] += weight * s;
        }
    }
    let ranked = (0..tables.len())
        .map(|i| own[i] + NEIGHBOUR_SHARE * graph[i].iter().map(|&j| own[j]).fold(0.0, f32::max))
        .collect();
    (own, ranked)
}

/// A table's words: its name three times (a name says more than a column), columns, comments, value hints.
fn document(t: &Table, vocab: &Vocabulary) -> String {
    let name = vocab.words(&t.name);
    let mut d = format!("{name} {name} {name} {}", t.comment.as_deref().unwrap_or(""));
    for c in &t.columns {
        d.push(' ');
        d.push_str(&vocab.words(&c.name));
        for s in c.comment.iter().chain(&c.values) {
            d.push(' ');
            d.push_str(s);
        }
    }
    d
}

/// The words identifiers are made of, to read a run-together name (`countrylanguage`, `headofstate`,
/// `surfacearea`) as the words it joins: the parts of every identifier in the catalog that are written apart
/// somewhere (`country`, `language`) and the question's own words (`head`, `of`, `state`).
struct Vocabulary {
    words: HashSet<String>,
}

impl Vocabulary {
    /// Shortest word a run-together name is cut into, unless the question says it (`of`, `by`).
    const MIN_PART: usize = 3;
    /// Shortest run-together name worth cutting.
    const MIN_COMPOUND: usize = 6;
    /// Shortest piece when a name is cut into a known word and an unknown rest (see [`Self::known_end`]).
    const MIN_END: usize = 4;

    fn new(tables: &[Table], query: &str) -> Self {
        let mut words = HashSet::new();
        let mut add = |ident: &str| {
            for w in split_ident(ident).split(' ') {
                let w = w.to_lowercase();
                if w.chars().count() >= Self::MIN_PART && w.chars().all(char::is_alphabetic) {
                    words.insert(w);
                }
            }
        };
        for t in tables {
            add(&t.name);
            t.columns.iter().for_each(|c| add(&c.name));
        }
        // The question's words as written and as `examples::terms` reduces them (`schoolers` → `schooler`, so
        // `highschooler` reads as `high schooler`).
        for w in query.split(|c: char| !c.is_alphanumeric()).filter(|w| w.chars().count() >= 2) {
            words.insert(w.to_lowercase());
        }
        words.extend(examples::terms(query).into_iter().filter(|w| w.chars().count() >= 2));
        Vocabulary { words }
    }

    /// `ident` split at `_` and case changes, each run-together part followed by the words it is made of.
    fn words(&self, ident: &str) -> String {
        let split = split_ident(ident);
        let mut out = split.clone();
        for part in split.split(' ') {
            let part = part.to_lowercase();
            if let Some(pieces) = self.segment(&part).or_else(|| self.known_end(&part)) {
                for p in pieces {
                    out.push(' ');
                    out.push_str(p);
                }
            }
        }
        out
    }

    /// `part` cut into a known word at one end and the unknown rest, when it has no cut into known words alone
    /// (`surfacearea` with only `surface` known → `surface area`; `categoryname` → `category name`): the longest
    /// known end wins, the start first on a tie. Both pieces have at least [`Self::MIN_END`] letters, so short
    /// words do not cut long names apart (`category` is not `cat egory`).
    fn known_end<'a>(&self, part: &'a str) -> Option<Vec<&'a str>> {
        if part.len() < 2 * Self::MIN_END || !part.bytes().all(|b| b.is_ascii_alphabetic()) {
            return None;
        }
        let n = part.len();
        (Self::MIN_END..=n - Self::MIN_END).rev().find_map(|k| {
            if self.words.contains(&part[..k]) {
                Some(vec![&part[..k], &part[k..]])
            } else if self.words.contains(&part[n - k..]) {
                Some(vec![&part[..n - k], &part[n - k..]])
            } else {
                None
            }
        })
    }

    /// `part` as two or more known words (the fewest; ties: the longest first word), or `None`.
    fn segment<'a>(&self, part: &'a str) -> Option<Vec<&'a str>> {
        if part.len() < Self::MIN_COMPOUND || !part.is_ascii() || !part.bytes().all(|b| b.is_ascii_alphabetic()) {
            return None;
        }
        let n = part.len();
        // best[i]: the fewest words covering part[i..], and the end of the first of them.
        let mut best: Vec<Option<(usize, usize)>> = vec![None; n + 1];
        best[n] = Some((0, n));
        for i in (0..n).rev() {
            for j in (i + 2..=n).rev() {
                if (i, j) == (0, n) || !self.words.contains(&part[i..j]) {
                    continue;
                }
                if let Some((k, _)) = best[j] {
                    if best[i].is_none_or(|(b, _)| k + 1 < b) {
                        best[i] = Some((k + 1, j));
                    }
                }
            }
        }
        let mut pieces = Vec::new();
        let mut i = 0;
        while i < n {
            let (_, j) = best[i]?;
            pieces.push(&part[i..j]);
            i = j;
        }
        Some(pieces)
    }
}

/// The words of `text` that can name a table or column: numbers (`4`, `3.7`, `10,000`) are left out — as words
/// they match codes and ratings in any table's values (`4:3`) — unless they are words of a table's name
/// (`numbered`: `ledger 7` names `ledger_7`); and so is `number` where it means counting (`the number of`,
/// `total number of`), not a column holding numbers.
fn table_words(text: &str, numbered: &HashSet<String>) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    let counting = |i: usize| {
        words[i].eq_ignore_ascii_case("number")
            && words.get(i + 1).is_some_and(|w| w.eq_ignore_ascii_case("of"))
            && i > 0
            && ["the", "a", "total", "what", "how"].iter().any(|p| words[i - 1].eq_ignore_ascii_case(p))
    };
    (0..words.len())
        .filter(|&i| {
            let w = words[i];
            let name_number = || {
                let t = examples::terms(w);
                !t.is_empty() && t.iter().all(|n| numbered.contains(n))
            };
            (w.chars().any(char::is_alphabetic) || name_number()) && !counting(i)
        })
        .map(|i| words[i])
        .collect::<Vec<_>>()
        .join(" ")
}

/// `SongReleaseYear`, `song_release_year` → `Song Release Year`, `song release year`.
fn split_ident(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    let mut prev_lower = false;
    for ch in s.chars() {
        if ch == '_' {
            out.push(' ');
            prev_lower = false;
            continue;
        }
        if ch.is_uppercase() && prev_lower {
            out.push(' ');
        }
        prev_lower = ch.is_lowercase() || ch.is_ascii_digit();
        out.push(ch);
    }
    out
}

/// A table that joins others: two foreign keys or more, covering at least half its columns.
fn is_link(t: &Table) -> bool {
    let fk_cols: HashSet<&str> = t.foreign_keys.iter().flat_map(|f| f.columns.iter()).map(String::as_str).collect();
    t.foreign_keys.len() >= 2 && fk_cols.len() * 2 >= t.columns.len()
}

/// Undirected foreign-key adjacency between the catalog's tables (references to tables outside it ignored).
fn fk_graph(tables: &[Table]) -> Vec<Vec<usize>> {
    let mut g = vec![Vec::new(); tables.len()];
    for (i, t) in tables.iter().enumerate() {
        for fk in &t.foreign_keys {
            if let Some(j) = tables.iter().position(|u| u.schema == fk.ref_schema && u.name == fk.ref_table) {
                if i != j {
                    g[i].push(j);
                    g[j].push(i);
                }
            }
        }
    }
    for n in &mut g {
        n.sort_unstable();
        n.dedup();
    }
    g
}

/// `t` and the tables on the shortest foreign-key path (at most [`MAX_PATH`] hops) from it to one of `chosen`;
/// just `t` when none is that close (or nothing is chosen yet).
fn path_to(graph: &[Vec<usize>], t: usize, chosen: &[usize]) -> Vec<usize> {
    if chosen.is_empty() {
        return vec![t];
    }
    let mut prev = vec![usize::MAX; graph.len()];
    let mut depth = vec![usize::MAX; graph.len()];
    depth[t] = 0;
    let mut queue = VecDeque::from([t]);
    while let Some(u) = queue.pop_front() {
        if chosen.contains(&u) {
            let mut path = Vec::new();
            let mut v = prev[u];
            while v != usize::MAX {
                path.push(v);
                v = prev[v];
            }
            path.reverse();
            return path;
        }
        if depth[u] == MAX_PATH {
            continue;
        }
        for &w in &graph[u] {
            if depth[w] == usize::MAX {
                depth[w] = depth[u] + 1;
                prev[w] = u;
                queue.push_back(w);
            }
        }
    }
    vec![t]
}

/// The `chosen` catalog with the `new` tables added (the `ranked` one and those it brings: its join path, the tables
/// it references that the query names): whole if that fits the budget, else with the new tables' columns that are
/// neither keys nor `named` by the query (per table, by name or by a value hint) dropped — the tables it brings
/// before the `ranked` one, widest first — until it fits; `None` if even that does not fit. The tables chosen
/// before keep their columns: a lower-ranked table never costs a better one a column the question may need.
fn fit(
    chosen: &Catalog,
    tables: &[Table],
    new: &[usize],
    ranked: usize,
    named: &[HashSet<&str>],
    budget: usize,
    cost: &dyn Fn(&Catalog) -> usize,
) -> Option<Catalog> {
    let mut cat = chosen.clone();
    let first = cat.tables.len();
    cat.tables.extend(new.iter().map(|&i| tables[i].clone()));
    if cost(&cat) <= budget {
        return Some(cat);
    }
    // Droppable columns of the new tables only (what was chosen before ranks higher and stays as it is): of the
    // tables that come with the `ranked` one before its own, widest table first, a table's last columns first.
    let mut droppable: Vec<(usize, String)> = Vec::new();
    let mut by_width: Vec<usize> = (first..cat.tables.len()).collect();
    by_width.sort_by(|&a, &b| {
        (new[a - first] == ranked)
            .cmp(&(new[b - first] == ranked))
            .then(cat.tables[b].columns.len().cmp(&cat.tables[a].columns.len()))
            .then(a.cmp(&b))
    });
    for ti in by_width {
        let t = &cat.tables[ti];
        let keys: HashSet<&str> = t
            .primary_key
            .iter()
            .chain(t.foreign_keys.iter().flat_map(|f| f.columns.iter()))
            .map(String::as_str)
            .collect();
        for c in t.columns.iter().rev() {
            if !keys.contains(c.name.as_str()) && !named[new[ti - first]].contains(c.name.as_str()) {
                droppable.push((ti, c.name.clone()));
            }
        }
    }
    // Drop in halves of what is left, then one by one, so a wide catalog costs few renders.
    let mut dropped = 0;
    while dropped < droppable.len() {
        let step = ((droppable.len() - dropped) / 2).max(1);
        let mut trial = cat.clone();
        for (ti, name) in &droppable[dropped..dropped + step] {
            trial.tables[*ti].columns.retain(|c| &c.name != name);
        }
        dropped += step;
        cat = trial;
        if cost(&cat) <= budget {
            return Some(cat);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::schema::{Column, ForeignKey, RenderOptions};

    fn table(name: &str, cols: &[&str], pk: &[&str], fks: &[(&str, &str, &str)]) -> Table {
        Table {
            schema: "public".into(),
            name: name.into(),
            kind: Default::default(),
            columns: cols
                .iter()
                .map(|c| Column { name: (*c).into(), data_type: "text".into(), ..Default::default() })
                .collect(),
            primary_key: pk.iter().map(|s| (*s).into()).collect(),
            foreign_keys: fks
                .iter()
                .map(|(c, t, rc)| ForeignKey {
                    columns: vec![(*c).into()],
                    ref_schema: "public".into(),
                    ref_table: (*t).into(),
                    ref_columns: vec![(*rc).into()],
                })
                .collect(),
            comment: None,
        }
    }

    /// singer ← singer_in_concert → concert → stadium, plus unrelated wide tables.
    fn catalog() -> Catalog {
        let mut tables = vec![
            table("singer", &["singer_id", "name", "country", "age"], &["singer_id"], &[]),
            table(
                "concert",
                &["concert_id", "concert_name", "stadium_id", "year"],
                &["concert_id"],
                &[("stadium_id", "stadium", "stadium_id")],
            ),
            table(
                "singer_in_concert",
                &["concert_id", "singer_id"],
                &["concert_id", "singer_id"],
                &[("concert_id", "concert", "concert_id"), ("singer_id", "singer", "singer_id")],
            ),
            table("stadium", &["stadium_id", "location", "capacity"], &["stadium_id"], &[]),
        ];
        for i in 0..30 {
            let cols: Vec<String> = (0..20).map(|c| format!("metric_{i}_{c}")).collect();
            let cols: Vec<&str> = cols.iter().map(String::as_str).collect();
            tables.push(table(&format!("warehouse_fact_{i:02}"), &cols, &[], &[]));
        }
        // Value hints, as copilot.value_hints shows them.
        tables[0].columns[2].values = vec!["France".into(), "Netherlands".into()];
        Catalog { tables }
    }

    fn chars(c: &Catalog) -> usize {
        c.render(&RenderOptions::default()).len()
    }

    fn names(c: &Catalog) -> Vec<&str> {
        let mut n: Vec<&str> = c.tables.iter().map(|t| t.name.as_str()).collect();
        n.sort_unstable();
        n
    }

    /// `t` moved to `schema`, its foreign keys pointing into `fk_schema`.
    fn in_schema(mut t: Table, schema: &str, fk_schema: &str) -> Table {
        t.schema = schema.into();
        t.foreign_keys.iter_mut().for_each(|f| f.ref_schema = fk_schema.into());
        t
    }

    /// Two unrelated schemas that share words (world: country, countrylanguage; cars: countries, car_makers), a
    /// sales schema whose orders reference a people schema's customers, and wide distractors.
    fn schemas() -> Catalog {
        let mut tables = vec![
            in_schema(table("country", &["code", "name", "continent", "population"], &["code"], &[]), "world", "world"),
            in_schema(
                table(
                    "countrylanguage",
                    &["countrycode", "language", "percentage"],
                    &["countrycode", "language"],
                    &[("countrycode", "country", "code")],
                ),
                "world",
                "world",
            ),
            in_schema(
                table("countries", &["countryid", "countryname", "continent"], &["countryid"], &[]),
                "cars",
                "cars",
            ),
            in_schema(
                table("car_makers", &["id", "maker", "country"], &["id"], &[("country", "countries", "countryid")]),
                "cars",
                "cars",
            ),
            in_schema(table("customers", &["customer_id", "name", "city"], &["customer_id"], &[]), "people", "people"),
            in_schema(
                table(
                    "orders",
                    &["order_id", "customer_id", "amount"],
                    &["order_id"],
                    &[("customer_id", "customers", "customer_id")],
                ),
                "sales",
                "people",
            ),
        ];
        for i in 0..20 {
            let cols: Vec<String> = (0..20).map(|c| format!("metric_{i}_{c}")).collect();
            let cols: Vec<&str> = cols.iter().map(String::as_str).collect();
            tables.push(in_schema(table(&format!("fact_{i:02}"), &cols, &[], &[]), "warehouse", "warehouse"));
        }
        Catalog { tables }
    }

    fn qualified(c: &Catalog) -> Vec<String> {
        let mut n: Vec<String> = c.tables.iter().map(|t| format!("{}.{}", t.schema, t.name)).collect();
        n.sort_unstable();
        n
    }

    #[test]
    fn several_schemas_narrow_to_the_question_s_schema() {
        let c = schemas();
        let q = "Which countries have the largest population, and what language do they speak?";
        let (kept, r) = select(&c, q, &[], 900, &chars);
        assert_eq!(qualified(&kept), ["world.country", "world.countrylanguage"], "{r:?}");
        assert_eq!(r.schemas, ["world"]);
        // Without focus the other schema's look-alike table comes too, within the same budget.
        let (loose, r) = select_with(&c, q, &[], 900, &chars, false, &Closeness::new());
        assert!(qualified(&loose).contains(&"cars.countries".to_string()), "{:?}", qualified(&loose));
        assert!(r.schemas.is_empty());
    }

    #[test]
    fn a_plural_question_word_finds_the_singular_table_when_a_schema_is_chosen() {
        // `transcripts` has two tables saying `course(s)`; `teaching` has the teachers and the courses they are
        // arranged to teach, in tables named in the singular (`courses` must meet `course`, `teachers` `teacher`).
        let mut c = schemas();
        c.tables.push(in_schema(
            table("courses", &["course_id", "course_name", "course_description"], &["course_id"], &[]),
            "transcripts",
            "transcripts",
        ));
        c.tables.push(in_schema(
            table(
                "course_sections",
                &["section_id", "course_id", "section_name"],
                &["section_id"],
                &[("course_id", "courses", "course_id")],
            ),
            "transcripts",
            "transcripts",
        ));
        c.tables.push(in_schema(
            table("teacher", &["teacher_id", "name", "age"], &["teacher_id"], &[]),
            "teaching",
            "teaching",
        ));
        c.tables.push(in_schema(
            table("course", &["course_id", "staring_date", "course"], &["course_id"], &[]),
            "teaching",
            "teaching",
        ));
        c.tables.push(in_schema(
            table(
                "course_arrange",
                &["course_id", "teacher_id", "grade"],
                &["course_id", "teacher_id"],
                &[("course_id", "course", "course_id"), ("teacher_id", "teacher", "teacher_id")],
            ),
            "teaching",
            "teaching",
        ));
        let (kept, r) = select(&c, "Show names of teachers and the number of courses they teach.", &[], 900, &chars);
        assert_eq!(r.schemas, ["teaching"], "{r:?}");
        assert!(qualified(&kept).contains(&"teaching.teacher".to_string()), "{:?}", qualified(&kept));
    }

    #[test]
    fn a_plural_question_word_reads_a_run_together_table_name() {
        let mut c = schemas();
        c.tables.push(in_schema(table("highschooler", &["id", "name", "grade"], &["id"], &[]), "net", "net"));
        for i in 0..3 {
            c.tables.push(in_schema(
                table(&format!("sales_{i}"), &["id", "first_name", "name", "grade", "amount"], &["id"], &[]),
                "shop",
                "shop",
            ));
        }
        let (kept, r) = select(&c, "Show the names of all high schoolers in grade 10.", &[], 900, &chars);
        assert_eq!(r.schemas.first().map(String::as_str), Some("net"), "{r:?}");
        assert!(qualified(&kept).contains(&"net.highschooler".to_string()), "{:?}", qualified(&kept));
    }

    #[test]
    fn look_alike_tables_of_two_schemas_are_both_shown_when_no_word_decides() {
        let c = schemas();
        let (kept, r) = select(&c, "What is the continent of each country?", &[], 900, &chars);
        let shown = qualified(&kept);
        assert!(
            shown.contains(&"world.country".to_string()) && shown.contains(&"cars.countries".to_string()),
            "{shown:?} {r:?}"
        );
    }

    #[test]
    fn a_schema_the_question_cannot_tell_apart_is_kept_beside_it() {
        // Two schemas with a `singer` table; a third matches less of the question.
        let mut c = schemas();
        c.tables.push(in_schema(table("singer", &["singer_id", "name", "age"], &["singer_id"], &[]), "solo", "solo"));
        c.tables.push(in_schema(
            table("song", &["song_id", "title", "singer_id"], &["song_id"], &[("singer_id", "singer", "singer_id")]),
            "solo",
            "solo",
        ));
        c.tables.push(in_schema(
            table("singer", &["singer_id", "name", "country", "age"], &["singer_id"], &[]),
            "concerts",
            "concerts",
        ));
        c.tables.push(in_schema(
            table(
                "singer_in_concert",
                &["concert_id", "singer_id"],
                &["concert_id", "singer_id"],
                &[("singer_id", "singer", "singer_id")],
            ),
            "concerts",
            "concerts",
        ));
        c.tables.push(in_schema(
            table("concert", &["concert_id", "concert_name", "year"], &["concert_id"], &[]),
            "concerts",
            "concerts",
        ));
        // Nothing in the question tells `solo.singer` from `concerts.singer`: both schemas are shown.
        let (kept, r) = select(&c, "What are the names and ages of all singers?", &[], 900, &chars);
        let mut schemas = r.schemas.clone();
        schemas.sort_unstable();
        assert_eq!(schemas, ["concerts", "solo"], "{r:?}");
        let shown = qualified(&kept);
        assert!(
            shown.contains(&"solo.singer".to_string()) && shown.contains(&"concerts.singer".to_string()),
            "{shown:?}"
        );
        assert!(!shown.iter().any(|t| t.starts_with("world.") || t.starts_with("warehouse.")), "{shown:?}");
        // A word only one of them has (`concert`) decides: that schema alone.
        let (kept, r) = select(&c, "How many singers performed in each concert?", &[], 900, &chars);
        assert_eq!(r.schemas, ["concerts"], "{r:?}");
        assert!(qualified(&kept).iter().all(|t| t.starts_with("concerts.")), "{:?}", qualified(&kept));
    }

    #[test]
    fn a_foreign_key_into_another_schema_keeps_its_join_path() {
        let c = schemas();
        let (kept, r) = select(&c, "What is the total order amount of each customer's orders?", &[], 900, &chars);
        assert!(qualified(&kept).contains(&"sales.orders".to_string()), "{:?} {r:?}", qualified(&kept));
        assert!(qualified(&kept).contains(&"people.customers".to_string()), "{:?} {r:?}", qualified(&kept));
        assert!(
            !qualified(&kept).iter().any(|t| t.starts_with("world.") || t.starts_with("cars.")),
            "{:?}",
            qualified(&kept)
        );
    }

    #[test]
    fn below_the_budget_the_catalog_is_untouched() {
        let c = catalog();
        let (kept, r) = select(&c, "How many singers are there?", &[], chars(&c), &chars);
        assert_eq!(kept, c);
        assert!(!r.selected);
        assert_eq!((r.tables_kept, r.tables_total, r.columns_dropped), (34, 34, 0));
    }

    #[test]
    fn the_question_s_tables_are_kept_with_their_join_path_within_the_budget() {
        let c = catalog();
        let (kept, r) = select(&c, "Show the names of singers who performed in concerts in 2014.", &[], 600, &chars);
        assert!(r.selected && chars(&kept) <= 600, "{r:?}");
        // singer and concert named; the junction table joins them (whole join path), found by the FK closure.
        for t in ["singer", "concert", "singer_in_concert"] {
            assert!(names(&kept).contains(&t), "{t} missing from {:?}", names(&kept));
        }
        assert!(!names(&kept).iter().any(|n| n.starts_with("warehouse")), "{:?}", names(&kept));
        assert_eq!(r.cost_kept, chars(&kept));
    }

    #[test]
    fn columns_go_before_tables_keys_and_named_columns_stay() {
        let c = catalog();
        // Room for roughly the two named tables' keys and named columns, not everything.
        let whole = Catalog { tables: c.tables[..3].to_vec() };
        let (kept, r) = select(&c, "Which concert names had singers from France?", &[], chars(&whole) - 20, &chars);
        assert!(r.columns_dropped > 0, "{r:?}");
        let singer = kept.tables.iter().find(|t| t.name == "singer").expect("singer kept");
        let cols: Vec<&str> = singer.columns.iter().map(|c| c.name.as_str()).collect();
        assert!(cols.contains(&"singer_id") && cols.contains(&"country"), "{cols:?}");
        let concert = kept.tables.iter().find(|t| t.name == "concert").expect("concert kept");
        assert!(concert.columns.iter().any(|c| c.name == "concert_name"));
        assert!(concert.columns.iter().any(|c| c.name == "stadium_id"), "a foreign-key column is a key");
    }

    #[test]
    fn selection_is_deterministic_and_ignores_catalog_order() {
        let c = catalog();
        let mut shuffled = c.clone();
        shuffled.tables.reverse();
        let q = "What is the capacity of the stadium of each concert?";
        let (a, ra) = select(&c, q, &[], 700, &chars);
        let (b, rb) = select(&shuffled, q, &[], 700, &chars);
        assert_eq!(a.render(&RenderOptions::default()), b.render(&RenderOptions::default()));
        assert_eq!(ra, rb);
        assert!(names(&a).contains(&"stadium") && names(&a).contains(&"concert"), "{:?}", names(&a));
    }

    #[test]
    fn the_budget_is_never_exceeded_and_more_room_never_loses_a_named_table() {
        let c = catalog();
        let q = "List each singer's name and the concerts they sang in.";
        let mut had_singer = false;
        for budget in (50..chars(&c)).step_by(97) {
            let (kept, r) = select(&c, q, &[], budget, &chars);
            assert!(chars(&kept) <= budget, "{budget}: {r:?}");
            let has = names(&kept).contains(&"singer");
            assert!(has || !had_singer, "{budget}: singer dropped with more room");
            had_singer |= has;
            // Whatever is kept of the junction table comes with both tables it joins.
            if names(&kept).contains(&"singer_in_concert") {
                assert!(names(&kept).contains(&"singer") && names(&kept).contains(&"concert"), "{:?}", names(&kept));
            }
        }
        assert!(had_singer);
    }

    #[test]
    fn identifiers_split_at_underscores_and_case_changes() {
        assert_eq!(split_ident("SongReleaseYear"), "Song Release Year");
        assert_eq!(split_ident("song_release_year"), "song release year");
        assert_eq!(split_ident("HTTPCode"), "HTTPCode");
        assert_eq!(split_ident("year2024Total"), "year2024 Total");
    }

    #[test]
    fn run_together_names_are_read_as_the_words_they_join() {
        let tables = vec![
            table("country", &["code", "name", "headofstate", "surfacearea"], &["code"], &[]),
            table("city", &["id", "name", "country_code"], &["id"], &[]),
            table("countrylanguage", &["countrycode", "language"], &["countrycode", "language"], &[]),
        ];
        let v = Vocabulary::new(&tables, "Who is the head of state of the largest country?");
        assert_eq!(v.segment("countrylanguage"), Some(vec!["country", "language"]));
        assert_eq!(v.segment("countrycode"), Some(vec!["country", "code"]));
        // "head", "of", "state" are the question's words; "surface"/"area" are nobody's: no cut.
        assert_eq!(v.segment("headofstate"), Some(vec!["head", "of", "state"]));
        assert_eq!(v.segment("surfacearea"), None);
        assert_eq!(v.words("surfacearea"), "surfacearea");
        // A known word is not cut into smaller ones, nor is a short or non-alphabetic part.
        assert_eq!(v.segment("country"), None);
        assert_eq!(v.segment("codes1"), None);
        assert_eq!(v.words("CountryLanguage_2"), "Country Language 2");
        assert_eq!(v.words("countrylanguage"), "countrylanguage country language");
        // A known word at one end, an unknown rest: cut there, the longest known end first.
        let v = Vocabulary::new(&tables, "Which country has the largest surface? List each category name.");
        assert_eq!(v.segment("surfacearea"), None);
        assert_eq!(v.known_end("surfacearea"), Some(vec!["surface", "area"]));
        assert_eq!(v.words("surfacearea"), "surfacearea surface area");
        assert_eq!(v.known_end("categoryname"), Some(vec!["category", "name"]));
        assert_eq!(v.known_end("productname"), Some(vec!["product", "name"]));
        // Short known words do not cut (`cat`, `is`), nor a rest under four letters.
        let v = Vocabulary::new(&tables, "Is the cat in a category?");
        assert_eq!(v.known_end("category"), None);
        assert_eq!(v.known_end("categoryid"), None);
        assert_eq!(v.words("catalogue"), "catalogue");
    }

    #[test]
    fn numbers_and_counting_words_do_not_pick_the_table() {
        let none = HashSet::new();
        assert_eq!(
            table_words("How many cars have 4 cylinders and cost 10,000 or 3.7 in 1990s?", &none),
            "How many cars have cylinders and cost or in 1990s?"
        );
        assert_eq!(table_words("What is the number of singers?", &none), "What is the of singers?");
        assert_eq!(table_words("the total Number of cars", &none), "the total of cars");
        // `number` as a thing the question asks about stays.
        let q = "List each phone number of the staff";
        assert_eq!(table_words(q, &none), q);
        assert_eq!(table_words("What number", &none), "What number");
        // A number that is a word of a table's name stays (`ledger_7`), punctuation and all.
        let numbered: HashSet<String> = ["7".to_string()].into();
        assert_eq!(table_words("Totals of ledger 7? And 8.", &numbered), "Totals of ledger 7? And");
        // A question with a number: the table with the question's words wins over one whose values hold the
        // number (`4:3`) and a column called `number`.
        let mut tables = vec![
            table("engine_data", &["id", "mpg", "cylinders", "horsepower", "year"], &["id"], &[]),
            table("tv_channel", &["id", "series_name", "number", "pixel_aspect_ratio_par"], &["id"], &[]),
        ];
        tables[1].columns[3].values = vec!["4:3".into(), "16:9".into(), "4".into()];
        // Distractors without digits in their names, so that `4` is as rare as `cylinders`.
        let letter = |i: usize| char::from(b'k' + i as u8);
        for i in 0..12 {
            let cols: Vec<String> = (0..12).map(|c| format!("metric_{}{}", letter(i), letter(c))).collect();
            let cols: Vec<&str> = cols.iter().map(String::as_str).collect();
            tables.push(table(&format!("warehouse_fact_{}", letter(i)), &cols, &[], &[]));
        }
        let c = Catalog { tables };
        // Room for either table alone, not both.
        let one = (0..2).map(|i| chars(&Catalog { tables: vec![c.tables[i].clone()] })).max().unwrap() + 10;
        assert!(one < chars(&Catalog { tables: c.tables[..2].to_vec() }));
        let q = "What is the number of models with 4 cylinders?";
        let (kept, r) = select(&c, q, &[], one, &chars);
        assert!(r.selected);
        assert_eq!(names(&kept), ["engine_data"], "{r:?}");
        // Tables told apart only by a number in their names: the question's number picks one.
        let tables: Vec<Table> = (1..=12)
            .map(|i| table(&format!("ledger_{i}"), &["id", "account", "amount", "region"], &["id"], &[]))
            .collect();
        let c = Catalog { tables };
        let one = chars(&Catalog { tables: vec![c.tables[6].clone()] }) + 10;
        let (kept, _) = select(&c, "What is the total amount in ledger 7 by region?", &[], one, &chars);
        assert_eq!(names(&kept), ["ledger_7"]);
    }

    /// One table named for what the question asks among many wide tables that all have a column of that name.
    fn crowded_catalog() -> Catalog {
        let mut tables = vec![
            table(
                "country",
                &["code", "name", "continent", "region", "surfacearea", "population", "headofstate", "capital"],
                &["code"],
                &[],
            ),
            table(
                "countrylanguage",
                &["countrycode", "language", "percentage"],
                &["countrycode", "language"],
                &[("countrycode", "country", "code")],
            ),
        ];
        for i in 0..40 {
            let mut cols: Vec<String> =
                ["id", "name", "country", "population", "state", "language"].map(String::from).into();
            cols.extend((0..(i % 3) * 10).map(|c| format!("metric_{c}")));
            let cols: Vec<&str> = cols.iter().map(String::as_str).collect();
            tables.push(table(&format!("sales_{i:02}"), &cols, &["id"], &[]));
        }
        Catalog { tables }
    }

    #[test]
    fn a_table_named_by_the_question_outranks_wide_tables_with_a_column_of_that_name() {
        let c = crowded_catalog();
        let q = "Give the name, population and head of state of the country with the largest surface area.";
        let (kept, r) = select(&c, q, &[], 400, &chars);
        assert!(r.selected && chars(&kept) <= 400, "{r:?}");
        assert!(names(&kept).contains(&"country"), "{:?}", names(&kept));
        let country = kept.tables.iter().find(|t| t.name == "country").unwrap();
        assert!(
            country.columns.iter().any(|c| c.name == "headofstate"),
            "a run-together column the question names stays"
        );
        // No run-together name in this one: only the name field tells the country table from the sales tables.
        let (kept, _) = select(&c, "What is the population of each country?", &[], 400, &chars);
        assert!(names(&kept).contains(&"country"), "{:?}", names(&kept));
        let q = "How many distinct languages are spoken in each country?";
        let (kept, _) = select(&c, q, &[], 400, &chars);
        assert!(names(&kept).contains(&"countrylanguage"), "{:?}", names(&kept));
    }

    #[test]
    fn a_table_taken_first_keeps_its_columns_when_lower_ranked_ones_come_after_it() {
        let c = crowded_catalog();
        let q = "Which country has the largest population?";
        // The country table comes first, with countrylanguage (it references country and the question names it
        // too). Room for both whole and then some: the sales tables the question's words also match come after
        // them, and only as far as they fit by themselves.
        let first = Catalog { tables: c.tables[..2].to_vec() };
        let budget = chars(&first) + 150;
        let (kept, r) = select(&c, q, &[], budget, &chars);
        assert!(r.selected && chars(&kept) <= budget, "{r:?}");
        assert!(kept.tables.len() > 2, "lower-ranked tables fill the rest: {:?}", names(&kept));
        for t in &first.tables {
            let shown = kept.tables.iter().find(|k| k.name == t.name).expect("kept");
            assert_eq!(shown, t, "{} is shown whole ({:?})", t.name, names(&kept));
        }
    }

    fn near(pairs: &[(&str, &str, f32)]) -> Closeness {
        pairs.iter().map(|(s, t, c)| ((s.to_string(), t.to_string()), *c)).collect()
    }

    #[test]
    fn the_schema_closest_in_meaning_is_shown_when_the_words_miss_it() {
        let c = schemas();
        let q = "Which nations are in Europe?";
        let meaning = near(&[
            ("world", "country", 0.62),
            ("world", "countrylanguage", 0.41),
            ("cars", "countries", 0.55),
            ("cars", "car_makers", 0.2),
            ("people", "customers", 0.1),
        ]);
        let (kept, r) = select_with(&c, q, &[], 600, &chars, true, &meaning);
        assert!(r.selected && chars(&kept) <= 600, "{r:?}");
        assert_eq!(r.schemas.first().map(String::as_str), Some("world"), "{r:?}");
        assert!(kept.tables.iter().any(|t| t.schema == "world" && t.name == "country"), "{:?}", names(&kept));
        // Without the encoder the words alone decide, as before.
        let (_, words) = select(&c, q, &[], 600, &chars);
        assert_ne!(
            words.schemas.first().map(String::as_str),
            Some("world"),
            "the test needs a question the words miss"
        );
    }

    #[test]
    fn of_the_schemas_the_words_keep_the_closer_in_meaning_comes_first() {
        let c = schemas();
        let q = "How many countries are there?";
        let (_, words) = select(&c, q, &[], 600, &chars);
        assert!(words.schemas.len() >= 2, "look-alike schemas both kept by the words: {words:?}");
        for first in ["world", "cars"] {
            let (table, other) = if first == "world" { ("country", "countries") } else { ("countries", "country") };
            let meaning = near(&[(first, table, 0.7), (if first == "world" { "cars" } else { "world" }, other, 0.3)]);
            let (_, r) = select_with(&c, q, &[], 600, &chars, true, &meaning);
            assert_eq!(r.schemas.first().map(String::as_str), Some(first), "{r:?}");
            assert!(r.schemas.len() >= 2, "the other look-alike stays beside it: {r:?}");
        }
    }

    #[test]
    fn meaning_does_not_narrow_a_catalog_of_one_schema() {
        let c = catalog();
        let meaning = near(&[("public", "stadium", 0.9), ("public", "singer", 0.2)]);
        let q = "How many singers are there?";
        let (a, ra) = select_with(&c, q, &[], 600, &chars, true, &meaning);
        let (b, rb) = select(&c, q, &[], 600, &chars);
        assert!(ra.schemas.is_empty(), "{ra:?}");
        assert_eq!((names(&a), ra), (names(&b), rb));
    }

    #[test]
    fn a_budget_nothing_fits_in_gives_an_empty_catalog_and_says_so() {
        let c = catalog();
        let (kept, r) = select(&c, "How many singers?", &[], 10, &chars);
        assert!(kept.tables.is_empty());
        assert!(r.selected && r.tables_kept == 0);
    }

    #[test]
    fn hints_count_like_the_question() {
        let c = catalog();
        let (kept, _) = select(&c, "How many are there?", &["SELECT count(*) FROM stadium"], 300, &chars);
        assert!(names(&kept).contains(&"stadium"), "{:?}", names(&kept));
    }
}
