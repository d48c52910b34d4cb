//! Read-only SPI. pgrx's `Spi::get_one*` and `Spi::run*` execute as updates and first make the transaction take a
//! transaction id (`GetCurrentTransactionId`): a hot standby refuses that ("cannot assign TransactionIds during
//! recovery"), and on a primary every ask would burn an XID. Every read of ours goes through [`one`]; only real
//! writes (`copilot.teach`, `copilot.feedback`, the history writer) use pgrx's update calls.

use pgrx::datum::{DatumWithOid, FromDatum, IntoDatum};
use pgrx::prelude::*;

/// The first column of the first row of a read-only query (an error when it returns no row).
pub fn one<A: FromDatum + IntoDatum>(query: &str, args: &[DatumWithOid<'_>]) -> Result<Option<A>, pgrx::spi::Error> {
    Spi::connect(|c| c.select(query, Some(1), args)?.first().get_one())
}

/// Whether `name` (e.g. `copilot.history`) names a relation, as the caller resolves it; false on any error.
pub fn relation_exists(name: &str) -> bool {
    one::<bool>("SELECT pg_catalog.to_regclass($1) IS NOT NULL", &[name.into()]).ok().flatten().unwrap_or(false)
}

/// The first column of every row of `query`, as text (NULL as an empty string), run read-write — utility statements
/// such as EXPLAIN are refused by read-only SPI — yet without taking a transaction id (pgrx's `update` would).
/// For our own wrappers of gated SQL inside the rolled-back, read-only subtransaction of [`crate::exec`]; SPI
/// errors are raised as PostgreSQL errors.
pub fn texts(query: &str) -> Vec<String> {
    let query = std::ffi::CString::new(query).unwrap_or_default();
    Spi::connect(|_| {
        // SAFETY: SPI is connected (Spi::connect) on the main thread; `query` is a NUL-terminated string that
        // outlives the call. SPI_execute raises (longjmps, caught by pgrx's guard) on error.
        let rc = unsafe { pg_sys::SPI_execute(query.as_ptr(), false, 0) };
        if rc < 0 {
            pgrx::error!("SPI_execute failed: {rc}");
        }
        // SAFETY: after a successful SPI_execute, SPI_tuptable and SPI_processed describe its result until the
        // next SPI call or SPI_finish; we copy every value out before returning (Spi::connect then finishes).
        unsafe {
            let table = pg_sys::SPI_tuptable;
            if table.is_null() {
                return Vec::new();
            }
            let n = pg_sys::SPI_processed as usize;
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                let tuple = *(*table).vals.add(i);
                let v = pg_sys::SPI_getvalue(tuple, (*table).tupdesc, 1);
                out.push(if v.is_null() {
                    String::new()
                } else {
                    std::ffi::CStr::from_ptr(v).to_string_lossy().into_owned()
                });
            }
            out
        }
    })
}
