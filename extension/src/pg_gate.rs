//! The gate's second opinion, from PostgreSQL's own parser.
//!
//! Core's gate reads model SQL with sqlparser; PostgreSQL executes it with its own grammar. Where the two parsers
//! disagree, a statement could look harmless to the gate and be something else to PostgreSQL. So before anything
//! is planned or run, the same text also goes through `raw_parser` (the parser the executor will use) and its
//! tree must be exactly one plain `SELECT` (set operations and VALUES included) with no `INTO`, no locking clause,
//! no data-modifying statement anywhere (a CTE included), and no call to a deny-listed function anywhere in it —
//! the same rules, checked on the tree PostgreSQL will actually run.

use copilot_core::sql::gate::{is_denied, Rejection};
use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use std::ffi::CString;

/// What the walk found first.
struct Finding(Option<Rejection>);

/// The last name of a qualified function name list (`pg_catalog.pg_sleep` → `pg_sleep`).
///
/// # Safety
/// `names` is a List of String nodes from a parse tree in the current memory context.
unsafe fn last_name(names: *mut pg_sys::List) -> Option<String> {
    // SAFETY: per the contract; list_nth on the last index of a non-empty list, then a String node's C string.
    unsafe {
        let n = pg_sys::list_length(names);
        if n <= 0 {
            return None;
        }
        let node = pg_sys::list_nth(names, n - 1) as *mut pg_sys::Node;
        if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_String {
            return None;
        }
        let s = (*(node as *mut pg_sys::String)).sval;
        (!s.is_null()).then(|| std::ffi::CStr::from_ptr(s).to_string_lossy().into_owned())
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
    if node.is_null() {
        return false;
    }
    // SAFETY: `context` is the `Finding` `check` passes, alive for the whole walk; `node` is a node of the raw parse
    // tree `raw_parser` just built, and each cast below follows its tag.
    unsafe {
        let found = &mut *(context as *mut Finding);
        let reject = |found: &mut Finding, r: Rejection| {
            found.0 = Some(r);
            true
        };
        match (*node).type_ {
            pg_sys::NodeTag::T_InsertStmt
            | pg_sys::NodeTag::T_UpdateStmt
            | pg_sys::NodeTag::T_DeleteStmt
            | pg_sys::NodeTag::T_MergeStmt => return reject(found, Rejection::DataModifyingCte),
            pg_sys::NodeTag::T_LockingClause => return reject(found, Rejection::LockingClause),
            pg_sys::NodeTag::T_SelectStmt if !(*(node as *mut pg_sys::SelectStmt)).intoClause.is_null() => {
                return reject(found, Rejection::SelectInto)
            }
            pg_sys::NodeTag::T_FuncCall => {
                if let Some(name) = last_name((*(node as *mut pg_sys::FuncCall)).funcname) {
                    if is_denied(&name) {
                        return reject(found, Rejection::DeniedFunction(name.to_lowercase()));
                    }
                }
            }
            _ => {}
        }
        pg_sys::raw_expression_tree_walker(node, Some(walker), context)
    }
}

/// Parse `sql` with PostgreSQL's parser and apply the gate's rules to its tree (see the module documentation).
pub fn check(sql: &str) -> Result<(), Rejection> {
    let text = CString::new(sql).map_err(|_| Rejection::Unparseable("the SQL contains a NUL character".into()))?;
    PgTryBuilder::new(|| {
        // SAFETY: raw_parser reads the NUL-terminated text and allocates its tree in the current memory context
        // (freed with it); a syntax error raises, which PgTryBuilder catches. The tree is only read.
        unsafe {
            let stmts = pg_sys::raw_parser(text.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
            let n = pg_sys::list_length(stmts);
            if n != 1 {
                return Err(if n == 0 { Rejection::Empty } else { Rejection::MultipleStatements(n as usize) });
            }
            let raw = pg_sys::list_nth(stmts, 0) as *mut pg_sys::RawStmt;
            let stmt = (*raw).stmt;
            if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_SelectStmt {
                return Err(Rejection::NotAQuery("a statement other than SELECT (PostgreSQL's parser)".into()));
            }
            let mut found = Finding(None);
            walker(stmt, &mut found as *mut Finding as *mut std::ffi::c_void);
            match found.0 {
                Some(r) => Err(r),
                None => Ok(()),
            }
        }
    })
    .catch_others(|e| match e {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => {
            Err(Rejection::Unparseable(r.message().to_string()))
        }
        other => other.rethrow(),
    })
    .execute()
}
