//! The model's context, read from `pg_catalog` through SPI as the calling role.
//!
//! Only what the caller could query is described: schemas it has USAGE on, tables and views with at least one
//! SELECT-able column, and of those only the SELECT-able columns. Keys are shown only when all their columns are
//! visible, and foreign keys only when the referenced table is in scope too. One query builds the whole catalog as
//! JSON, which deserializes straight into core's [`Catalog`].

use crate::errors::CopilotError;
use copilot_core::sql::schema::{Catalog, RenderOptions, Table};
use pgrx::datum::DatumWithOid;

const CATALOG_SQL: &str = r#"
WITH s AS (
  SELECT n.oid, n.nspname FROM pg_namespace n
  WHERE n.nspname = ANY($1::text[]) AND has_schema_privilege(n.oid, 'USAGE')
), rel AS (
  SELECT c.oid, s.nspname, c.relname, c.relkind
  FROM pg_class c JOIN s ON s.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'v', 'm', 'f', 'p') AND NOT c.relispartition
    AND has_any_column_privilege(c.oid, 'SELECT')
), cols(conoid, ord, attname) AS (
  SELECT con.oid, k.ord, a.attname
  FROM pg_constraint con, unnest(con.conkey) WITH ORDINALITY k(attnum, ord), pg_attribute a
  WHERE a.attrelid = con.conrelid AND a.attnum = k.attnum AND con.conrelid IN (SELECT oid FROM rel)
)
SELECT coalesce(jsonb_agg(jsonb_build_object(
  'schema', r.nspname,
  'name', r.relname,
  'kind', CASE WHEN r.relkind IN ('v', 'm') THEN 'view' ELSE 'table' END,
  'comment', obj_description(r.oid, 'pg_class'),
  'columns', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                  'name', a.attname, 'data_type', format_type(a.atttypid, a.atttypmod),
                  'not_null', a.attnotnull, 'comment', col_description(r.oid, a.attnum)) ORDER BY a.attnum), '[]')
              FROM pg_attribute a
              WHERE a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
                AND has_column_privilege(r.oid, a.attnum, 'SELECT')),
  'primary_key', (SELECT coalesce(jsonb_agg(c.attname ORDER BY c.ord), '[]')
                  FROM pg_constraint con JOIN cols c ON c.conoid = con.oid
                  WHERE con.conrelid = r.oid AND con.contype = 'p'
                    AND NOT EXISTS (SELECT 1 FROM unnest(con.conkey) k(attnum)
                                    WHERE NOT has_column_privilege(r.oid, k.attnum, 'SELECT'))),
  'foreign_keys', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                       'columns', (SELECT jsonb_agg(c.attname ORDER BY c.ord) FROM cols c WHERE c.conoid = con.oid),
                       'ref_schema', rr.nspname,
                       'ref_table', rr.relname,
                       'ref_columns', (SELECT jsonb_agg(a.attname ORDER BY k.ord)
                                       FROM unnest(con.confkey) WITH ORDINALITY k(attnum, ord)
                                       JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum))
                     ORDER BY con.conname), '[]')
                   FROM pg_constraint con JOIN rel rr ON rr.oid = con.confrelid
                   WHERE con.conrelid = r.oid AND con.contype = 'f'
                     AND NOT EXISTS (SELECT 1 FROM unnest(con.conkey) k(attnum)
                                     WHERE NOT has_column_privilege(r.oid, k.attnum, 'SELECT'))
                     AND NOT EXISTS (SELECT 1 FROM unnest(con.confkey) k(attnum)
                                     WHERE NOT has_column_privilege(con.confrelid, k.attnum, 'SELECT')))
) ORDER BY r.nspname, r.relname), '[]'::jsonb)::text
FROM rel r
"#;

/// Values to show beside categorical columns, for the same relations and columns as [`CATALOG_SQL`] (so only what
/// the caller may SELECT): enum labels and CHECK lists (every allowed value), else the most common values from
/// `pg_stats` for string columns. `pg_stats` shows a column's statistics only to roles that may read the column,
/// and none for tables with row-level security the caller is subject to; a table never analyzed has none (its
/// columns are shown without values until autovacuum or an `ANALYZE` gathers statistics).
const VALUES_SQL: &str = r#"
WITH s AS (
  SELECT n.oid, n.nspname FROM pg_namespace n
  WHERE n.nspname = ANY($1::text[]) AND has_schema_privilege(n.oid, 'USAGE')
), col AS (
  SELECT c.oid AS relid, s.nspname, c.relname, a.attnum, a.attname, a.atttypid, t.typtype, t.typcategory
  FROM pg_class c JOIN s ON s.oid = c.relnamespace
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  JOIN pg_type t ON t.oid = a.atttypid
  WHERE c.relkind IN ('r', 'v', 'm', 'f', 'p') AND NOT c.relispartition
    AND has_column_privilege(c.oid, a.attnum, 'SELECT')
)
SELECT coalesce(jsonb_agg(jsonb_build_object(
  'schema', c.nspname, 'table', c.relname, 'column', c.attname,
  'values', CASE WHEN c.typtype = 'e' THEN en.vals WHEN ck.vals IS NOT NULL THEN ck.vals ELSE st.vals END,
  'complete', c.typtype = 'e' OR ck.vals IS NOT NULL)), '[]'::jsonb)::text
FROM col c
LEFT JOIN LATERAL (
  SELECT jsonb_agg(e.enumlabel ORDER BY e.enumsortorder) FROM pg_enum e WHERE e.enumtypid = c.atttypid
) en(vals) ON c.typtype = 'e'
LEFT JOIN LATERAL (
  SELECT jsonb_agg(replace(m[1], '''''', ''''))
  FROM pg_constraint k, regexp_matches(pg_get_constraintdef(k.oid), '''((?:[^'']|'''')*)''', 'g') m
  WHERE k.conrelid = c.relid AND k.contype = 'c' AND k.conkey = ARRAY[c.attnum]::int2[]
    AND pg_get_constraintdef(k.oid) ~* '(= ANY|\mIN\M) *\('
) ck(vals) ON true
LEFT JOIN LATERAL (
  SELECT to_jsonb(st.most_common_vals::text::text[]) FROM pg_stats st
  WHERE st.schemaname = c.nspname AND st.tablename = c.relname AND st.attname = c.attname
) st(vals) ON c.typcategory = 'S' AND c.typtype <> 'e'
WHERE c.typtype = 'e' OR ck.vals IS NOT NULL OR (c.typcategory = 'S' AND st.vals IS NOT NULL)
"#;

/// Longest value shown; longer ones (free text, not a category) are left out.
const MAX_VALUE_CHARS: usize = 40;
/// Characters of values shown in the whole context: beyond it, columns of later tables get none.
const VALUE_BUDGET_CHARS: usize = 4000;

#[derive(serde::Deserialize)]
struct ColumnValues {
    schema: String,
    table: String,
    column: String,
    values: Option<Vec<String>>,
    complete: bool,
}

/// Attach up to `per_column` values to the catalog's columns (see [`VALUES_SQL`]), within [`VALUE_BUDGET_CHARS`].
fn add_values(catalog: &mut Catalog, schemas: &[String], per_column: usize) -> Result<(), CopilotError> {
    if per_column == 0 {
        return Ok(());
    }
    let json: Option<String> = crate::spi::one(VALUES_SQL, &[DatumWithOid::from(schemas.to_vec())])?;
    let found: Vec<ColumnValues> = serde_json::from_str(json.as_deref().unwrap_or("[]"))
        .map_err(|e| CopilotError::Catalog(format!("cannot read the column values: {e}")))?;
    let mut budget = VALUE_BUDGET_CHARS;
    for t in catalog.tables.iter_mut() {
        for c in t.columns.iter_mut() {
            let Some(f) = found.iter().find(|f| f.schema == t.schema && f.table == t.name && f.column == c.name) else {
                continue;
            };
            let all = f.values.clone().unwrap_or_default();
            let short: Vec<String> = all.iter().filter(|v| v.chars().count() <= MAX_VALUE_CHARS).cloned().collect();
            let mut shown: Vec<String> = short.into_iter().take(per_column).collect();
            while !shown.is_empty() && shown.iter().map(|v| v.len() + 4).sum::<usize>() > budget {
                shown.pop();
            }
            budget -= shown.iter().map(|v| v.len() + 4).sum::<usize>();
            c.values_complete = f.complete && shown.len() == all.len();
            c.values = shown;
        }
    }
    Ok(())
}

/// The schemas of the caller's search_path that exist (`current_schemas(false)`).
fn search_path_schemas() -> Vec<String> {
    crate::spi::one::<Vec<String>>("SELECT current_schemas(false)::text[]", &[]).ok().flatten().unwrap_or_default()
}

/// The context for the calling role: its catalog (with up to `values_per_column` example values per categorical
/// column) and the render options that go with it.
pub fn load(configured: &[String], values_per_column: usize) -> Result<(Catalog, RenderOptions), CopilotError> {
    let search_path = search_path_schemas();
    let schemas: Vec<String> = if configured.is_empty() { search_path.clone() } else { configured.to_vec() };
    let json: Option<String> = crate::spi::one(CATALOG_SQL, &[DatumWithOid::from(schemas.clone())])?;
    let tables: Vec<Table> = serde_json::from_str(json.as_deref().unwrap_or("[]"))
        .map_err(|e| CopilotError::Catalog(format!("cannot read the catalog description: {e}")))?;
    let mut catalog = Catalog { tables };
    catalog.normalize();
    add_values(&mut catalog, &schemas, values_per_column)?;
    Ok((catalog, RenderOptions { unqualified_schemas: search_path, comments: true, ..RenderOptions::default() }))
}
