//! Phase 1: SQL text → Spider's clause structure ([`SqlTree`]).

use sqlparser::ast::{
    BinaryOperator, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, JoinConstraint, JoinOperator,
    LimitClause, ObjectName, ObjectNamePart, OrderByKind, Query, Select, SelectItem, SetExpr, SetOperator,
    SetQuantifier, Statement, TableFactor, UnaryOperator, Value,
};
use sqlparser::dialect::SQLiteDialect;
use sqlparser::parser::Parser;
use std::collections::HashMap;

use super::*;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError(msg.into()))
}

/// Names visible in one SELECT: alias → table (or derived-table alias) and the tables in FROM, in order.
#[derive(Default, Clone)]
struct Scope {
    aliases: HashMap<String, String>,
    /// Real tables in FROM order, and derived tables' aliases with their output columns.
    tables: Vec<String>,
    derived: Vec<(String, Vec<String>)>,
}

struct Ctx<'a> {
    schema: &'a Schema,
}

fn ident_parts(name: &ObjectName) -> Vec<String> {
    name.0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(i) => i.value.to_lowercase(),
            ObjectNamePart::Function(f) => f.name.value.to_lowercase(),
        })
        .collect()
}

/// Parse SQL (SQLite or PostgreSQL dialect, one query) into Spider's structure.
pub fn parse(sql: &str, schema: &Schema) -> Result<SqlTree, ParseError> {
    let text = sql.trim().trim_end_matches(';');
    let stmts = Parser::parse_sql(&SQLiteDialect {}, text)
        .or_else(|_| Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, text))
        .map_err(|e| ParseError(format!("syntax: {e}")))?;
    if stmts.len() != 1 {
        return err(format!("{} statements", stmts.len()));
    }
    let Statement::Query(q) = &stmts[0] else {
        return err("not a query");
    };
    Ctx { schema }.query(q)
}

impl Ctx<'_> {
    fn query(&self, q: &Query) -> Result<SqlTree, ParseError> {
        if q.with.is_some() {
            return err("WITH is outside Spider's grammar");
        }
        let mut tree = self.set_expr(&q.body)?;
        // ORDER BY / LIMIT after a set operation belong to its last SELECT (the official parser reads them there).
        if let Some(ob) = &q.order_by {
            let OrderByKind::Expressions(items) = &ob.kind else {
                return err("ORDER BY ALL");
            };
            let scope = self.scope_for(&q.body)?;
            let mut dir = Dir::Asc;
            let mut units = Vec::new();
            for it in items {
                if let Some(asc) = it.options.asc {
                    dir = if asc { Dir::Asc } else { Dir::Desc };
                }
                units.push(self.val_unit(&it.expr, &scope)?);
            }
            last_select(&mut tree).order_by = Some((dir, units));
        }
        if let Some(lc) = &q.limit_clause {
            let limit = match lc {
                LimitClause::LimitOffset { limit: Some(e), .. } => e,
                LimitClause::LimitOffset { limit: None, .. } => return err("OFFSET without LIMIT"),
                LimitClause::OffsetCommaLimit { limit, .. } => limit,
            };
            let n = match limit {
                Expr::Value(v) => match &v.value {
                    Value::Number(n, _) => n.parse::<u64>().map_err(|_| ParseError(format!("LIMIT {n}")))?,
                    _ => return err("LIMIT is not a number"),
                },
                _ => return err("LIMIT is not a number"),
            };
            last_select(&mut tree).limit = Some(n);
        }
        Ok(tree)
    }

    /// The scope ORDER BY resolves against: the last SELECT's FROM.
    fn scope_for(&self, body: &SetExpr) -> Result<Scope, ParseError> {
        match body {
            SetExpr::Select(s) => self.scope(s),
            SetExpr::SetOperation { right, .. } => self.scope_for(right),
            SetExpr::Query(q) => self.scope_for(&q.body),
            _ => err("unsupported query body"),
        }
    }

    fn set_expr(&self, body: &SetExpr) -> Result<SqlTree, ParseError> {
        match body {
            SetExpr::Select(s) => self.select(s),
            SetExpr::Query(q) => self.query(q),
            SetExpr::SetOperation { op, set_quantifier, left, right } => {
                if !matches!(set_quantifier, SetQuantifier::None | SetQuantifier::Distinct | SetQuantifier::All) {
                    return err("unsupported set quantifier");
                }
                let mut l = self.set_expr(left)?;
                let r = Box::new(self.set_expr(right)?);
                // `a UNION b UNION c` nests to the right, as the official parser reads it.
                let slot = last_iuen(&mut l);
                match op {
                    SetOperator::Union => slot.union = Some(r),
                    SetOperator::Intersect => slot.intersect = Some(r),
                    SetOperator::Except | SetOperator::Minus => slot.except = Some(r),
                }
                Ok(l)
            }
            _ => err("unsupported query body"),
        }
    }

    fn scope(&self, s: &Select) -> Result<Scope, ParseError> {
        let mut scope = Scope::default();
        for twj in &s.from {
            self.add_factor(&twj.relation, &mut scope)?;
            for j in &twj.joins {
                self.add_factor(&j.relation, &mut scope)?;
            }
        }
        Ok(scope)
    }

    fn add_factor(&self, f: &TableFactor, scope: &mut Scope) -> Result<(), ParseError> {
        match f {
            TableFactor::Table { name, alias, args: None, .. } => {
                let parts = ident_parts(name);
                let t = parts.last().cloned().unwrap_or_default();
                if !self.schema.has_table(&t) {
                    return err(format!("unknown table {t}"));
                }
                scope.aliases.insert(t.clone(), t.clone());
                if let Some(a) = alias {
                    scope.aliases.insert(a.name.value.to_lowercase(), t.clone());
                }
                scope.tables.push(t);
                Ok(())
            }
            TableFactor::Derived { subquery, alias, .. } => {
                let cols = output_names(subquery);
                let a = alias.as_ref().map(|a| a.name.value.to_lowercase()).unwrap_or_default();
                scope.aliases.insert(a.clone(), format!("#{a}"));
                scope.derived.push((a, cols));
                Ok(())
            }
            TableFactor::NestedJoin { table_with_joins, .. } => {
                self.add_factor(&table_with_joins.relation, scope)?;
                for j in &table_with_joins.joins {
                    self.add_factor(&j.relation, scope)?;
                }
                Ok(())
            }
            _ => err("unsupported FROM item"),
        }
    }

    fn select(&self, s: &Select) -> Result<SqlTree, ParseError> {
        let scope = self.scope(s)?;
        let mut tree = SqlTree::default();
        // FROM: table units and the join conditions.
        let mut on_exprs: Vec<&Expr> = Vec::new();
        for twj in &s.from {
            self.table_unit(&twj.relation, &mut tree.from_tables)?;
            for j in &twj.joins {
                self.table_unit(&j.relation, &mut tree.from_tables)?;
                let c = match &j.join_operator {
                    JoinOperator::Join(c)
                    | JoinOperator::Inner(c)
                    | JoinOperator::Left(c)
                    | JoinOperator::LeftOuter(c)
                    | JoinOperator::Right(c)
                    | JoinOperator::RightOuter(c)
                    | JoinOperator::FullOuter(c)
                    | JoinOperator::CrossJoin(c) => c,
                    _ => return err("unsupported join"),
                };
                match c {
                    JoinConstraint::On(e) => on_exprs.push(e),
                    JoinConstraint::None => {}
                    _ => return err("JOIN USING/NATURAL"),
                }
            }
        }
        for e in on_exprs {
            let c = self.conds(e, &scope)?;
            if !tree.from_conds.units.is_empty() && !c.units.is_empty() {
                tree.from_conds.conj.push(Conj::And);
            }
            tree.from_conds.units.extend(c.units);
            tree.from_conds.conj.extend(c.conj);
        }
        // SELECT list.
        for item in &s.projection {
            let e = match item {
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
                SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => {
                    tree.select.push((Agg::None, ValUnit { op: UnitOp::None, left: all(), right: None }));
                    continue;
                }
            };
            tree.select.push(self.select_unit(e, &scope)?);
        }
        if let Some(w) = &s.selection {
            tree.where_ = self.conds(w, &scope)?;
        }
        match &s.group_by {
            GroupByExpr::Expressions(exprs, mods) if mods.is_empty() => {
                for e in exprs {
                    tree.group_by.push(self.col_unit(e, &scope)?);
                }
            }
            _ => return err("GROUP BY ALL"),
        }
        if let Some(h) = &s.having {
            tree.having = self.conds(h, &scope)?;
        }
        Ok(tree)
    }

    fn table_unit(&self, f: &TableFactor, out: &mut Vec<TableUnit>) -> Result<(), ParseError> {
        match f {
            TableFactor::Table { name, .. } => {
                out.push(TableUnit::Table(format!("__{}__", ident_parts(name).last().cloned().unwrap_or_default())));
                Ok(())
            }
            TableFactor::Derived { subquery, .. } => {
                out.push(TableUnit::Sql(Box::new(self.query(subquery)?)));
                Ok(())
            }
            TableFactor::NestedJoin { table_with_joins, .. } => {
                self.table_unit(&table_with_joins.relation, out)?;
                for j in &table_with_joins.joins {
                    self.table_unit(&j.relation, out)?;
                }
                Ok(())
            }
            _ => err("unsupported FROM item"),
        }
    }

    /// A SELECT item: `agg(val_unit)` or a val_unit.
    fn select_unit(&self, e: &Expr, scope: &Scope) -> Result<(Agg, ValUnit), ParseError> {
        if let Expr::Function(_) = e {
            if let Some((agg, inner, distinct)) = agg_call(e)? {
                let mut vu = match inner {
                    None => ValUnit { op: UnitOp::None, left: all(), right: None },
                    Some(x) => self.val_unit(x, scope)?,
                };
                vu.left.distinct |= distinct;
                return Ok((agg, vu));
            }
        }
        Ok((Agg::None, self.val_unit(strip(e), scope)?))
    }

    fn val_unit(&self, e: &Expr, scope: &Scope) -> Result<ValUnit, ParseError> {
        let e = strip(e);
        if let Expr::BinaryOp { left, op, right } = e {
            let uop = match op {
                BinaryOperator::Minus => Some(UnitOp::Minus),
                BinaryOperator::Plus => Some(UnitOp::Plus),
                BinaryOperator::Multiply => Some(UnitOp::Times),
                BinaryOperator::Divide => Some(UnitOp::Divide),
                _ => None,
            };
            if let Some(uop) = uop {
                return Ok(ValUnit {
                    op: uop,
                    left: self.col_unit(left, scope)?,
                    right: Some(self.col_unit(right, scope)?),
                });
            }
        }
        Ok(ValUnit { op: UnitOp::None, left: self.col_unit(e, scope)?, right: None })
    }

    fn col_unit(&self, e: &Expr, scope: &Scope) -> Result<ColUnit, ParseError> {
        let e = strip(e);
        if let Some((agg, inner, distinct)) = agg_call(e)? {
            let mut c = match inner {
                None => all(),
                Some(x) => self.col_unit(x, scope)?,
            };
            if c.agg != Agg::None {
                return err("nested aggregate");
            }
            c.agg = agg;
            c.distinct |= distinct;
            return Ok(c);
        }
        match e {
            Expr::Identifier(i) => self.column(None, &i.value.to_lowercase(), scope),
            Expr::CompoundIdentifier(parts) => {
                let n = parts.len();
                if n < 2 {
                    return err("empty identifier");
                }
                self.column(Some(&parts[n - 2].value.to_lowercase()), &parts[n - 1].value.to_lowercase(), scope)
            }
            other => err(format!("expression outside Spider's grammar: {other}")),
        }
    }

    fn column(&self, qualifier: Option<&str>, col: &str, scope: &Scope) -> Result<ColUnit, ParseError> {
        let mk = |c: String| Ok(ColUnit { agg: Agg::None, col: c, distinct: false });
        if col == "*" {
            return mk("__all__".into());
        }
        match qualifier {
            Some(q) => {
                let t = scope.aliases.get(q).cloned().unwrap_or_else(|| q.to_string());
                if let Some(d) = t.strip_prefix('#') {
                    return mk(format!("__{d}.{col}__"));
                }
                if self.schema.has_column(&t, col) {
                    mk(format!("__{t}.{col}__"))
                } else {
                    err(format!("unknown column {q}.{col}"))
                }
            }
            None => {
                for t in &scope.tables {
                    if self.schema.has_column(t, col) {
                        return mk(format!("__{t}.{col}__"));
                    }
                }
                for (a, cols) in &scope.derived {
                    if cols.iter().any(|c| c == col) {
                        return mk(format!("__{a}.{col}__"));
                    }
                }
                err(format!("unknown column {col}"))
            }
        }
    }

    /// Conditions: a flat list of condition units with the and/or words between them.
    fn conds(&self, e: &Expr, scope: &Scope) -> Result<Conds, ParseError> {
        let mut out = Conds::default();
        self.conds_into(e, scope, &mut out)?;
        Ok(out)
    }

    fn conds_into(&self, e: &Expr, scope: &Scope, out: &mut Conds) -> Result<(), ParseError> {
        match e {
            Expr::Nested(inner)
                if matches!(**inner, Expr::BinaryOp { op: BinaryOperator::And | BinaryOperator::Or, .. }) =>
            {
                self.conds_into(inner, scope, out)
            }
            Expr::BinaryOp { left, op: op @ (BinaryOperator::And | BinaryOperator::Or), right } => {
                self.conds_into(left, scope, out)?;
                out.conj.push(if *op == BinaryOperator::And { Conj::And } else { Conj::Or });
                self.conds_into(right, scope, out)
            }
            _ => {
                out.units.push(self.cond_unit(e, scope)?);
                Ok(())
            }
        }
    }

    fn value(&self, e: &Expr) -> Result<Val, ParseError> {
        match strip(e) {
            Expr::Subquery(q) => Ok(Val::Sql(Box::new(self.query(q)?))),
            _ => Ok(Val::Masked),
        }
    }

    fn cond_unit(&self, e: &Expr, scope: &Scope) -> Result<CondUnit, ParseError> {
        let unit = |not, op, val_unit, val1, val2| CondUnit { not, op, val_unit, val1, val2 };
        match e {
            Expr::Nested(inner) => self.cond_unit(inner, scope),
            Expr::UnaryOp { op: UnaryOperator::Not, expr } => {
                let mut c = self.cond_unit(expr, scope)?;
                c.not = !c.not;
                Ok(c)
            }
            Expr::BinaryOp { left, op, right } => {
                let wop = match op {
                    BinaryOperator::Eq => WhereOp::Eq,
                    BinaryOperator::Gt => WhereOp::Gt,
                    BinaryOperator::Lt => WhereOp::Lt,
                    BinaryOperator::GtEq => WhereOp::Ge,
                    BinaryOperator::LtEq => WhereOp::Le,
                    BinaryOperator::NotEq => WhereOp::Ne,
                    other => return err(format!("operator {other} in a condition")),
                };
                // A value on the left (`1 = a`) is read with the column first, as the official parser cannot.
                let (l, r) = if is_literal(left) && !is_literal(right) { (right, left) } else { (left, right) };
                Ok(unit(false, wop, self.val_unit(l, scope)?, self.value(r)?, Val::None))
            }
            Expr::Between { expr, negated, low, high } => {
                Ok(unit(*negated, WhereOp::Between, self.val_unit(expr, scope)?, self.value(low)?, self.value(high)?))
            }
            Expr::InSubquery { expr, subquery, negated } => Ok(unit(
                *negated,
                WhereOp::In,
                self.val_unit(expr, scope)?,
                Val::Sql(Box::new(self.query(subquery)?)),
                Val::None,
            )),
            Expr::InList { expr, negated, .. } => {
                Ok(unit(*negated, WhereOp::In, self.val_unit(expr, scope)?, Val::Masked, Val::None))
            }
            Expr::Like { negated, expr, .. } | Expr::ILike { negated, expr, .. } => {
                Ok(unit(*negated, WhereOp::Like, self.val_unit(expr, scope)?, Val::Masked, Val::None))
            }
            Expr::IsNull(x) => Ok(unit(false, WhereOp::Is, self.val_unit(x, scope)?, Val::Masked, Val::None)),
            Expr::IsNotNull(x) => Ok(unit(true, WhereOp::Is, self.val_unit(x, scope)?, Val::Masked, Val::None)),
            Expr::Exists { subquery, negated } => Ok(unit(
                *negated,
                WhereOp::Exists,
                ValUnit { op: UnitOp::None, left: all(), right: None },
                Val::Sql(Box::new(self.query(subquery)?)),
                Val::None,
            )),
            other => err(format!("condition outside Spider's grammar: {other}")),
        }
    }
}

fn all() -> ColUnit {
    ColUnit { agg: Agg::None, col: "__all__".into(), distinct: false }
}

fn strip(e: &Expr) -> &Expr {
    match e {
        Expr::Nested(inner) => strip(inner),
        other => other,
    }
}

fn is_literal(e: &Expr) -> bool {
    matches!(strip(e), Expr::Value(_))
}

/// `count(*)`, `max(x)`, `count(DISTINCT x)` → (agg, argument or None for `*`, distinct). Other functions are
/// outside the grammar.
/// An aggregate call: the aggregate, its argument (`None` for `*`) and whether it is DISTINCT.
type AggCall<'a> = (Agg, Option<&'a Expr>, bool);

fn agg_call(e: &Expr) -> Result<Option<AggCall<'_>>, ParseError> {
    let Expr::Function(f) = e else { return Ok(None) };
    let name = ident_parts(&f.name).join(".");
    let Some(agg) = Agg::from_name(&name) else {
        return err(format!("function {name} is outside Spider's grammar"));
    };
    let FunctionArguments::List(list) = &f.args else {
        return err(format!("{name} without arguments"));
    };
    let distinct = matches!(list.duplicate_treatment, Some(sqlparser::ast::DuplicateTreatment::Distinct));
    if list.args.len() != 1 {
        return err(format!("{name} with {} arguments", list.args.len()));
    }
    match &list.args[0] {
        FunctionArg::Unnamed(FunctionArgExpr::Wildcard) => Ok(Some((agg, None, distinct))),
        FunctionArg::Unnamed(FunctionArgExpr::Expr(x)) => Ok(Some((agg, Some(x), distinct))),
        _ => err(format!("{name} argument")),
    }
}

/// Output column names of a derived table (aliases, or the column's own name).
fn output_names(q: &Query) -> Vec<String> {
    fn body(b: &SetExpr) -> Vec<String> {
        match b {
            SetExpr::Select(s) => s
                .projection
                .iter()
                .filter_map(|it| match it {
                    SelectItem::ExprWithAlias { alias, .. } => Some(alias.value.to_lowercase()),
                    SelectItem::UnnamedExpr(Expr::Identifier(i)) => Some(i.value.to_lowercase()),
                    SelectItem::UnnamedExpr(Expr::CompoundIdentifier(p)) => p.last().map(|i| i.value.to_lowercase()),
                    _ => None,
                })
                .collect(),
            SetExpr::SetOperation { left, .. } => body(left),
            SetExpr::Query(q) => body(&q.body),
            _ => Vec::new(),
        }
    }
    body(&q.body)
}

fn last_iuen(t: &mut SqlTree) -> &mut SqlTree {
    if t.union.is_none() && t.intersect.is_none() && t.except.is_none() {
        return t;
    }
    let next = t.union.as_deref_mut().or(t.intersect.as_deref_mut()).or(t.except.as_deref_mut());
    last_iuen(next.expect("one of union, intersect, except is set"))
}

fn last_select(t: &mut SqlTree) -> &mut SqlTree {
    last_iuen(t)
}
