//! The SQL gate: what a model's SQL must pass before anything executes it.
//!
//! [`check`] accepts exactly one query statement — SELECT, WITH … SELECT, set operations, VALUES, TABLE — and
//! rejects, with a reason, everything else: other statements (DML, DDL, COPY, SET, CALL, DO, LOCK, GRANT, VACUUM,
//! EXPLAIN, LISTEN/NOTIFY, PREPARE/EXECUTE, …), several statements, data-modifying CTEs, `SELECT … INTO`, locking
//! clauses (`FOR UPDATE/SHARE`), and calls to functions with side effects or file, network or process access.
//! It is one layer of several: the extension also runs the statement read-only, in a subtransaction that is always
//! rolled back, under a statement timer, as the calling role. Slow but harmless queries are the timer's business.
//!
//! [`unknown_names`] reports tables and columns the statement uses that the schema context does not have, for one
//! repair round trip with the model.

use crate::sql::schema::Catalog;
use sqlparser::ast::{
    Expr, Ident, ObjectName, Query, SelectItem, SetExpr, Statement, TableAlias, TableFactor, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::collections::HashSet;
use std::ops::ControlFlow;

/// Why the gate refused a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    Empty,
    Unparseable(String),
    MultipleStatements(usize),
    NotAQuery(String),
    DataModifyingCte,
    SelectInto,
    LockingClause,
    DeniedFunction(String),
    /// Parentheses nested deeper than [`MAX_NESTING`]: refused before parsing (sqlparser's backtracking over
    /// nested function arguments takes time exponential in the depth — found by fuzzing, `fuzz/`).
    TooDeep(usize),
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Empty => write!(f, "the SQL is empty"),
            Rejection::Unparseable(e) => write!(f, "the SQL does not parse: {e}"),
            Rejection::MultipleStatements(n) => write!(f, "only one statement is allowed, found {n}"),
            Rejection::NotAQuery(kind) => write!(f, "only queries are allowed, found {kind}"),
            Rejection::DataModifyingCte => write!(f, "data-modifying statements inside WITH are not allowed"),
            Rejection::SelectInto => write!(f, "SELECT … INTO creates a table and is not allowed"),
            Rejection::LockingClause => write!(f, "locking clauses (FOR UPDATE / FOR SHARE) are not allowed"),
            Rejection::DeniedFunction(name) => write!(f, "calling {name}() is not allowed"),
            Rejection::TooDeep(d) => {
                write!(f, "the SQL nests parentheses {d} levels deep, more than the {MAX_NESTING} allowed")
            }
        }
    }
}

/// The deepest parenthesis nesting the gate parses. sqlparser re-parses nested function arguments on
/// backtracking, so its time doubles with each level (measured: 20 ms at 14 levels in a debug build, minutes near
/// 30), and a parse cannot be interrupted by a cancel; real queries nest far less (Spider's gold SQL: at most 2).
pub const MAX_NESTING: usize = 12;

/// How deeply `sql` nests parentheses, outside string literals, quoted identifiers and comments.
pub fn nesting_depth(sql: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    crate::sql::extract::scan_code(sql, |c| {
        match c {
            b'(' => {
                depth += 1;
                max = max.max(depth);
            }
            b')' => depth = depth.saturating_sub(1),
            _ => {}
        }
        false
    });
    max
}

/// Functions a generated query may not call: side effects, server control, file/network/process access, large
/// objects, sequences, advisory locks, notifications, and functions that run SQL given as text (which would
/// bypass this gate). Matched on the unqualified, lower-cased name; entries ending in `*` are prefixes.
pub const DENIED_FUNCTIONS: &[&str] = &[
    "set_config",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_*",
    "pg_stat_file",
    "pg_file_*",
    "lo_*",
    "loread",
    "lowrite",
    "dblink*",
    "nextval",
    "setval",
    "pg_advisory_*",
    "pg_try_advisory_*",
    "pg_notify",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_promote",
    "pg_logical_emit_message",
    "pg_stat_reset*",
    "pg_backup_*",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_create_*_replication_slot",
    "pg_drop_replication_slot",
    "pg_replication_origin_*",
    "pg_import_system_collations",
    "query_to_xml*",
    "cursor_to_xml*",
    "pg_sleep_for",
    "pg_sleep_until",
    "txid_current",
    "pg_current_xact_id",
    "pg_log_backend_memory_contexts",
];

/// Whether a function name (unqualified; any case) is on the deny-list. Shared with the extension's second check of
/// the same SQL with PostgreSQL's own parser.
pub fn is_denied(name: &str) -> bool {
    let last = name.to_lowercase();
    DENIED_FUNCTIONS.iter().any(|d| match d.strip_suffix('*') {
        Some(prefix) => last.starts_with(prefix),
        None => *d == last,
    })
}

fn denied(name: &ObjectName) -> Option<String> {
    let last = name.0.last()?.as_ident()?.value.to_lowercase();
    is_denied(&last).then_some(last)
}

/// A statement that passed the gate.
#[derive(Debug, Clone)]
pub struct Checked {
    pub statement: Statement,
    /// The statement as sqlparser writes it back (normalized whitespace and keywords).
    pub normalized: String,
}

struct Structure {
    rejection: Option<Rejection>,
}

impl Visitor for Structure {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if let SetExpr::Select(sel) = q.body.as_ref() {
            let aliases = sel.projection.iter().filter_map(|item| match item {
                SelectItem::ExprWithAlias { alias, .. } => Some(alias),
                _ => None,
            });
            if let Some(word) = aliases.filter_map(reserved).next() {
                self.rejection = Some(word);
                return ControlFlow::Break(());
            }
        }
        if !q.locks.is_empty() {
            self.rejection = Some(Rejection::LockingClause);
            return ControlFlow::Break(());
        }
        if let Some(with) = &q.with {
            if with.cte_tables.iter().any(|c| modifies(&c.query.body)) {
                self.rejection = Some(Rejection::DataModifyingCte);
                return ControlFlow::Break(());
            }
        }
        if modifies(&q.body) {
            self.rejection = Some(Rejection::NotAQuery("a data-modifying statement".into()));
            return ControlFlow::Break(());
        }
        if into(&q.body) {
            self.rejection = Some(Rejection::SelectInto);
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        let names: &[Ident] = match e {
            Expr::Identifier(id) => std::slice::from_ref(id),
            Expr::CompoundIdentifier(ids) => ids,
            _ => &[],
        };
        if let Some(word) = names.iter().find_map(reserved) {
            self.rejection = Some(word);
            return ControlFlow::Break(());
        }
        if let Expr::Function(f) = e {
            if let Some(name) = denied(&f.name) {
                self.rejection = Some(Rejection::DeniedFunction(name));
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, t: &TableFactor) -> ControlFlow<()> {
        // Set-returning functions in FROM: `FROM pg_ls_dir('.')`, `FROM dblink(…)`.
        let name = match t {
            TableFactor::Table { name, args: Some(_), .. } => Some(name),
            TableFactor::Function { name, .. } => Some(name),
            _ => None,
        };
        if let Some(n) = name.and_then(denied) {
            self.rejection = Some(Rejection::DeniedFunction(n));
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }
}

/// PostgreSQL's reserved key words that can never be an unquoted name (the value-like ones — `current_date`,
/// `true`, `null`, … — are left out: sqlparser may hand them over as names, and they are values either way). Where
/// sqlparser takes one of these as a name, PostgreSQL reads the text differently, e.g. `SELECT FOR UPDATE`.
const RESERVED: &[&str] = &[
    "ALL",
    "ANALYSE",
    "ANALYZE",
    "AND",
    "ANY",
    "AS",
    "ASC",
    "ASYMMETRIC",
    "BOTH",
    "CASE",
    "CAST",
    "CHECK",
    "COLLATE",
    "COLUMN",
    "CONSTRAINT",
    "CREATE",
    "DEFERRABLE",
    "DESC",
    "DISTINCT",
    "DO",
    "ELSE",
    "END",
    "EXCEPT",
    "FETCH",
    "FOR",
    "FOREIGN",
    "FROM",
    "GRANT",
    "GROUP",
    "HAVING",
    "IN",
    "INITIALLY",
    "INTERSECT",
    "INTO",
    "LATERAL",
    "LEADING",
    "LIMIT",
    "NOT",
    "OFFSET",
    "ON",
    "ONLY",
    "OR",
    "ORDER",
    "PLACING",
    "PRIMARY",
    "REFERENCES",
    "RETURNING",
    "SELECT",
    "SOME",
    "SYMMETRIC",
    "TABLE",
    "THEN",
    "TO",
    "TRAILING",
    "UNION",
    "UNIQUE",
    "USING",
    "VARIADIC",
    "WHEN",
    "WHERE",
    "WINDOW",
    "WITH",
];

/// A rejection if `id` is an unquoted reserved word.
fn reserved(id: &Ident) -> Option<Rejection> {
    let upper = id.value.to_ascii_uppercase();
    (id.quote_style.is_none() && RESERVED.contains(&upper.as_str())).then(|| {
        Rejection::Unparseable(format!(
            "`{upper}` is a reserved word in PostgreSQL, not a name (quote it, \"{}\", to use it as one)",
            id.value
        ))
    })
}

fn modifies(body: &SetExpr) -> bool {
    match body {
        SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => true,
        SetExpr::SetOperation { left, right, .. } => modifies(left) || modifies(right),
        SetExpr::Query(q) => modifies(&q.body),
        _ => false,
    }
}

fn into(body: &SetExpr) -> bool {
    match body {
        SetExpr::Select(s) => s.into.is_some(),
        SetExpr::SetOperation { left, right, .. } => into(left) || into(right),
        SetExpr::Query(q) => into(&q.body),
        _ => false,
    }
}

fn statement_kind(s: &Statement) -> String {
    // The variant name, as a user would recognise it: "Insert", "CreateTable", "Copy", …
    let dbg = format!("{s:?}");
    let name: String = dbg.chars().take_while(|c| c.is_alphanumeric()).collect();
    let mut words = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            words.push(' ');
        }
        words.push(c.to_ascii_uppercase());
    }
    words
}

/// Check one SQL text. See the module documentation for what passes.
pub fn check(sql: &str) -> Result<Checked, Rejection> {
    if sql.trim().trim_end_matches(';').trim().is_empty() {
        return Err(Rejection::Empty);
    }
    let depth = nesting_depth(sql);
    if depth > MAX_NESTING {
        return Err(Rejection::TooDeep(depth));
    }
    let mut stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(|e| Rejection::Unparseable(e.to_string()))?;
    match stmts.len() {
        0 => return Err(Rejection::Empty),
        1 => {}
        n => return Err(Rejection::MultipleStatements(n)),
    }
    let stmt = stmts.remove(0);
    if !matches!(stmt, Statement::Query(_)) {
        return Err(Rejection::NotAQuery(statement_kind(&stmt)));
    }
    let mut v = Structure { rejection: None };
    let _ = stmt.visit(&mut v);
    if let Some(r) = v.rejection {
        return Err(r);
    }
    Ok(Checked { normalized: stmt.to_string(), statement: stmt })
}

/// The tables and views `checked` reads, each once in order of appearance, as normalized name parts (`[name]` or
/// `[schema, name]`); CTE names are left out. What a verified example is filed under: the caller must be able to
/// read every one of them to be shown it.
pub fn relations(checked: &Checked) -> Vec<Vec<String>> {
    let mut names = Names::default();
    let _ = checked.statement.visit(&mut names);
    let mut out: Vec<Vec<String>> = Vec::new();
    for rel in names.relations {
        let cte = rel.len() == 1 && names.ctes.contains(&rel[0]);
        if !cte && !rel.is_empty() && !out.contains(&rel) {
            out.push(rel);
        }
    }
    out
}

/// A name the statement uses that the schema context lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnknownName {
    Table(String),
    Column(String),
}

impl std::fmt::Display for UnknownName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnknownName::Table(t) => write!(f, "table {t} does not exist"),
            UnknownName::Column(c) => write!(f, "column {c} does not exist"),
        }
    }
}

/// How PostgreSQL matches an identifier as written: unquoted names fold to lower case, quoted ones are exact.
pub(crate) fn norm(id: &Ident) -> String {
    if id.quote_style.is_some() {
        id.value.clone()
    } else {
        id.value.to_lowercase()
    }
}

#[derive(Default)]
struct Names {
    relations: Vec<Vec<String>>,
    columns: Vec<String>,
    /// Names the statement defines itself: CTEs, table and column aliases, select-list aliases.
    defined: HashSet<String>,
    /// CTE names: the only defined names a FROM item may refer to as a table.
    ctes: HashSet<String>,
}

impl Names {
    fn alias(&mut self, a: &Option<TableAlias>) {
        if let Some(a) = a {
            self.defined.insert(norm(&a.name));
            for c in &a.columns {
                self.defined.insert(norm(&c.name));
            }
        }
    }
}

impl Visitor for Names {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if let Some(with) = &q.with {
            for c in &with.cte_tables {
                self.ctes.insert(norm(&c.alias.name));
                self.alias(&Some(c.alias.clone()));
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, t: &TableFactor) -> ControlFlow<()> {
        match t {
            TableFactor::Table { name, alias, args, .. } => {
                if args.is_none() {
                    self.relations.push(name.0.iter().filter_map(|p| p.as_ident()).map(norm).collect());
                }
                self.alias(alias);
            }
            TableFactor::Derived { alias, .. }
            | TableFactor::Function { alias, .. }
            | TableFactor::UNNEST { alias, .. }
            | TableFactor::TableFunction { alias, .. } => self.alias(alias),
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        match e {
            Expr::Identifier(id) => self.columns.push(norm(id)),
            Expr::CompoundIdentifier(ids) => {
                if let Some(last) = ids.last() {
                    self.columns.push(norm(last));
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, s: &Statement) -> ControlFlow<()> {
        if let Statement::Query(q) = s {
            collect_select_aliases(&q.body, &mut self.defined);
        }
        ControlFlow::Continue(())
    }
}

fn collect_select_aliases(body: &SetExpr, out: &mut HashSet<String>) {
    match body {
        SetExpr::Select(s) => {
            for item in &s.projection {
                if let SelectItem::ExprWithAlias { alias, .. } = item {
                    out.insert(norm(alias));
                }
            }
        }
        SetExpr::SetOperation { left, right, .. } => {
            collect_select_aliases(left, out);
            collect_select_aliases(right, out);
        }
        SetExpr::Query(q) => collect_select_aliases(&q.body, out),
        _ => {}
    }
}

/// Words that parse as identifiers but are SQL value functions, not columns.
const VALUE_KEYWORDS: &[&str] = &[
    "current_date",
    "current_time",
    "current_timestamp",
    "localtime",
    "localtimestamp",
    "current_user",
    "session_user",
    "user",
    "current_role",
    "current_schema",
    "current_catalog",
];

/// Tables and columns in `checked` that `catalog` does not describe. Conservative: a column counts as known when
/// any table the statement reads has it, or the statement defines it (an alias). Subquery aliases and CTE names
/// count as tables the statement defines.
pub fn unknown_names(checked: &Checked, catalog: &Catalog) -> Vec<UnknownName> {
    let mut names = Names::default();
    let _ = checked.statement.visit(&mut names);
    let mut subquery_aliases = HashSet::new();
    // Nested select-list aliases (inside subqueries) are defined names too.
    struct Aliases<'a>(&'a mut HashSet<String>);
    impl Visitor for Aliases<'_> {
        type Break = ();
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
            collect_select_aliases(&q.body, self.0);
            ControlFlow::Continue(())
        }
    }
    let _ = checked.statement.visit(&mut Aliases(&mut subquery_aliases));
    names.defined.extend(subquery_aliases);

    let mut unknown = Vec::new();
    let mut tables = Vec::new();
    for rel in &names.relations {
        let (schema, name) = match rel.as_slice() {
            [name] => (None, name.as_str()),
            [.., schema, name] => (Some(schema.as_str()), name.as_str()),
            [] => continue,
        };
        match catalog.find_table(schema, name) {
            Some(t) => tables.push(t),
            // A CTE; not any alias, since `FROM country AS country` must still find that country is missing.
            None if schema.is_none() && names.ctes.contains(name) => {}
            None => {
                let shown = rel.join(".");
                if !unknown.contains(&UnknownName::Table(shown.clone())) {
                    unknown.push(UnknownName::Table(shown));
                }
            }
        }
    }
    for c in &names.columns {
        let known = names.defined.contains(c)
            || VALUE_KEYWORDS.contains(&c.as_str())
            || tables.iter().any(|t| t.columns.iter().any(|col| col.name == *c))
            || tables.iter().any(|t| t.name == *c);
        if !known && !unknown.contains(&UnknownName::Column(c.clone())) {
            unknown.push(UnknownName::Column(c.clone()));
        }
    }
    unknown
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::schema::{Column, Table};

    fn rejects(sql: &str) -> Rejection {
        check(sql).expect_err(sql)
    }

    #[test]
    fn relations_are_the_tables_read_each_once_without_ctes() {
        let c = check("WITH t AS (SELECT 1 FROM a) SELECT * FROM t JOIN s.b ON true WHERE x IN (SELECT y FROM a) AND EXISTS (SELECT 1 FROM \"Mixed\")").unwrap();
        assert_eq!(relations(&c), vec![vec!["a".to_string()], vec!["s".into(), "b".into()], vec!["Mixed".into()]]);
    }

    #[test]
    fn accepts_queries() {
        for sql in [
            "SELECT 1",
            "select name from singer where age > 30 order by name limit 5",
            "WITH a AS (SELECT 1 AS x) SELECT x FROM a",
            "SELECT 1 UNION ALL SELECT 2 EXCEPT SELECT 3",
            "VALUES (1, 'a'), (2, 'b')",
            "(SELECT 1) INTERSECT (SELECT 1);",
            "SELECT count(*) FROM generate_series(1, 10)",
            "SELECT pg_sleep(1)",
        ] {
            assert!(check(sql).is_ok(), "{sql}: {:?}", check(sql).err());
        }
    }

    #[test]
    fn rejects_other_statements() {
        for sql in [
            "DELETE FROM singer",
            "UPDATE singer SET age = 1",
            "INSERT INTO singer VALUES (1)",
            "DROP TABLE singer",
            "CREATE TABLE x (a int)",
            "TRUNCATE singer",
            "COPY singer TO PROGRAM 'rm -rf /'",
            "SET statement_timeout = 0",
            "RESET ALL",
            "CALL p()",
            "DO $$ BEGIN END $$",
            "LOCK TABLE singer",
            "GRANT ALL ON singer TO public",
            "VACUUM singer",
            "EXPLAIN ANALYZE DELETE FROM singer",
            "LISTEN x",
            "NOTIFY x",
            "PREPARE p AS SELECT 1",
            "EXECUTE p",
            "ALTER TABLE singer ADD COLUMN x int",
        ] {
            match check(sql) {
                Err(Rejection::NotAQuery(_)) | Err(Rejection::Unparseable(_)) => {}
                other => panic!("{sql}: {other:?}"),
            }
        }
    }

    #[test]
    fn rejects_hidden_writes_and_locks() {
        assert_eq!(rejects("SELECT 1; DROP TABLE singer"), Rejection::MultipleStatements(2));
        assert_eq!(rejects("WITH d AS (DELETE FROM singer RETURNING *) SELECT * FROM d"), Rejection::DataModifyingCte);
        assert_eq!(rejects("SELECT * INTO new_table FROM singer"), Rejection::SelectInto);
        assert_eq!(rejects("SELECT * FROM singer FOR UPDATE"), Rejection::LockingClause);
        // sqlparser reads a reserved word as a name (`SELECT "FOR" AS "UPDATE"`) where PostgreSQL reads a locking
        // clause on an empty target list (found by fuzzing, fuzz/): a reserved word is never an unquoted name.
        assert!(
            matches!(rejects("SELECT  FOR UPDATE"), Rejection::Unparseable(m) if m.contains("`FOR` is a reserved word"))
        );
        assert!(matches!(rejects("SELECT 1 AS for"), Rejection::Unparseable(_)));
        assert!(matches!(rejects("SELECT s.from FROM singer s"), Rejection::Unparseable(_)));
        // Quoted, or an unreserved keyword, it is a name; value keywords stay values.
        for sql in [
            "SELECT \"for\" FROM singer",
            "SELECT name AS \"update\" FROM singer",
            "SELECT year, name FROM singer",
            "SELECT current_date, current_user",
            "SELECT * FROM singer WHERE name IS NOT NULL AND true",
        ] {
            assert!(check(sql).is_ok(), "{sql}");
        }
        assert_eq!(rejects("SELECT * FROM (SELECT * FROM singer FOR SHARE) s"), Rejection::LockingClause);
        assert_eq!(rejects("  ;  "), Rejection::Empty);
    }

    #[test]
    fn rejects_denied_functions_anywhere() {
        for (sql, f) in [
            ("SELECT set_config('statement_timeout', '0', false)", "set_config"),
            ("SELECT pg_catalog.pg_terminate_backend(1)", "pg_terminate_backend"),
            ("SELECT * FROM singer WHERE age > (SELECT nextval('s'))", "nextval"),
            ("SELECT * FROM pg_ls_dir('.')", "pg_ls_dir"),
            ("SELECT lo_import('/etc/passwd')", "lo_import"),
            ("SELECT pg_advisory_lock(1)", "pg_advisory_lock"),
            ("SELECT query_to_xml('delete from singer', true, true, '')", "query_to_xml"),
            ("SELECT * FROM dblink('host=x', 'select 1') AS t(a int)", "dblink"),
            ("SELECT PG_READ_FILE('/etc/passwd')", "pg_read_file"),
            ("WITH a AS (SELECT pg_notify('c', 'x')) SELECT * FROM a", "pg_notify"),
        ] {
            assert_eq!(rejects(sql), Rejection::DeniedFunction(f.into()), "{sql}");
        }
    }

    fn catalog() -> Catalog {
        let col = |n: &str| Column { name: n.into(), data_type: "integer".into(), ..Default::default() };
        Catalog {
            tables: vec![Table {
                schema: "public".into(),
                name: "singer".into(),
                kind: Default::default(),
                columns: vec![col("singer_id"), col("name"), col("age")],
                primary_key: vec![],
                foreign_keys: vec![],
                comment: None,
            }],
        }
    }

    #[test]
    fn unknown_tables_and_columns_are_reported() {
        let c = check("SELECT nme, s.age FROM singer s JOIN concerts c ON c.id = s.singer_id").unwrap();
        assert_eq!(
            unknown_names(&c, &catalog()),
            vec![
                UnknownName::Table("concerts".into()),
                UnknownName::Column("nme".into()),
                UnknownName::Column("id".into())
            ]
        );
    }

    #[test]
    fn aliases_and_ctes_are_known() {
        let c = check(
            "WITH old AS (SELECT name, age AS years FROM singer WHERE age > 40) \
             SELECT o.name, o.years, count(*) AS n FROM old o GROUP BY o.name, o.years ORDER BY n, current_date",
        )
        .unwrap();
        assert_eq!(unknown_names(&c, &catalog()), vec![]);
        let c = check("SELECT t.x FROM (SELECT age AS x FROM singer) t").unwrap();
        assert_eq!(unknown_names(&c, &catalog()), vec![]);
        let c = check("SELECT s.name FROM singer AS s JOIN country AS country ON s.singer_id = country.id").unwrap();
        assert_eq!(
            unknown_names(&c, &catalog()),
            vec![UnknownName::Table("country".into()), UnknownName::Column("id".into())]
        );
        let c = check("SELECT \"Name\" FROM public.singer").unwrap();
        assert_eq!(unknown_names(&c, &catalog()), vec![UnknownName::Column("Name".into())]);
    }

    /// Found by `fuzz/` (gate_vs_postgres): nested function calls made sqlparser run for minutes. Deep nesting is
    /// refused at once, without parsing; parentheses in literals, quoted names and comments do not count.
    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let nested = |d: usize| format!("SELECT {}1{}", "f(".repeat(d), ")".repeat(d));
        assert!(check(&nested(MAX_NESTING)).is_ok());
        let t = std::time::Instant::now();
        assert_eq!(check(&nested(40)).unwrap_err(), Rejection::TooDeep(40));
        assert_eq!(check(&format!("SELECT {}", "(".repeat(5000))).unwrap_err(), Rejection::TooDeep(5000));
        assert!(t.elapsed() < std::time::Duration::from_secs(1), "refused without parsing: {:?}", t.elapsed());
        assert_eq!(nesting_depth("SELECT '((((' AS a, \"((\" FROM t -- ((((\n WHERE (x) /* ((( */ AND $q$(($q$"), 1);
        // Extraction parses model output too (and again for each trailing line it drops): it gives up as quickly.
        let t = std::time::Instant::now();
        let _ = crate::sql::extract::extract_sql(&format!("{}\nmore prose\nand more", nested(40)));
        assert!(t.elapsed() < std::time::Duration::from_secs(1), "extraction: {:?}", t.elapsed());
    }
}
