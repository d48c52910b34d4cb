//! A plain-language explanation of a query, built from its parse tree alone (no model, no schema).
//!
//! [`explain`] writes one line per clause, in the order a reader should take them — what is read, how it is joined,
//! which rows are kept, how they are grouped, what is returned, in what order and how many — rather than the order
//! SQL writes them. Table aliases are replaced by their table names wherever that cannot be ambiguous; aggregates,
//! join kinds, set operations and a few condition forms (IN, BETWEEN, LIKE, EXISTS) are put in words, with the SQL
//! kept next to them; everything else is shown as SQL. Subqueries and WITH queries get their own indented blocks.

use crate::sql::gate::{nesting_depth, MAX_NESTING};
use sqlparser::ast::{
    BinaryOperator, Distinct, DuplicateTreatment, Expr, Function, FunctionArg, FunctionArgExpr, FunctionArguments,
    GroupByExpr, Ident, JoinConstraint, JoinOperator, LimitClause, OrderByExpr, OrderByKind, Query, Select, SelectItem,
    SelectItemQualifiedWildcardKind, SetExpr, SetOperator, SetQuantifier, Statement, TableAlias, TableFactor,
    UnaryOperator, Value, Visit, VisitMut, Visitor, VisitorMut,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use std::collections::HashSet;
use std::ops::ControlFlow;

/// Why a text could not be explained.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The text is not SQL that sqlparser's PostgreSQL dialect reads (or is nested too deeply to try).
    #[error("the SQL does not parse: {0}")]
    Parse(String),
    /// Not exactly one statement.
    #[error("only one statement can be explained, found {0}")]
    NotOneStatement(usize),
    /// A statement other than a read-only query.
    #[error("only a read-only query (SELECT, WITH, VALUES or a set operation) can be explained")]
    NotAQuery,
}

/// A plain-language, clause-by-clause description of one read-only query, built from its parse tree.
///
/// Lines are separated by `\n` (no newline after the last); nested blocks are indented by two spaces a level.
pub fn explain(sql: &str) -> Result<String, ExplainError> {
    let depth = nesting_depth(sql);
    if depth > MAX_NESTING {
        return Err(ExplainError::Parse(format!(
            "it is nested too deeply: parentheses {depth} levels deep, more than the {MAX_NESTING} that are parsed"
        )));
    }
    let stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(|e| ExplainError::Parse(e.to_string()))?;
    if stmts.len() != 1 {
        return Err(ExplainError::NotOneStatement(stmts.len()));
    }
    let Statement::Query(query) = &stmts[0] else {
        return Err(ExplainError::NotAQuery);
    };
    let mut writes = Writes(false);
    let _ = stmts[0].visit(&mut writes);
    if writes.0 {
        return Err(ExplainError::NotAQuery);
    }
    let mut ex = Explainer::default();
    ex.query(query, 0);
    Ok(ex.lines.join("\n"))
}

/// Finds anything that makes a query statement more than a read: data-modifying bodies or CTEs, `SELECT … INTO`,
/// locking clauses.
struct Writes(bool);

impl Visitor for Writes {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if !q.locks.is_empty() || writes(&q.body) {
            self.0 = true;
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }
}

fn writes(body: &SetExpr) -> bool {
    match body {
        SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => true,
        SetExpr::Select(s) => s.into.is_some(),
        SetExpr::SetOperation { left, right, .. } => writes(left) || writes(right),
        SetExpr::Query(q) => writes(&q.body),
        SetExpr::Values(_) | SetExpr::Table(_) => false,
    }
}

/// How an identifier is matched: unquoted names fold to lower case, quoted ones are exact.
fn norm(id: &Ident) -> String {
    if id.quote_style.is_some() {
        id.value.clone()
    } else {
        id.value.to_lowercase()
    }
}

fn dotted(idents: &[Ident]) -> String {
    idents.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(".")
}

/// A table named in FROM.
struct TableRef {
    /// The name as written (`schema.table` keeps both parts).
    idents: Vec<Ident>,
    /// The matching key of its last part.
    key: String,
    /// Its alias renames columns (`AS t(a, b)`): `t.a` cannot be written as `table.a`.
    renames: bool,
}

/// One FROM item of a SELECT: what qualified column names refer to.
struct Item {
    /// The name the query refers to it by (its alias, else its table's name); none for an unnamed subquery.
    key: Option<String>,
    /// Set when the item is a table (or WITH query) read by name.
    table: Option<TableRef>,
    /// How the explanation names it when its table name cannot be used.
    label: String,
}

/// The FROM items of one SELECT, and the qualifiers written anywhere inside it (nested queries included).
#[derive(Default)]
struct Scope {
    items: Vec<Item>,
    mentioned: HashSet<String>,
}

impl Scope {
    fn new(items: Vec<Item>, select: &Select) -> Scope {
        struct Qualifiers(HashSet<String>);
        impl Visitor for Qualifiers {
            type Break = ();
            fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
                match e {
                    Expr::CompoundIdentifier(parts) if parts.len() > 1 => {
                        self.0.extend(parts.first().map(norm));
                    }
                    Expr::QualifiedWildcard(name, _) => {
                        self.0.extend(name.0.first().and_then(|p| p.as_ident()).map(norm));
                    }
                    _ => {}
                }
                ControlFlow::Continue(())
            }
        }
        let mut q = Qualifiers(HashSet::new());
        let _ = select.visit(&mut q);
        for item in &select.projection {
            if let SelectItem::QualifiedWildcard(SelectItemQualifiedWildcardKind::ObjectName(n), _) = item {
                q.0.extend(n.0.first().and_then(|p| p.as_ident()).map(norm));
            }
        }
        Scope { items, mentioned: q.0 }
    }
}

/// A subquery whose block follows the line that mentions it.
struct Pending<'a> {
    number: usize,
    role: Role,
    query: &'a Query,
}

enum Role {
    /// `x [NOT] IN (subquery)`: the values x is checked against.
    In(String),
    /// A scalar subquery.
    Single,
    /// `[NOT] EXISTS (subquery)`.
    Exists,
    /// `x op ANY/ALL (subquery)`.
    Compared(String),
    /// A subquery in FROM, and its alias.
    Derived(Option<String>, bool),
}

/// A subquery block being explained: which outer names it uses.
struct Frame {
    /// The number of scopes outside it.
    base: usize,
    outer: Vec<String>,
}

#[derive(Default)]
struct Explainer {
    lines: Vec<String>,
    subqueries: usize,
    /// FROM items of the SELECTs being explained, outermost first.
    scopes: Vec<Scope>,
    /// Keys of the WITH queries in view.
    ctes: Vec<String>,
    frames: Vec<Frame>,
    /// Whether an inner join has been put in words already (later ones are only named).
    inner_said: bool,
    /// Whether the SELECT being explained groups its rows (aggregates are then per group).
    per_group: bool,
}

const AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "string_agg",
    "array_agg",
    "bool_and",
    "bool_or",
    "every",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "bit_and",
    "bit_or",
    "bit_xor",
    "corr",
    "covar_pop",
    "covar_samp",
    "percentile_cont",
    "percentile_disc",
    "mode",
    "xmlagg",
    "any_value",
];

fn function_name(f: &Function) -> Option<String> {
    match f.name.0.as_slice() {
        [part] => part.as_ident().map(|i| i.value.to_lowercase()),
        _ => None,
    }
}

/// Whether an expression aggregates (outside nested queries and window functions).
fn aggregates(e: &Expr) -> bool {
    struct Finder {
        depth: usize,
        found: bool,
    }
    impl Visitor for Finder {
        type Break = ();
        fn pre_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.depth += 1;
            ControlFlow::Continue(())
        }
        fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.depth -= 1;
            ControlFlow::Continue(())
        }
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            if let Expr::Function(f) = e {
                if self.depth == 0
                    && f.over.is_none()
                    && function_name(f).is_some_and(|n| AGGREGATES.contains(&n.as_str()))
                {
                    self.found = true;
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        }
    }
    let mut finder = Finder { depth: 0, found: false };
    let _ = e.visit(&mut finder);
    finder.found
}

fn integer(e: &Expr) -> Option<u64> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n.to_string().parse().ok(),
            _ => None,
        },
        _ => None,
    }
}

fn rows(n: u64) -> String {
    if n == 1 {
        "1 row".into()
    } else {
        format!("{n} rows")
    }
}

fn lateral(t: &TableFactor) -> bool {
    matches!(t, TableFactor::Derived { lateral: true, .. } | TableFactor::Function { lateral: true, .. })
}

fn unnest(mut e: &Expr) -> &Expr {
    while let Expr::Nested(inner) = e {
        e = inner;
    }
    e
}

/// The conditions of an AND chain, each its own line.
fn conjuncts(e: &Expr) -> Vec<&Expr> {
    match unnest(e) {
        Expr::BinaryOp { left, op: BinaryOperator::And, right } => {
            let mut v = conjuncts(left);
            v.extend(conjuncts(right));
            v
        }
        other => vec![other],
    }
}

/// `=`, `<>`, `<`, `<=`, `>`, `>=`.
pub(crate) fn comparison(op: &BinaryOperator) -> bool {
    matches!(
        op,
        BinaryOperator::Eq
            | BinaryOperator::NotEq
            | BinaryOperator::Lt
            | BinaryOperator::LtEq
            | BinaryOperator::Gt
            | BinaryOperator::GtEq
    )
}

/// What `%` and `_` mean in a LIKE pattern, when it is a literal that uses them (and no escapes).
fn wildcards(pattern: &Expr) -> &'static str {
    let Expr::Value(v) = pattern else { return "" };
    let Value::SingleQuotedString(s) = &v.value else { return "" };
    if s.contains('\\') {
        return "";
    }
    match (s.contains('%'), s.contains('_')) {
        (true, true) => " (% stands for any text, _ for any one character)",
        (true, false) => " (% stands for any text)",
        (false, true) => " (_ stands for any one character)",
        (false, false) => " (no wildcards)",
    }
}

/// Rewrites `alias.column` to `table.column` where the scopes allow it, leaving nested queries as written.
struct Rewriter<'s> {
    scopes: &'s [Scope],
    frames: &'s mut Vec<Frame>,
    depth: usize,
}

impl VisitorMut for Rewriter<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, _: &mut Query) -> ControlFlow<()> {
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _: &mut Query) -> ControlFlow<()> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        if self.depth == 0 {
            if let Expr::CompoundIdentifier(parts) = e {
                if parts.len() == 2 {
                    if let Some(table) = resolve(self.scopes, self.frames, &parts[0]) {
                        let column = parts[1].clone();
                        *parts = table;
                        parts.push(column);
                    }
                }
            }
        }
        ControlFlow::Continue(())
    }
}

/// The FROM item a qualifier names: the innermost scope that has it, if it has it once.
fn lookup(scopes: &[Scope], key: &str) -> Option<(usize, usize)> {
    for (level, scope) in scopes.iter().enumerate().rev() {
        let mut found = scope.items.iter().enumerate().filter(|(_, it)| it.key.as_deref() == Some(key));
        if let Some((i, _)) = found.next() {
            return found.next().is_none().then_some((level, i));
        }
    }
    None
}

/// The table name an aliased item can be called by: only when nothing else at its level or inside it could be
/// read as that name (outer items of the same name are shadowed, as in SQL), and no outer item goes by that name
/// where its SELECT qualifies a column with it.
fn table_name(scopes: &[Scope], level: usize, index: usize) -> Option<&[Ident]> {
    let item = scopes.get(level)?.items.get(index)?;
    let table = item.table.as_ref()?;
    let name = table.key.as_str();
    if table.renames || item.key.as_deref() == Some(name) {
        return None;
    }
    let inner = scopes[level..].iter().enumerate().any(|(l, scope)| {
        scope.items.iter().enumerate().any(|(i, other)| {
            (l != 0 || i != index)
                && (other.key.as_deref() == Some(name) || other.table.as_ref().is_some_and(|t| t.key == name))
        })
    });
    let outer = scopes[level].mentioned.contains(name)
        && scopes[..level].iter().any(|scope| scope.items.iter().any(|other| other.key.as_deref() == Some(name)));
    (!inner && !outer).then_some(table.idents.as_slice())
}

fn shown(scopes: &[Scope], level: usize, index: usize) -> String {
    match table_name(scopes, level, index) {
        Some(idents) => dotted(idents),
        None => scopes[level].items[index].label.clone(),
    }
}

/// The qualifier to write for `qualifier`, when it should change; notes the use of an outer query's name.
fn resolve(scopes: &[Scope], frames: &mut [Frame], qualifier: &Ident) -> Option<Vec<Ident>> {
    let (level, index) = lookup(scopes, &norm(qualifier))?;
    let name = table_name(scopes, level, index).map(<[Ident]>::to_vec);
    let written = name.as_deref().map(dotted).unwrap_or_else(|| qualifier.to_string());
    for frame in frames.iter_mut().filter(|f| f.base > level) {
        if !frame.outer.contains(&written) {
            frame.outer.push(written.clone());
        }
    }
    name
}

impl Explainer {
    fn push(&mut self, indent: usize, text: impl AsRef<str>) {
        self.lines.push(format!("{}{}", "  ".repeat(indent), text.as_ref()));
    }

    /// An expression as SQL, with aliases resolved.
    fn sql(&mut self, e: &Expr) -> String {
        let mut e = e.clone();
        let mut r = Rewriter { scopes: &self.scopes, frames: &mut self.frames, depth: 0 };
        let _ = VisitMut::visit(&mut e, &mut r);
        e.to_string()
    }

    fn subquery<'a>(&mut self, role: Role, query: &'a Query, pending: &mut Vec<Pending<'a>>) -> usize {
        self.subqueries += 1;
        pending.push(Pending { number: self.subqueries, role, query });
        self.subqueries
    }

    /// The blocks of the subqueries the line(s) above mention.
    fn blocks(&mut self, pending: Vec<Pending<'_>>, indent: usize) {
        for p in pending {
            let purpose = match &p.role {
                Role::In(x) => format!("the values {x} is checked against"),
                Role::Single => "a single value".into(),
                Role::Exists => "checked for whether it returns any row".into(),
                Role::Compared(x) => format!("the values {x} is compared with"),
                Role::Derived(Some(alias), false) => format!("the rows read as {alias}"),
                Role::Derived(None, false) => "rows read as a table".into(),
                Role::Derived(Some(alias), true) => {
                    format!("the rows read as {alias}, evaluated for each row before it (LATERAL)")
                }
                Role::Derived(None, true) => "rows read as a table, evaluated for each row before it (LATERAL)".into(),
            };
            self.push(indent + 1, format!("Subquery {}, {purpose}:", p.number));
            let at = self.lines.len();
            self.frames.push(Frame { base: self.scopes.len(), outer: Vec::new() });
            self.query(p.query, indent + 2);
            let outer = self.frames.pop().map(|f| f.outer).unwrap_or_default();
            if !outer.is_empty() {
                let names = outer.join(", ");
                let line = format!(
                    "{}Uses {names} from the outer query, so it is evaluated for each of its rows.",
                    "  ".repeat(indent + 2)
                );
                self.lines.insert(at, line);
            }
        }
    }

    fn query(&mut self, q: &Query, indent: usize) {
        let ctes = self.ctes.len();
        if let Some(with) = &q.with {
            for cte in &with.cte_tables {
                let key = norm(&cte.alias.name);
                let recursive = if with.recursive { " (WITH RECURSIVE: it may refer to itself)" } else { "" };
                self.push(indent, format!("Defines {}{recursive} as:", cte.alias));
                if with.recursive {
                    self.ctes.push(key.clone());
                }
                self.query(&cte.query, indent + 1);
                if !with.recursive {
                    self.ctes.push(key);
                }
            }
        }
        match q.body.as_ref() {
            SetExpr::Select(s) => self.select(s, Some(q), indent),
            body => {
                self.set_expr(body, indent);
                let combined = matches!(body, SetExpr::SetOperation { .. });
                self.scopes.push(Scope::default());
                self.tail(q, combined, indent);
                self.scopes.pop();
            }
        }
        self.ctes.truncate(ctes);
    }

    fn set_expr(&mut self, body: &SetExpr, indent: usize) {
        match body {
            SetExpr::Select(s) => self.select(s, None, indent),
            SetExpr::Query(q) => self.query(q, indent),
            SetExpr::SetOperation { op, set_quantifier, left, right } => {
                let how = match (op, set_quantifier) {
                    (SetOperator::Union, SetQuantifier::All) => {
                        "every row of both, duplicates kept (UNION ALL)".to_string()
                    }
                    (SetOperator::Union, SetQuantifier::None | SetQuantifier::Distinct) => {
                        "every row of either, duplicates removed (UNION)".to_string()
                    }
                    (SetOperator::Intersect, SetQuantifier::None | SetQuantifier::Distinct) => {
                        "only rows that both return, duplicates removed (INTERSECT)".to_string()
                    }
                    (SetOperator::Intersect, SetQuantifier::All) => {
                        "rows that both return, each as many times as it occurs in both (INTERSECT ALL)".to_string()
                    }
                    (SetOperator::Except | SetOperator::Minus, SetQuantifier::None | SetQuantifier::Distinct) => {
                        "rows the first returns that the second does not, duplicates removed (EXCEPT)".to_string()
                    }
                    (SetOperator::Except | SetOperator::Minus, SetQuantifier::All) => {
                        "rows of the first, each occurrence in the second removing one (EXCEPT ALL)".to_string()
                    }
                    (op, q) => format!("{op} {q}"),
                };
                self.push(indent, format!("Combines two queries: {how}."));
                self.push(indent + 1, "First query:");
                self.set_expr(left, indent + 2);
                self.push(indent + 1, "Second query:");
                self.set_expr(right, indent + 2);
            }
            SetExpr::Values(values) => {
                let mut rows = Vec::new();
                for row in &values.rows {
                    let cells: Vec<String> = row.iter().map(|e| self.sql(e)).collect();
                    rows.push(format!("({})", cells.join(", ")));
                }
                self.push(indent, format!("Returns these rows: {}.", rows.join(", ")));
            }
            SetExpr::Table(t) => {
                let name = [t.schema_name.as_deref(), t.table_name.as_deref()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(".");
                self.push(indent, format!("Reads: {name}."));
                self.push(indent, "Returns: every column.");
            }
            other => self.push(indent, format!("Runs: {other}.")),
        }
    }

    /// Adds the FROM items of one table factor; returns how the Reads line and the Joins lines name it.
    fn factor<'a>(
        &mut self,
        t: &'a TableFactor,
        items: &mut Vec<Item>,
        pending: &mut Vec<Pending<'a>>,
    ) -> (String, Option<usize>) {
        let alias_key = |a: &Option<TableAlias>| a.as_ref().map(|a| norm(&a.name));
        let alias_label = |a: &Option<TableAlias>| a.as_ref().map(|a| a.name.to_string());
        match t {
            TableFactor::Table {
                name,
                alias,
                args: None,
                with_hints,
                version: None,
                with_ordinality: false,
                partitions,
                json_path: None,
                sample: None,
                index_hints,
            } if with_hints.is_empty() && partitions.is_empty() && index_hints.is_empty() => {
                let idents: Option<Vec<Ident>> = name.0.iter().map(|p| p.as_ident().cloned()).collect();
                let written = name.to_string();
                let Some(idents) = idents.filter(|i| !i.is_empty()) else {
                    items.push(Item {
                        key: alias_key(alias),
                        table: None,
                        label: alias_label(alias).unwrap_or(written),
                    });
                    return (t.to_string(), Some(items.len() - 1));
                };
                let key = idents.last().map(norm).unwrap_or_default();
                let cte = idents.len() == 1 && self.ctes.contains(&key);
                let mut notes = Vec::new();
                if let Some(a) = alias {
                    if norm(&a.name) != key || !a.columns.is_empty() {
                        notes.push(format!("as {a}"));
                    }
                }
                if cte {
                    notes.push("defined above".to_string());
                }
                let read = if notes.is_empty() { written.clone() } else { format!("{written} ({})", notes.join(", ")) };
                let renames = alias.as_ref().is_some_and(|a| !a.columns.is_empty());
                items.push(Item {
                    key: Some(alias_key(alias).unwrap_or_else(|| key.clone())),
                    table: Some(TableRef { idents, key, renames }),
                    label: alias_label(alias).unwrap_or(written),
                });
                (read, Some(items.len() - 1))
            }
            TableFactor::Derived { lateral, subquery, alias } => {
                let n = self.subquery(Role::Derived(alias_label(alias), *lateral), subquery, pending);
                let label = alias_label(alias).unwrap_or_else(|| format!("subquery {n}"));
                let read = match alias {
                    Some(a) => format!("subquery {n} (as {a})"),
                    None => format!("subquery {n}"),
                };
                items.push(Item { key: alias_key(alias), table: None, label });
                (read, Some(items.len() - 1))
            }
            TableFactor::NestedJoin { table_with_joins, alias: None } => {
                // Shown as written, subqueries included: its items only serve to resolve qualifiers.
                let numbered = self.subqueries;
                let mut inner = Vec::new();
                self.factor(&table_with_joins.relation, items, &mut inner);
                for j in &table_with_joins.joins {
                    self.factor(&j.relation, items, &mut inner);
                }
                self.subqueries = numbered;
                (t.to_string(), None)
            }
            other => {
                let alias = match other {
                    TableFactor::Table { alias, .. }
                    | TableFactor::Function { alias, .. }
                    | TableFactor::TableFunction { alias, .. }
                    | TableFactor::UNNEST { alias, .. }
                    | TableFactor::NestedJoin { alias, .. } => alias.clone(),
                    _ => None,
                };
                items.push(Item { key: alias_key(&alias), table: None, label: other.to_string() });
                (other.to_string(), Some(items.len() - 1))
            }
        }
    }

    fn select<'a>(&mut self, s: &'a Select, tail: Option<&'a Query>, indent: usize) {
        let mut items = Vec::new();
        let mut reads = Vec::new();
        let mut derived = Vec::new();
        let mut relations = Vec::new();
        for twj in &s.from {
            let mut group = Vec::new();
            for (i, factor) in std::iter::once(&twj.relation).chain(twj.joins.iter().map(|j| &j.relation)).enumerate() {
                let (read, index) = self.factor(factor, &mut items, &mut derived);
                group.push((i, read.clone(), index));
                reads.push(read);
            }
            relations.push(group);
        }
        if !reads.is_empty() {
            self.push(indent, format!("Reads: {}.", reads.join(", ")));
        }
        self.blocks(derived, indent);
        self.scopes.push(Scope::new(items, s));
        let level = self.scopes.len() - 1;
        let name = |ex: &Self, read: &str, index: Option<usize>| match index {
            Some(i) => shown(&ex.scopes, level, i),
            None => read.to_string(),
        };

        let mut groups: Vec<Vec<String>> = Vec::new();
        for (twj, group) in s.from.iter().zip(&relations) {
            let mut so_far: Vec<String> = Vec::new();
            for (i, read, index) in group {
                let right = name(self, read, *index);
                if let Some(join) = i.checked_sub(1).and_then(|j| twj.joins.get(j)) {
                    let mut pending = Vec::new();
                    let line = self
                        .join(&so_far, &right, &join.join_operator, &mut pending)
                        .unwrap_or_else(|| format!("Joins: {join}."));
                    self.push(indent, line);
                    self.blocks(pending, indent);
                }
                so_far.push(right);
            }
            groups.push(so_far);
        }
        for (g, twj) in s.from.iter().enumerate().skip(1) {
            let left = self.left(&groups[..g].concat());
            let right = match groups[g].as_slice() {
                [one] => one.clone(),
                many => format!("{} (joined above)", many.join(" and ")),
            };
            let line = if lateral(&twj.relation) {
                format!("Joins: {left} to {right}, pairing each row with the rows {right} gives for it (a LATERAL item after a comma in FROM).")
            } else {
                format!("Joins: {left} to {right}, pairing every row with every row (a cross join, written as a comma in FROM).")
            };
            self.push(indent, line);
        }

        if let Some(w) = &s.selection {
            self.conditions("Keeps rows where", w, indent);
        }

        match &s.group_by {
            GroupByExpr::Expressions(exprs, modifiers) if !exprs.is_empty() || !modifiers.is_empty() => {
                let mut keys: Vec<String> = exprs
                    .iter()
                    .map(|e| match integer(e) {
                        Some(n) => format!("result column {n}"),
                        None => self.sql(e),
                    })
                    .collect();
                keys.extend(modifiers.iter().map(|m| m.to_string()));
                self.push(indent, format!("Groups by: {} — one result row per group.", keys.join(", ")));
            }
            GroupByExpr::All(modifiers) => {
                let extra: Vec<String> = modifiers.iter().map(|m| m.to_string()).collect();
                let extra = if extra.is_empty() { String::new() } else { format!(" {}", extra.join(" ")) };
                self.push(
                    indent,
                    format!("Groups by: every returned column that is not an aggregate (GROUP BY ALL{extra}) — one result row per group."),
                );
            }
            GroupByExpr::Expressions(..) => {}
        }
        let grouped = !matches!(&s.group_by, GroupByExpr::Expressions(e, m) if e.is_empty() && m.is_empty());
        let per_group = std::mem::replace(&mut self.per_group, grouped);

        if let Some(h) = &s.having {
            let label = if grouped { "Keeps groups where" } else { "Keeps the result (all rows as one group) only if" };
            self.conditions(label, h, indent);
        }

        let mut pending = Vec::new();
        let mut returned = Vec::new();
        let mut one_row = !grouped && s.having.is_none();
        let mut aggregated = false;
        for item in &s.projection {
            returned.push(match item {
                SelectItem::UnnamedExpr(e) => {
                    aggregated |= aggregates(e);
                    self.operand(e, &mut pending)
                }
                SelectItem::ExprWithAlias { expr, alias } => {
                    aggregated |= aggregates(expr);
                    format!("{} as {alias}", self.operand(expr, &mut pending))
                }
                SelectItem::Wildcard(options) if options.to_string().is_empty() => "every column (*)".into(),
                SelectItem::QualifiedWildcard(SelectItemQualifiedWildcardKind::ObjectName(n), options)
                    if options.to_string().is_empty() =>
                {
                    match n.0.as_slice() {
                        [part] => match part.as_ident().and_then(|i| lookup(&self.scopes, &norm(i))) {
                            Some((l, i)) => format!("every column of {} ({n}.*)", shown(&self.scopes, l, i)),
                            None => format!("every column of {n} ({n}.*)"),
                        },
                        _ => format!("every column of {n} ({n}.*)"),
                    }
                }
                other => other.to_string(),
            });
        }
        one_row &= aggregated;
        let head = if one_row { "Returns one row" } else { "Returns" };
        let list = if returned.is_empty() { "no columns".to_string() } else { returned.join(", ") };
        self.push(indent, format!("{head}: {list}."));
        self.blocks(pending, indent);

        match &s.distinct {
            Some(Distinct::Distinct) => self.push(indent, "Removes duplicate rows."),
            Some(Distinct::On(exprs)) => {
                let keys: Vec<String> = exprs.iter().map(|e| self.sql(e)).collect();
                let which = if tail.is_some_and(|q| q.order_by.is_some()) {
                    "the first in the order below"
                } else {
                    "any one of them, as there is no ORDER BY"
                };
                self.push(
                    indent,
                    format!("Keeps one row for each distinct {}: {which} (DISTINCT ON).", keys.join(", ")),
                );
            }
            None => {}
        }

        let mut also: Vec<String> = Vec::new();
        if !s.named_window.is_empty() {
            let windows: Vec<String> = s.named_window.iter().map(|w| w.to_string()).collect();
            self.push(indent, format!("Defines windows: {}.", windows.join(", ")));
        }
        if let Some(top) = &s.top {
            also.push(top.to_string());
        }
        if let Some(q) = &s.qualify {
            also.push(format!("QUALIFY {q}"));
        }
        if let Some(p) = &s.prewhere {
            also.push(format!("PREWHERE {p}"));
        }
        if let Some(c) = &s.connect_by {
            also.push(c.to_string());
        }
        if s.exclude.is_some()
            || !s.lateral_views.is_empty()
            || !s.cluster_by.is_empty()
            || !s.distribute_by.is_empty()
            || !s.sort_by.is_empty()
            || s.value_table_mode.is_some()
        {
            also.push(s.to_string());
        }
        for a in also {
            self.push(indent, format!("Also, as written (not explained): {a}."));
        }

        if let Some(q) = tail {
            self.tail(q, false, indent);
        }
        self.per_group = per_group;
        self.scopes.pop();
    }

    fn left(&self, so_far: &[String]) -> String {
        match so_far {
            [one] => one.clone(),
            many => format!("the rows so far ({})", many.join(", ")),
        }
    }

    fn join<'a>(
        &mut self,
        so_far: &[String],
        right: &str,
        op: &'a JoinOperator,
        pending: &mut Vec<Pending<'a>>,
    ) -> Option<String> {
        let left = self.left(so_far);
        let left_short = if so_far.len() == 1 { left.clone() } else { "the rows so far".to_string() };
        let (kind, what, constraint) = match op {
            JoinOperator::Join(c) | JoinOperator::Inner(c) => {
                ("inner join", "only rows with a match on both sides".to_string(), c)
            }
            JoinOperator::Left(c) | JoinOperator::LeftOuter(c) => (
                "left join",
                format!("every row of {left_short} is kept, with NULLs for {right} where nothing matches"),
                c,
            ),
            JoinOperator::Right(c) | JoinOperator::RightOuter(c) => (
                "right join",
                format!("every row of {right} is kept, with NULLs for {left_short} where nothing matches"),
                c,
            ),
            JoinOperator::FullOuter(c) => {
                ("full join", "every row of both sides is kept, with NULLs where nothing matches".to_string(), c)
            }
            JoinOperator::CrossJoin(JoinConstraint::None) => {
                return Some(format!("Joins: {left} to {right}, pairing every row with every row (cross join)."));
            }
            _ => return None,
        };
        if matches!(constraint, JoinConstraint::None) {
            return (kind == "inner join").then(|| {
                format!("Joins: {left} to {right} with no join condition, pairing every row with every row.")
            });
        }
        let what = if kind == "inner join" && std::mem::replace(&mut self.inner_said, true) {
            String::new()
        } else {
            format!(": {what}")
        };
        Some(match constraint {
            JoinConstraint::On(e) => {
                let cond = self.condition(e, pending);
                format!("Joins: {left} to {right} where {cond} ({kind}{what}).")
            }
            JoinConstraint::Using(columns) => {
                let cols: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
                format!(
                    "Joins: {left} to {right} where both have the same {}, kept once in the result ({kind} USING{what}).",
                    cols.join(" and ")
                )
            }
            JoinConstraint::Natural => format!(
                "Joins: {left} to {right} where every column name they share has equal values, kept once in the result (natural {kind}{what})."
            ),
            JoinConstraint::None => return None,
        })
    }

    /// A WHERE or HAVING clause: one line per AND-ed condition, then the blocks of their subqueries.
    fn conditions(&mut self, label: &str, e: &Expr, indent: usize) {
        let mut pending = Vec::new();
        for (i, c) in conjuncts(e).into_iter().enumerate() {
            let text = self.condition(c, &mut pending);
            if i == 0 {
                self.push(indent, format!("{label}: {text}."));
            } else {
                self.push(indent + 1, format!("and: {text}."));
            }
        }
        self.blocks(pending, indent);
    }

    /// A boolean condition in words where its form is known, else as SQL.
    fn condition<'a>(&mut self, e: &'a Expr, pending: &mut Vec<Pending<'a>>) -> String {
        match e {
            Expr::Nested(inner) => format!("({})", self.condition(inner, pending)),
            Expr::BinaryOp { left, op: op @ (BinaryOperator::And | BinaryOperator::Or), right } => {
                let word = if matches!(op, BinaryOperator::And) { "and" } else { "or" };
                let l = self.logic_operand(left, op, pending);
                let r = self.logic_operand(right, op, pending);
                format!("{l} {word} {r}")
            }
            Expr::UnaryOp { op: UnaryOperator::Not, expr } => match expr.as_ref() {
                Expr::Nested(_) => format!("not {}", self.condition(expr, pending)),
                inner => format!("not ({})", self.condition(inner, pending)),
            },
            Expr::BinaryOp { left, op, right } if comparison(op) => {
                let l = self.operand(left, pending);
                let r = self.operand(right, pending);
                format!("{l} {op} {r}")
            }
            Expr::InSubquery { expr, subquery, negated } => {
                let x = self.operand(expr, pending);
                let n = self.subquery(Role::In(x.clone()), subquery, pending);
                if *negated {
                    format!("{x} is not among the values of subquery {n} (never true if subquery {n} returns a NULL)")
                } else {
                    format!("{x} is among the values of subquery {n}")
                }
            }
            Expr::InList { expr, list, negated } => {
                let x = self.operand(expr, pending);
                let values: Vec<String> = list.iter().map(|v| self.sql(v)).collect();
                let not = if *negated { "not " } else { "" };
                format!("{x} is {not}one of ({})", values.join(", "))
            }
            Expr::Between { expr, negated, low, high } => {
                let x = self.operand(expr, pending);
                let lo = self.operand(low, pending);
                let hi = self.operand(high, pending);
                if *negated {
                    format!("{x} is below {lo} or above {hi}")
                } else {
                    format!("{x} is between {lo} and {hi} (both included)")
                }
            }
            Expr::Like { negated, any: false, expr, pattern, escape_char: None }
            | Expr::ILike { negated, any: false, expr, pattern, escape_char: None } => {
                let x = self.operand(expr, pending);
                let p = self.sql(pattern);
                let verb = if *negated { "does not match" } else { "matches" };
                let case = if matches!(e, Expr::ILike { .. }) { ", ignoring case" } else { "" };
                format!("{x} {verb} the pattern {p}{case}{}", wildcards(pattern))
            }
            Expr::IsNull(x) => format!("{} is NULL", self.operand(x, pending)),
            Expr::IsNotNull(x) => format!("{} is not NULL", self.operand(x, pending)),
            Expr::Exists { subquery, negated } => {
                let n = self.subquery(Role::Exists, subquery, pending);
                if *negated {
                    format!("subquery {n} returns no row")
                } else {
                    format!("subquery {n} returns at least one row")
                }
            }
            Expr::AnyOp { left, compare_op, right, .. } if comparison(compare_op) => match unnest(right) {
                Expr::Subquery(q) => {
                    let x = self.operand(left, pending);
                    let n = self.subquery(Role::Compared(x.clone()), q, pending);
                    format!("{x} {compare_op} at least one value of subquery {n}")
                }
                _ => self.sql(e),
            },
            Expr::AllOp { left, compare_op, right } if comparison(compare_op) => match unnest(right) {
                Expr::Subquery(q) => {
                    let x = self.operand(left, pending);
                    let n = self.subquery(Role::Compared(x.clone()), q, pending);
                    format!("{x} {compare_op} every value of subquery {n}")
                }
                _ => self.sql(e),
            },
            other => self.operand(other, pending),
        }
    }

    /// One side of AND/OR, in parentheses when it is the other of the two (so precedence is never left to guess).
    fn logic_operand<'a>(&mut self, e: &'a Expr, op: &BinaryOperator, pending: &mut Vec<Pending<'a>>) -> String {
        let text = self.condition(e, pending);
        match e {
            Expr::BinaryOp { op: inner @ (BinaryOperator::And | BinaryOperator::Or), .. } if inner != op => {
                format!("({text})")
            }
            _ => text,
        }
    }

    /// A value: an aggregate in words with its SQL, a scalar subquery by its number, anything else as SQL.
    fn operand<'a>(&mut self, e: &'a Expr, pending: &mut Vec<Pending<'a>>) -> String {
        match e {
            Expr::Subquery(q) => {
                let n = self.subquery(Role::Single, q, pending);
                format!("the value of subquery {n}")
            }
            Expr::Function(f) => match self.aggregate(f) {
                Some(words) => format!("{words} ({})", self.sql(e)),
                None => self.sql(e),
            },
            other => self.sql(other),
        }
    }

    fn aggregate(&mut self, f: &Function) -> Option<String> {
        let name = function_name(f)?;
        if f.filter.is_some() || f.over.is_some() || f.null_treatment.is_some() || !f.within_group.is_empty() {
            return None;
        }
        if !matches!(f.parameters, FunctionArguments::None) {
            return None;
        }
        let FunctionArguments::List(list) = &f.args else { return None };
        let [FunctionArg::Unnamed(arg)] = list.args.as_slice() else { return None };
        if !list.clauses.is_empty() {
            return None;
        }
        let distinct = matches!(list.duplicate_treatment, Some(DuplicateTreatment::Distinct));
        let group = if self.per_group { " in the group" } else { "" };
        let x = match arg {
            FunctionArgExpr::Wildcard if name == "count" && !distinct => {
                return Some(format!("the number of rows{group}"))
            }
            FunctionArgExpr::Expr(x) => self.sql(x),
            _ => return None,
        };
        let values = if distinct { format!("the distinct values of {x}") } else { x.clone() };
        let words = match name.as_str() {
            "count" if distinct => format!("the number of distinct non-null values of {x}"),
            "count" => format!("the number of non-null values of {x}"),
            "avg" => format!("the average of {values}"),
            "sum" => format!("the sum of {values}"),
            "min" => format!("the smallest value of {x}"),
            "max" => format!("the largest value of {x}"),
            _ => return None,
        };
        Some(format!("{words}{group}"))
    }

    /// ORDER BY, OFFSET, LIMIT and FETCH of a query.
    fn tail(&mut self, q: &Query, combined: bool, indent: usize) {
        let ordered = q.order_by.is_some();
        if let Some(order_by) = &q.order_by {
            let mut pending = Vec::new();
            let keys = match &order_by.kind {
                OrderByKind::All(options) => {
                    format!("every returned column{}", self.direction(options.asc, options.nulls_first))
                }
                OrderByKind::Expressions(exprs) => {
                    let parts: Vec<String> = exprs.iter().map(|o| self.order_key(o, &mut pending)).collect();
                    parts.join("; then ")
                }
            };
            let label = if combined { "Orders the combined rows by" } else { "Orders by" };
            self.push(indent, format!("{label}: {keys}."));
            self.blocks(pending, indent);
        }
        let (limit, offset) = match &q.limit_clause {
            Some(LimitClause::LimitOffset { limit, offset, limit_by }) => {
                if !limit_by.is_empty() {
                    let by: Vec<String> = limit_by.iter().map(|e| e.to_string()).collect();
                    self.push(indent, format!("Also, as written (not explained): LIMIT BY {}.", by.join(", ")));
                }
                (limit.as_ref(), offset.as_ref().map(|o| &o.value))
            }
            Some(LimitClause::OffsetCommaLimit { offset, limit }) => (Some(limit), Some(offset)),
            None => (None, None),
        };
        let unordered = " (there is no ORDER BY, so which rows is not defined)";
        if let Some(o) = offset {
            let count = match integer(o) {
                Some(n) => rows(n),
                None => format!("{} rows", self.sql(o)),
            };
            let note = if ordered || limit.is_some() { "" } else { unordered };
            let first = if ordered { "the first " } else { "" };
            self.push(indent, format!("Skips: {first}{count}{note}."));
        }
        if let Some(l) = limit {
            let count = match integer(l) {
                Some(1) => "row".to_string(),
                Some(n) => rows(n),
                None => format!("{} rows", self.sql(l)),
            };
            let text = match (ordered, offset.is_some()) {
                (true, false) => format!("the first {count}"),
                (true, true) => format!("the next {count}"),
                (false, _) => format!("{}{unordered}", if count == "row" { "1 row".to_string() } else { count }),
            };
            self.push(indent, format!("Limits to: {text}."));
        }
        if let Some(fetch) = &q.fetch {
            let n = fetch.quantity.as_ref().map(|e| self.sql(e)).unwrap_or_else(|| "1".into());
            let unit = if fetch.percent { format!("{n} percent of the rows") } else { format!("{n} rows") };
            let ties = if fetch.with_ties { ", plus any rows tied with the last of them in the order" } else { "" };
            let text = if ordered { format!("the first {unit}{ties}") } else { format!("{unit}{unordered}") };
            self.push(indent, format!("Limits to: {text}."));
        }
        let mut also: Vec<String> = Vec::new();
        if let Some(f) = &q.for_clause {
            also.push(f.to_string());
        }
        if let Some(settings) = &q.settings {
            let s: Vec<String> = settings.iter().map(|s| format!("{} = {}", s.key, s.value)).collect();
            also.push(format!("SETTINGS {}", s.join(", ")));
        }
        if let Some(f) = &q.format_clause {
            also.push(f.to_string());
        }
        also.extend(q.pipe_operators.iter().map(|p| format!("|> {p}")));
        for a in also {
            self.push(indent, format!("Also, as written (not explained): {a}."));
        }
    }

    fn order_key<'a>(&mut self, o: &'a OrderByExpr, pending: &mut Vec<Pending<'a>>) -> String {
        let key = match integer(&o.expr) {
            Some(n) => format!("result column {n}"),
            None => self.operand(&o.expr, pending),
        };
        let fill = o.with_fill.as_ref().map(|w| format!(" ({w})")).unwrap_or_default();
        format!("{key}{}{fill}", self.direction(o.options.asc, o.options.nulls_first))
    }

    fn direction(&self, asc: Option<bool>, nulls_first: Option<bool>) -> String {
        let dir = if asc == Some(false) { ", largest first" } else { ", smallest first" };
        let nulls = match nulls_first {
            Some(true) => ", NULLs first",
            Some(false) => ", NULLs last",
            None => "",
        };
        format!("{dir}{nulls}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(sql: &str) -> String {
        explain(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    fn has(text: &str, line: &str) {
        assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
    }

    #[test]
    fn aliases_resolve_to_table_names_in_reading_order() {
        let text =
            ex("SELECT T2.name, count(*) FROM concert AS T1 JOIN stadium AS T2 ON T1.stadium_id = T2.stadium_id \
             WHERE T1.year >= 2014 GROUP BY T2.stadium_id ORDER BY count(*) DESC LIMIT 3");
        assert_eq!(
            text,
            "Reads: concert (as T1), stadium (as T2).\n\
             Joins: concert to stadium where concert.stadium_id = stadium.stadium_id (inner join: only rows with a match on both sides).\n\
             Keeps rows where: concert.year >= 2014.\n\
             Groups by: stadium.stadium_id — one result row per group.\n\
             Returns: stadium.name, the number of rows in the group (count(*)).\n\
             Orders by: the number of rows in the group (count(*)), largest first.\n\
             Limits to: the first 3 rows."
        );
    }

    #[test]
    fn a_self_join_keeps_its_aliases() {
        let text = ex("SELECT a.name FROM emp AS a JOIN emp AS b ON a.boss = b.id WHERE b.name = 'Ann'");
        has(&text, "Reads: emp (as a), emp (as b).");
        has(&text, "Joins: a to b where a.boss = b.id (inner join: only rows with a match on both sides).");
        has(&text, "Returns: a.name.");
    }

    #[test]
    fn an_alias_that_renames_columns_is_kept() {
        let text = ex("SELECT t.x FROM tab AS t(x, y)");
        has(&text, "Reads: tab (as t (x, y)).");
        has(&text, "Returns: t.x.");
    }

    #[test]
    fn join_kinds() {
        let left = ex("SELECT a.n FROM emp a LEFT JOIN dept d ON a.d = d.id");
        has(&left, "Joins: emp to dept where emp.d = dept.id (left join: every row of emp is kept, with NULLs for dept where nothing matches).");
        let right = ex("SELECT * FROM emp e RIGHT OUTER JOIN dept d ON e.d = d.id");
        has(&right, "Joins: emp to dept where emp.d = dept.id (right join: every row of dept is kept, with NULLs for emp where nothing matches).");
        let full = ex("SELECT * FROM emp e FULL JOIN dept d ON e.d = d.id JOIN loc l ON l.id = d.loc");
        has(&full, "Joins: emp to dept where emp.d = dept.id (full join: every row of both sides is kept, with NULLs where nothing matches).");
        has(&full, "Joins: the rows so far (emp, dept) to loc where loc.id = dept.loc (inner join: only rows with a match on both sides).");
        let cross = ex("SELECT * FROM emp CROSS JOIN dept");
        has(&cross, "Joins: emp to dept, pairing every row with every row (cross join).");
        let comma = ex("SELECT * FROM emp, dept WHERE emp.d = dept.id");
        has(&comma, "Joins: emp to dept, pairing every row with every row (a cross join, written as a comma in FROM).");
        let using = ex("SELECT * FROM emp JOIN dept USING (d, site)");
        has(&using, "Joins: emp to dept where both have the same d and site, kept once in the result (inner join USING: only rows with a match on both sides).");
        let natural = ex("SELECT * FROM emp NATURAL LEFT JOIN dept");
        has(&natural, "Joins: emp to dept where every column name they share has equal values, kept once in the result (natural left join: every row of emp is kept, with NULLs for dept where nothing matches).");
    }

    #[test]
    fn a_comma_binds_looser_than_join() {
        let text = ex("SELECT * FROM a, b RIGHT JOIN c ON b.id = c.id");
        let joins: Vec<&str> = text.lines().filter(|l| l.starts_with("Joins:")).collect();
        assert_eq!(
            joins,
            [
                "Joins: b to c where b.id = c.id (right join: every row of c is kept, with NULLs for b where nothing matches).",
                "Joins: a to b and c (joined above), pairing every row with every row (a cross join, written as a comma in FROM).",
            ]
        );
    }

    #[test]
    fn aggregates_in_words_with_their_sql() {
        let text = ex("SELECT count(*), count(x), count(DISTINCT x), avg(y), sum(DISTINCT y), min(z), max(z), string_agg(n, ',') FROM t");
        has(
            &text,
            "Returns one row: the number of rows (count(*)), the number of non-null values of x (count(x)), \
            the number of distinct non-null values of x (count(DISTINCT x)), the average of y (avg(y)), \
            the sum of the distinct values of y (sum(DISTINCT y)), the smallest value of z (min(z)), \
            the largest value of z (max(z)), string_agg(n, ',').",
        );
        let window = ex("SELECT sum(x) OVER (PARTITION BY g) FROM t");
        has(&window, "Returns: sum(x) OVER (PARTITION BY g).");
    }

    #[test]
    fn having() {
        let text = ex("SELECT d FROM t GROUP BY d HAVING avg(s) > 10 AND count(*) BETWEEN 1 AND 2");
        has(&text, "Groups by: d — one result row per group.");
        has(&text, "Keeps groups where: the average of s in the group (avg(s)) > 10.");
        has(&text, "  and: the number of rows in the group (count(*)) is between 1 and 2 (both included).");
        let ungrouped = ex("SELECT count(*) FROM t HAVING count(*) > 1");
        has(&ungrouped, "Keeps the result (all rows as one group) only if: the number of rows (count(*)) > 1.");
        has(&ungrouped, "Returns: the number of rows (count(*)).");
    }

    #[test]
    fn distinct() {
        let text = ex("SELECT DISTINCT country FROM singer WHERE age > 20");
        assert_eq!(text, "Reads: singer.\nKeeps rows where: age > 20.\nReturns: country.\nRemoves duplicate rows.");
        let on = ex("SELECT DISTINCT ON (d) d, n FROM t ORDER BY d, s DESC");
        has(&on, "Keeps one row for each distinct d: the first in the order below (DISTINCT ON).");
    }

    #[test]
    fn order_limit_offset() {
        let text = ex("SELECT name FROM emp ORDER BY salary DESC, name NULLS FIRST LIMIT 10 OFFSET 20");
        has(&text, "Orders by: salary, largest first; then name, smallest first, NULLs first.");
        has(&text, "Skips: the first 20 rows.");
        has(&text, "Limits to: the next 10 rows.");
        has(&ex("SELECT name FROM emp ORDER BY 1 LIMIT 1"), "Limits to: the first row.");
        has(&ex("SELECT name FROM emp ORDER BY 1"), "Orders by: result column 1, smallest first.");
        has(
            &ex("SELECT name FROM emp LIMIT 5"),
            "Limits to: 5 rows (there is no ORDER BY, so which rows is not defined).",
        );
    }

    #[test]
    fn conditions() {
        let text = ex("SELECT n FROM t WHERE (a = 1 OR b = 2) AND c = 3 OR d = 4");
        has(&text, "Keeps rows where: ((a = 1 or b = 2) and c = 3) or d = 4.");
        let text = ex("SELECT n FROM t WHERE n LIKE 'x%' AND n NOT ILIKE 'a_' AND x NOT BETWEEN 1 AND 5 AND y IN (1, 2) AND z IS NULL");
        has(&text, "Keeps rows where: n matches the pattern 'x%' (% stands for any text).");
        has(&text, "  and: n does not match the pattern 'a_', ignoring case (_ stands for any one character).");
        has(&text, "  and: x is below 1 or above 5.");
        has(&text, "  and: y is one of (1, 2).");
        has(&text, "  and: z is NULL.");
    }

    #[test]
    fn subqueries_in_where() {
        let text = ex("SELECT name FROM stadium WHERE stadium_id NOT IN (SELECT stadium_id FROM concert)");
        assert_eq!(
            text,
            "Reads: stadium.\n\
             Keeps rows where: stadium_id is not among the values of subquery 1 (never true if subquery 1 returns a NULL).\n\
             \x20 Subquery 1, the values stadium_id is checked against:\n\
             \x20   Reads: concert.\n\
             \x20   Returns: stadium_id.\n\
             Returns: name."
        );
        let scalar = ex("SELECT song_name FROM singer WHERE age > (SELECT avg(age) FROM singer)");
        has(&scalar, "Keeps rows where: age > the value of subquery 1.");
        has(&scalar, "  Subquery 1, a single value:");
        has(&scalar, "    Returns one row: the average of age (avg(age)).");
        let exists = ex("SELECT e.name FROM emp e WHERE EXISTS (SELECT 1 FROM dept d WHERE d.id = e.d)");
        has(&exists, "Keeps rows where: subquery 1 returns at least one row.");
        has(&exists, "  Subquery 1, checked for whether it returns any row:");
        has(&exists, "    Uses emp from the outer query, so it is evaluated for each of its rows.");
        has(&exists, "    Keeps rows where: dept.id = emp.d.");
        let all = ex("SELECT n FROM t WHERE s > ALL (SELECT s FROM u)");
        has(&all, "Keeps rows where: s > every value of subquery 1.");
    }

    #[test]
    fn nested_scopes_never_share_a_name() {
        // The inner T2 is the same table as the outer, unaliased one, which the subquery also refers to.
        let text =
            ex("SELECT x FROM h WHERE id IN (SELECT T2.id FROM f AS T1 JOIN h AS T2 ON T1.s = T2.id WHERE T2.g = h.g)");
        has(&text, "    Keeps rows where: T2.g = h.g.");
        // Without that reference the inner alias can be resolved: inside the subquery, h is the nearest.
        let text = ex("SELECT x FROM h WHERE id IN (SELECT T2.id FROM f AS T1 JOIN h AS T2 ON T1.s = T2.id)");
        has(&text, "    Returns: h.id.");
    }

    #[test]
    fn derived_table() {
        let text = ex("SELECT t.d, t.n FROM (SELECT d, count(*) AS n FROM emp GROUP BY d) AS t WHERE t.n > 3");
        assert_eq!(
            text,
            "Reads: subquery 1 (as t).\n\
             \x20 Subquery 1, the rows read as t:\n\
             \x20   Reads: emp.\n\
             \x20   Groups by: d — one result row per group.\n\
             \x20   Returns: d, the number of rows in the group (count(*)) as n.\n\
             Keeps rows where: t.n > 3.\n\
             Returns: t.d, t.n."
        );
    }

    #[test]
    fn a_parenthesized_join_is_shown_as_written() {
        let text = ex("SELECT c.x FROM (a JOIN (SELECT 1 AS id) AS s ON a.id = s.id) JOIN c ON c.id = s.id \
             WHERE c.x IN (SELECT 2)");
        has(&text, "Reads: (a JOIN (SELECT 1 AS id) AS s ON a.id = s.id), c.");
        has(&text, "Joins: (a JOIN (SELECT 1 AS id) AS s ON a.id = s.id) to c where c.id = s.id (inner join: only rows with a match on both sides).");
        has(&text, "Keeps rows where: c.x is among the values of subquery 1.");
    }

    #[test]
    fn set_operations() {
        let text =
            ex("SELECT country FROM singer WHERE age > 40 EXCEPT SELECT country FROM singer WHERE age < 30 ORDER BY 1");
        assert_eq!(
            text,
            "Combines two queries: rows the first returns that the second does not, duplicates removed (EXCEPT).\n\
             \x20 First query:\n\
             \x20   Reads: singer.\n\
             \x20   Keeps rows where: age > 40.\n\
             \x20   Returns: country.\n\
             \x20 Second query:\n\
             \x20   Reads: singer.\n\
             \x20   Keeps rows where: age < 30.\n\
             \x20   Returns: country.\n\
             Orders the combined rows by: result column 1, smallest first."
        );
        has(
            &ex("SELECT 1 UNION ALL SELECT 2"),
            "Combines two queries: every row of both, duplicates kept (UNION ALL).",
        );
        has(&ex("SELECT 1 UNION SELECT 2"), "Combines two queries: every row of either, duplicates removed (UNION).");
        has(
            &ex("SELECT 1 INTERSECT SELECT 2"),
            "Combines two queries: only rows that both return, duplicates removed (INTERSECT).",
        );
        has(&ex("VALUES (1, 'a'), (2, 'b')"), "Returns these rows: (1, 'a'), (2, 'b').");
    }

    #[test]
    fn with_queries_come_first() {
        let text = ex("WITH big AS (SELECT d FROM emp GROUP BY d HAVING count(*) > 10) \
             SELECT x.name FROM dept x JOIN big b ON b.d = x.id");
        assert_eq!(
            text,
            "Defines big as:\n\
             \x20 Reads: emp.\n\
             \x20 Groups by: d — one result row per group.\n\
             \x20 Keeps groups where: the number of rows in the group (count(*)) > 10.\n\
             \x20 Returns: d.\n\
             Reads: dept (as x), big (as b, defined above).\n\
             Joins: dept to big where big.d = dept.id (inner join: only rows with a match on both sides).\n\
             Returns: dept.name."
        );
    }

    #[test]
    fn refusals() {
        assert!(matches!(explain("INSERT INTO t VALUES (1)"), Err(ExplainError::NotAQuery)));
        assert!(matches!(
            explain("WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x"),
            Err(ExplainError::NotAQuery)
        ));
        assert!(matches!(explain("SELECT * INTO t2 FROM t"), Err(ExplainError::NotAQuery)));
        assert!(matches!(explain("SELECT * FROM t FOR UPDATE"), Err(ExplainError::NotAQuery)));
        assert!(matches!(explain("SELECT 1; SELECT 2"), Err(ExplainError::NotOneStatement(2))));
        assert!(matches!(explain(""), Err(ExplainError::NotOneStatement(0))));
        assert!(matches!(explain("this is not sql"), Err(ExplainError::Parse(_))));
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let start = std::time::Instant::now();
        let sql = format!("SELECT {}1{}", "(".repeat(5000), ")".repeat(5000));
        match explain(&sql) {
            Err(ExplainError::Parse(m)) => assert!(m.contains("nested too deeply"), "{m}"),
            other => panic!("{other:?}"),
        }
        let half_open = format!("SELECT {}", "(".repeat(5000));
        assert!(matches!(explain(&half_open), Err(ExplainError::Parse(_))));
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
        assert!(explain(&format!("SELECT {}1{}", "(".repeat(MAX_NESTING), ")".repeat(MAX_NESTING))).is_ok());
    }
}
