//! SQL text: what the model is shown, and what is taken from its answer.
//!
//! - [`schema`]: the schema model and its one-line `CREATE TABLE` rendering (the model's context);
//! - [`prompt`]: chat-template prompts, laid out schema first, question last;
//! - [`extract`]: one SQL statement out of what a model wrote;
//! - [`gate`]: what model SQL must pass before it runs (one read-only query, no denied functions, known names);
//! - [`examples`]: which verified question→SQL pairs to show next to a question (BM25 over their questions);
//! - [`hint`]: PostgreSQL's HINT for a misplaced column or alias, applied to the query;
//! - [`suggest`]: the schema names closest to one PostgreSQL says does not exist, for repairs;
//! - [`qualify`]: the schema put back in front of table names the model was shown bare;
//! - [`select`]: the tables and columns a question needs when the schema exceeds the context budget;
//! - [`explain`]: a clause-by-clause plain-language description of a query, from its parse tree.

pub mod examples;
pub mod explain;
pub mod extract;
pub mod gate;
pub mod hint;
pub mod prompt;
pub mod qualify;
pub mod schema;
pub mod select;
pub mod suggest;
