//! The gate (sqlparser) against PostgreSQL's own parser (libpg_query): no text the gate accepts may be, to
//! PostgreSQL, anything but one plain read-only query — one SELECT (or VALUES / set operation), no INTO, no locking
//! clause, no data-modifying statement anywhere (CTEs included), no call to a deny-listed function. A text
//! PostgreSQL cannot parse is harmless (it never runs). A violation panics: libFuzzer keeps the input. The same
//! inputs go through `copilot.explain`'s parser-based describer, which must never panic.
#![no_main]
use copilot_core::sql::gate;
use libfuzzer_sys::fuzz_target;
use pg_query::NodeRef;

fn check(sql: &str) {
    // `copilot.explain` reads the same untrusted text: it must return (text or an error), never panic or hang
    // (libFuzzer's -timeout catches a hang), and it explains exactly what the gate would let run.
    let explained = copilot_core::sql::explain::explain(sql);
    if gate::check(sql).is_err() {
        return;
    }
    assert!(
        explained.is_ok() || matches!(explained, Err(copilot_core::sql::explain::ExplainError::NotAQuery)),
        "the gate accepted what explain cannot read: {sql:?}: {explained:?}"
    );
    let Ok(parsed) = pg_query::parse(sql) else { return };
    let stmts = &parsed.protobuf.stmts;
    assert_eq!(stmts.len(), 1, "the gate accepted {} statements: {sql:?}", stmts.len());
    for (node, _, _, _) in parsed.protobuf.nodes() {
        match node {
            NodeRef::InsertStmt(_) | NodeRef::UpdateStmt(_) | NodeRef::DeleteStmt(_) | NodeRef::MergeStmt(_) => {
                panic!("the gate accepted a data-modifying statement: {sql:?}")
            }
            NodeRef::SelectStmt(s) => {
                assert!(s.into_clause.is_none(), "the gate accepted SELECT … INTO: {sql:?}");
                assert!(s.locking_clause.is_empty(), "the gate accepted a locking clause: {sql:?}");
            }
            NodeRef::LockingClause(_) => panic!("the gate accepted a locking clause: {sql:?}"),
            NodeRef::FuncCall(f) => {
                let name = f.funcname.last().and_then(|n| match n.node.as_ref() {
                    Some(pg_query::NodeEnum::String(s)) => Some(s.sval.clone()),
                    _ => None,
                });
                if let Some(name) = name {
                    assert!(!gate::is_denied(&name), "the gate accepted a call to {name}(): {sql:?}");
                }
            }
            _ => {}
        }
    }
    let top = stmts[0].stmt.as_ref().and_then(|n| n.node.as_ref());
    assert!(matches!(top, Some(pg_query::NodeEnum::SelectStmt(_))), "the gate accepted a non-SELECT: {sql:?}");
}

fuzz_target!(|data: &[u8]| {
    if let Ok(sql) = std::str::from_utf8(data) {
        check(sql);
    }
});
