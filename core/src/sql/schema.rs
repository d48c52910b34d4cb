//! The schema model the prompt is built from, and its rendering as compact one-line `CREATE TABLE` statements.
//!
//! The extension fills a [`Catalog`] from `pg_catalog` (only what the calling role may SELECT); the trainer fills
//! one from Spider's `tables.json` / SQLite files. Both render through [`Catalog::render`], so the model sees the
//! same context shape in training, evaluation and production.
//!
//! Rendering is deterministic: tables are ordered by (schema, name), columns by their position, keys by name. The
//! same catalog always gives the same bytes, which the schema-prefix KV cache relies on.

pub use crate::sql::qualify::Qualifier;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

/// One column of a table or view.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    /// The type as the database spells it (`integer`, `character varying(40)`, `text`, …).
    pub data_type: String,
    #[serde(default)]
    pub not_null: bool,
    #[serde(default)]
    pub comment: Option<String>,
    /// Values the column holds, to show the model how they are written (`'France'`, not `'france'`): the most
    /// common ones from the statistics, or every allowed one (enum labels, a CHECK list).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// True when `values` lists every value the column may hold (enum, CHECK), false for examples.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub values_complete: bool,
}

/// A foreign key: `columns` of this table reference `ref_columns` of `ref_table` (in `ref_schema`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForeignKey {
    pub columns: Vec<String>,
    pub ref_schema: String,
    pub ref_table: String,
    pub ref_columns: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RelationKind {
    #[default]
    Table,
    View,
}

/// A table or view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    pub schema: String,
    pub name: String,
    #[serde(default)]
    pub kind: RelationKind,
    pub columns: Vec<Column>,
    #[serde(default)]
    pub primary_key: Vec<String>,
    #[serde(default)]
    pub foreign_keys: Vec<ForeignKey>,
    #[serde(default)]
    pub comment: Option<String>,
}

/// Everything the model is told about the database.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    pub tables: Vec<Table>,
}

/// How the context is rendered.
#[derive(Debug, Clone)]
pub struct RenderOptions {
    /// Schemas whose tables are written unqualified (`singer`, not `public.singer`). Usually the first schema of the
    /// caller's search_path. Tables in other schemas are always qualified, so the SQL the model copies resolves.
    pub unqualified_schemas: Vec<String>,
    /// Write `-- comment` lines for table and column comments.
    pub comments: bool,
    /// Also write bare every table whose name no other rendered table has, whatever its schema; the SQL the model
    /// writes must then go through [`Catalog::qualifier`]'s [`Qualifier::qualify`] before it runs. Used for the
    /// tables selected from a large schema, where most come from schemas outside the search_path.
    pub bare_unique: bool,
    /// With `bare_unique`: write bare only this schema's tables, as if it led the search_path, and every other
    /// table qualified — the schema the question was found to be about, so that the model's bare `singer` means
    /// that schema's, and a look-alike schema shown beside it is only reached by writing its name. A name that a
    /// table of `unqualified_schemas` has stays that table's (the caller's search_path decides).
    pub bare_schema: Option<String>,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            unqualified_schemas: vec!["public".into()],
            comments: true,
            bare_unique: false,
            bare_schema: None,
        }
    }
}

/// Quote an identifier the way PostgreSQL's `quote_ident` would: only when it is not a plain lower-case name, or
/// when it is a reserved keyword the model would otherwise write bare.
pub fn quote_ident(ident: &str) -> String {
    let plain = !ident.is_empty()
        && ident.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && ident.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$')
        && !is_reserved(ident);
    if plain {
        ident.to_string()
    } else {
        format!("\"{}\"", ident.replace('"', "\"\""))
    }
}

/// PostgreSQL's reserved key words, and the type/function-name ones, that `quote_ident` quotes: a column named
/// `order` must be written `"order"`. Kept sorted for binary search (a test checks).
const RESERVED: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "binary",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "group",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "intersect",
    "into",
    "is",
    "isnull",
    "join",
    "lateral",
    "leading",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "natural",
    "not",
    "notnull",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "outer",
    "overlaps",
    "placing",
    "primary",
    "references",
    "returning",
    "right",
    "select",
    "session_user",
    "similar",
    "some",
    "symmetric",
    "system_user",
    "table",
    "tablesample",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
];

fn is_reserved(word: &str) -> bool {
    RESERVED.binary_search(&word).is_ok()
}

impl Table {
    /// The name the model should write: qualified unless the schema is in `unqualified`.
    pub fn display_name(&self, unqualified: &[String]) -> String {
        qualified_name(&self.schema, &self.name, unqualified)
    }
}

fn qualified_name(schema: &str, name: &str, unqualified: &[String]) -> String {
    if schema.is_empty() || unqualified.iter().any(|s| s == schema) {
        quote_ident(name)
    } else {
        format!("{}.{}", quote_ident(schema), quote_ident(name))
    }
}

impl Catalog {
    /// Sort tables, and each table's keys, into the canonical order rendering uses.
    pub fn normalize(&mut self) {
        self.tables.sort_by(|a, b| (&a.schema, &a.name).cmp(&(&b.schema, &b.name)));
        for t in &mut self.tables {
            t.foreign_keys.sort_by(|a, b| {
                (&a.columns, &a.ref_schema, &a.ref_table).cmp(&(&b.columns, &b.ref_schema, &b.ref_table))
            });
            t.foreign_keys.dedup();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// The tables of this catalog that `opts` writes bare although their schema is not in `unqualified_schemas`.
    pub fn qualifier(&self, opts: &RenderOptions) -> Qualifier {
        let bare = self.bare_tables(opts);
        Qualifier::new(
            self.tables
                .iter()
                .filter(|t| bare.contains(&(t.schema.as_str(), t.name.as_str())))
                .map(|t| (t.schema.as_str(), t.name.as_str())),
        )
    }

    /// `(schema, name)` of the tables `bare_unique` writes bare: every table of `bare_schema` when it is set, else
    /// each name only one table of the catalog has — but never a name a table of `unqualified_schemas` has (written
    /// bare anyway, as the caller's search_path resolves it).
    fn bare_tables(&self, opts: &RenderOptions) -> HashSet<(&str, &str)> {
        if !opts.bare_unique {
            return HashSet::new();
        }
        let mut by_name: HashMap<&str, Vec<&str>> = HashMap::new();
        for t in &self.tables {
            by_name.entry(t.name.as_str()).or_default().push(t.schema.as_str());
        }
        by_name
            .into_iter()
            .filter(|(_, schemas)| !schemas.iter().any(|s| opts.unqualified_schemas.iter().any(|u| u == s)))
            .filter_map(|(name, schemas)| {
                let schema = match (&opts.bare_schema, schemas.as_slice()) {
                    (Some(b), _) => schemas.iter().copied().find(|s| s == b),
                    (None, [one]) => Some(*one),
                    (None, _) => None,
                };
                schema.map(|s| (s, name))
            })
            .collect()
    }

    /// The name the model is shown for `schema.name`.
    fn shown_name(&self, schema: &str, name: &str, opts: &RenderOptions, bare: &HashSet<(&str, &str)>) -> String {
        if bare.contains(&(schema, name)) {
            quote_ident(name)
        } else {
            qualified_name(schema, name, &opts.unqualified_schemas)
        }
    }

    /// Render every table as one line: `CREATE TABLE t (a integer, b text, PRIMARY KEY (a), FOREIGN KEY (b)
    /// REFERENCES u(c));`. Views are rendered as `CREATE VIEW v (a integer, …);` so the model knows their columns.
    /// Output is deterministic for a given catalog (see [`Catalog::normalize`]).
    pub fn render(&self, opts: &RenderOptions) -> String {
        let mut sorted = self.clone();
        sorted.normalize();
        let bare = self.bare_tables(opts);
        let mut out = String::new();
        for t in &sorted.tables {
            if opts.comments {
                if let Some(c) = t.comment.as_deref().filter(|c| !c.trim().is_empty()) {
                    let _ = writeln!(out, "-- {}: {}", self.shown_name(&t.schema, &t.name, opts, &bare), one_line(c));
                }
            }
            let kw = match t.kind {
                RelationKind::Table => "TABLE",
                RelationKind::View => "VIEW",
            };
            let _ = write!(out, "CREATE {kw} {} (", self.shown_name(&t.schema, &t.name, opts, &bare));
            let mut parts: Vec<String> = Vec::with_capacity(t.columns.len() + 1 + t.foreign_keys.len());
            for c in &t.columns {
                let mut p = format!("{} {}", quote_ident(&c.name), c.data_type);
                if c.not_null && !t.primary_key.iter().any(|k| k == &c.name) {
                    p.push_str(" NOT NULL");
                }
                let mut notes: Vec<String> = Vec::new();
                if opts.comments {
                    if let Some(cm) = c.comment.as_deref().filter(|c| !c.trim().is_empty()) {
                        notes.push(one_line(cm));
                    }
                }
                if !c.values.is_empty() {
                    let vals: Vec<String> = c.values.iter().map(|v| quote_literal(&one_line(v))).collect();
                    let lead = if c.values_complete { "one of" } else { "e.g." };
                    notes.push(format!("{lead} {}", vals.join(", ")));
                }
                if !notes.is_empty() {
                    // A block comment keeps the statement on one line.
                    let _ = write!(p, " /* {} */", notes.join("; ").replace("*/", "* /"));
                }
                parts.push(p);
            }
            if !t.primary_key.is_empty() {
                parts.push(format!("PRIMARY KEY ({})", ident_list(&t.primary_key)));
            }
            for fk in &t.foreign_keys {
                parts.push(format!(
                    "FOREIGN KEY ({}) REFERENCES {}({})",
                    ident_list(&fk.columns),
                    self.shown_name(&fk.ref_schema, &fk.ref_table, opts, &bare),
                    ident_list(&fk.ref_columns)
                ));
            }
            out.push_str(&parts.join(", "));
            out.push_str(");\n");
        }
        out
    }

    /// Find a table by name as the model may write it (case-insensitive, optionally schema-qualified).
    pub fn find_table(&self, schema: Option<&str>, name: &str) -> Option<&Table> {
        self.tables
            .iter()
            .find(|t| t.name.eq_ignore_ascii_case(name) && schema.is_none_or(|s| t.schema.eq_ignore_ascii_case(s)))
    }
}

/// A rendered context without its value hints (`/* e.g. … */`, `/* one of … */`, or those parts of a comment),
/// for comparing contexts whose statistics differ.
pub fn without_value_hints(context: &str) -> String {
    let mut out = String::with_capacity(context.len());
    let mut rest = context;
    while let Some(start) = rest.find(" /* ") {
        let Some(len) = rest[start..].find(" */") else { break };
        out.push_str(&rest[..start]);
        let inner = &rest[start + 4..start + len];
        let kept: Vec<&str> =
            inner.split("; ").filter(|p| !p.starts_with("e.g. '") && !p.starts_with("one of '")).collect();
        if !kept.is_empty() {
            out.push_str(&format!(" /* {} */", kept.join("; ")));
        }
        rest = &rest[start + len + 3..];
    }
    out.push_str(rest);
    out
}

/// A string literal as PostgreSQL writes one: `'it''s'`.
pub fn quote_literal(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

fn ident_list(cols: &[String]) -> String {
    cols.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ")
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(n: &str, t: &str) -> Column {
        Column { name: n.into(), data_type: t.into(), ..Default::default() }
    }

    #[test]
    fn reserved_list_is_sorted_for_binary_search() {
        assert!(RESERVED.windows(2).all(|w| w[0] < w[1]), "RESERVED must stay sorted and unique");
        for w in ["all", "order", "user", "with", "select", "table", "group", "limit", "analyse", "asymmetric"] {
            assert!(is_reserved(w), "{w} should be reserved");
        }
        assert!(!is_reserved("singer"));
        assert!(!is_reserved("name"));
    }

    #[test]
    fn quoting_follows_postgres_rules() {
        assert_eq!(quote_ident("singer"), "singer");
        assert_eq!(quote_ident("Singer"), "\"Singer\"");
        assert_eq!(quote_ident("song name"), "\"song name\"");
        assert_eq!(quote_ident("order"), "\"order\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident("1abc"), "\"1abc\"");
        assert_eq!(quote_ident(""), "\"\"");
    }

    #[test]
    fn render_is_order_independent() {
        let a = Table {
            schema: "public".into(),
            name: "a".into(),
            kind: RelationKind::Table,
            columns: vec![col("id", "integer")],
            primary_key: vec!["id".into()],
            foreign_keys: vec![],
            comment: None,
        };
        let mut b = a.clone();
        b.name = "b".into();
        let c1 = Catalog { tables: vec![a.clone(), b.clone()] };
        let c2 = Catalog { tables: vec![b, a] };
        let o = RenderOptions::default();
        assert_eq!(c1.render(&o), c2.render(&o));
        assert_eq!(
            c1.render(&o),
            "CREATE TABLE a (id integer, PRIMARY KEY (id));\nCREATE TABLE b (id integer, PRIMARY KEY (id));\n"
        );
    }

    #[test]
    fn other_schemas_are_qualified_and_comments_stay_on_one_line() {
        let t = Table {
            schema: "sales".into(),
            name: "Order Items".into(),
            kind: RelationKind::View,
            columns: vec![Column {
                name: "qty".into(),
                data_type: "integer".into(),
                not_null: true,
                comment: Some("units\nsold */ DROP".into()),
                ..Default::default()
            }],
            primary_key: vec![],
            foreign_keys: vec![],
            comment: Some("line one\nline two".into()),
        };
        let out = Catalog { tables: vec![t] }.render(&RenderOptions::default());
        assert_eq!(
            out,
            "-- sales.\"Order Items\": line one line two\nCREATE VIEW sales.\"Order Items\" (qty integer NOT NULL /* units sold * / DROP */);\n"
        );
    }

    #[test]
    fn bare_unique_writes_unique_names_bare_and_qualifies_them_back() {
        let t = |schema: &str, name: &str, fk: Option<(&str, &str)>| Table {
            schema: schema.into(),
            name: name.into(),
            kind: RelationKind::Table,
            columns: vec![col("id", "integer")],
            primary_key: vec!["id".into()],
            foreign_keys: fk
                .map(|(s, n)| ForeignKey {
                    columns: vec!["id".into()],
                    ref_schema: s.into(),
                    ref_table: n.into(),
                    ref_columns: vec!["id".into()],
                })
                .into_iter()
                .collect(),
            comment: Some("c".into()),
        };
        let cat = Catalog {
            tables: vec![
                t("world", "city", Some(("world", "country"))),
                t("world", "country", None),
                t("shop", "orders", Some(("shop", "customers"))),
                t("a", "dup", None),
                t("b", "dup", None),
                t("public", "notes", None),
            ],
        };
        let opts = RenderOptions { bare_unique: true, ..RenderOptions::default() };
        assert_eq!(
            cat.render(&opts),
            "-- a.dup: c\nCREATE TABLE a.dup (id integer, PRIMARY KEY (id));\n\
             -- b.dup: c\nCREATE TABLE b.dup (id integer, PRIMARY KEY (id));\n\
             -- notes: c\nCREATE TABLE notes (id integer, PRIMARY KEY (id));\n\
             -- orders: c\nCREATE TABLE orders (id integer, PRIMARY KEY (id), FOREIGN KEY (id) REFERENCES shop.customers(id));\n\
             -- city: c\nCREATE TABLE city (id integer, PRIMARY KEY (id), FOREIGN KEY (id) REFERENCES country(id));\n\
             -- country: c\nCREATE TABLE country (id integer, PRIMARY KEY (id));\n"
        );
        let q = cat.qualifier(&opts);
        assert_eq!(
            q.qualify("SELECT * FROM city JOIN country USING (id) JOIN notes USING (id) JOIN dup USING (id) JOIN orders USING (id)"),
            "SELECT * FROM world.city JOIN world.country USING (id) JOIN notes USING (id) JOIN dup USING (id) JOIN shop.orders USING (id)"
        );
        // Without the option nothing is written bare and there is nothing to qualify.
        assert!(cat.qualifier(&RenderOptions::default()).is_empty());
        assert!(cat.render(&RenderOptions::default()).contains("CREATE TABLE world.city"));

        // With a bare schema, only its tables are bare (a name another schema shares too); every other table is
        // qualified, unique or not, and the model's bare names resolve to that schema.
        let opts = RenderOptions { bare_unique: true, bare_schema: Some("b".into()), ..opts };
        let out = cat.render(&opts);
        assert!(out.contains("CREATE TABLE a.dup (") && out.contains("CREATE TABLE dup ("), "{out}");
        assert!(out.contains("CREATE TABLE world.city (") && out.contains("REFERENCES world.country("), "{out}");
        let q = cat.qualifier(&opts);
        assert_eq!(
            q.qualify("SELECT * FROM dup JOIN a.dup AS x USING (id) JOIN world.city USING (id)"),
            "SELECT * FROM b.dup JOIN a.dup AS x USING (id) JOIN world.city USING (id)"
        );
        // A table of the caller's search_path with that name wins: the bare schema's stays qualified.
        let mut with_public = cat.clone();
        with_public.tables.push(t("public", "dup", None));
        let out = with_public.render(&opts);
        assert!(out.contains("CREATE TABLE b.dup (") && out.contains("CREATE TABLE dup ("), "{out}");
        assert_eq!(with_public.qualifier(&opts).qualify("SELECT * FROM dup"), "SELECT * FROM dup");
    }

    #[test]
    fn value_hints_are_quoted_literals_beside_the_column() {
        let t = Table {
            schema: "public".into(),
            name: "singer".into(),
            kind: RelationKind::Table,
            columns: vec![
                Column {
                    name: "country".into(),
                    data_type: "text".into(),
                    values: vec!["Netherlands".into(), "United States".into(), "O'Brien\nLand".into()],
                    ..Default::default()
                },
                Column {
                    name: "status".into(),
                    data_type: "mood".into(),
                    comment: Some("how they feel".into()),
                    values: vec!["sad".into(), "ok".into()],
                    values_complete: true,
                    ..Default::default()
                },
            ],
            primary_key: vec![],
            foreign_keys: vec![],
            comment: None,
        };
        let out = Catalog { tables: vec![t] }.render(&RenderOptions::default());
        assert_eq!(
            out,
            "CREATE TABLE singer (country text /* e.g. 'Netherlands', 'United States', 'O''Brien Land' */, status mood \
             /* how they feel; one of 'sad', 'ok' */);\n"
        );
        assert_eq!(without_value_hints(&out), "CREATE TABLE singer (country text, status mood /* how they feel */);\n");
    }
}
