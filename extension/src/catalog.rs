//! The model's context, read from `pg_catalog` through SPI as the calling role.
//!
//! Only what the caller could query is described: schemas it has USAGE on, tables and views with at least one
//! SELECT-able column, and of those only the SELECT-able columns. Keys are shown only when all their columns are
//! visible, and foreign keys only when the referenced table is in scope too. One query builds the whole catalog as
//! JSON, which deserializes straight into core's [`Catalog`].

use crate::errors::CopilotError;
use copilot_core::sql::schema::{Catalog, RenderOptions, Table};
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;

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

/// The schemas of the caller's search_path that exist (`current_schemas(false)`).
fn search_path_schemas() -> Vec<String> {
    Spi::get_one::<Vec<String>>("SELECT current_schemas(false)::text[]").ok().flatten().unwrap_or_default()
}

/// The context for the calling role: its catalog and the render options that go with it.
pub fn load(configured: &[String]) -> Result<(Catalog, RenderOptions), CopilotError> {
    let search_path = search_path_schemas();
    let schemas: Vec<String> = if configured.is_empty() { search_path.clone() } else { configured.to_vec() };
    let json: Option<String> = Spi::get_one_with_args(CATALOG_SQL, &[DatumWithOid::from(schemas)])?;
    let tables: Vec<Table> = serde_json::from_str(json.as_deref().unwrap_or("[]"))
        .map_err(|e| CopilotError::Catalog(format!("cannot read the catalog description: {e}")))?;
    let mut catalog = Catalog { tables };
    catalog.normalize();
    Ok((catalog, RenderOptions { unqualified_schemas: search_path, comments: true }))
}
