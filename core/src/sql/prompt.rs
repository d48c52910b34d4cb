//! Prompt construction for chat-tuned models.
//!
//! The chat template comes from the model itself (`tokenizer.chat_template` in the GGUF, a Jinja template as in
//! Hugging Face `tokenizer_config.json`) and is rendered with minijinja, the way `apply_chat_template` does
//! (`trim_blocks`, `lstrip_blocks`, Python string methods). A model without a template gets ChatML.
//!
//! Layout invariant (the schema-prefix KV cache depends on it): everything that depends only on the database —
//! system text and schema context — comes first, the question last. [`Prompt::prefix`] is the longest head of the
//! rendered text that does not depend on the question; [`Prompt::suffix`] starts with the question.

use crate::engine::backend::Exchange;
use crate::error::CoreError;
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};

/// The instruction every request carries. Part of the schema prefix.
pub const SYSTEM_TEXT: &str = "You are an expert PostgreSQL analyst. Given the database schema below, write one \
PostgreSQL SELECT query that answers the user's question. Use only the tables and columns in the schema, and \
qualify column names when several tables are joined. Reply with the SQL only, in a ```sql code block.";

/// What the assistant's reply is primed with, so the model starts writing SQL at once.
pub const ASSISTANT_PRIMER: &str = "```sql\n";

/// The ChatML template (Qwen, SmolLM and many others) used when the model carries none.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + \
message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const QUESTION_SENTINEL: &str = "\u{2063}COPILOT-QUESTION\u{2063}";

/// A chat template and the special-token strings it refers to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
    /// True when the template came from the model; false when ChatML was assumed.
    pub from_model: bool,
}

impl ChatTemplate {
    pub fn new(source: Option<String>, bos_token: &str, eos_token: &str) -> Self {
        match source.filter(|s| !s.trim().is_empty()) {
            Some(source) => {
                ChatTemplate { source, bos_token: bos_token.into(), eos_token: eos_token.into(), from_model: true }
            }
            None => ChatTemplate {
                source: CHATML_TEMPLATE.into(),
                bos_token: bos_token.into(),
                eos_token: eos_token.into(),
                from_model: false,
            },
        }
    }

    pub fn chatml() -> Self {
        Self::new(None, "", "<|im_end|>")
    }

    /// Render `messages` (role, content) with the generation prompt appended.
    pub fn render(&self, messages: &[(&str, &str)]) -> Result<String, CoreError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
        env.add_template("chat", &self.source)
            .map_err(|e| CoreError::Template(format!("cannot parse the chat template: {e}")))?;
        let tmpl = env.get_template("chat").expect("template was just added");
        let msgs: Vec<Value> = messages
            .iter()
            .map(|(role, content)| Value::from_serialize(serde_json::json!({"role": role, "content": content})))
            .collect();
        tmpl.render(minijinja::context! {
            messages => msgs,
            add_generation_prompt => true,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
        })
        .map_err(|e| CoreError::Template(format!("cannot render the chat template: {e}")))
    }
}

/// A rendered prompt, split at the question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// Depends only on the template, the system text and the schema context.
    pub prefix: String,
    /// The question and everything after it, including the assistant primer.
    pub suffix: String,
}

impl Prompt {
    pub fn text(&self) -> String {
        format!("{}{}", self.prefix, self.suffix)
    }
}

/// The user turn: schema first, question last.
pub fn user_message(schema_context: &str, question: &str) -> String {
    format!("Database schema:\n{}\n\nQuestion: {}", schema_context.trim_end(), question.trim())
}

/// Build the prompt for one question over one schema context.
pub fn build_prompt(template: &ChatTemplate, schema_context: &str, question: &str) -> Result<Prompt, CoreError> {
    build_conversation(template, schema_context, &[], question)
}

/// An assistant turn as the model writes one: the SQL in a fenced block, ended by `;` (what the stop rules and
/// the training completions end on).
pub fn answer_block(sql: &str) -> String {
    format!("{ASSISTANT_PRIMER}{};\n```", sql.trim().trim_end_matches(';').trim_end())
}

/// Build the prompt for `question` after the earlier turns `history` (oldest first) of one conversation over one
/// schema context: the first user turn carries the schema and the first question, each earlier answer is an
/// assistant turn, and `question` is the last user turn. The prefix (system text and schema) is the same as for a
/// single question, so the schema-prefix cache serves conversations too.
///
/// Templates that refuse a system turn (Mistral-Instruct v0.1 raises "Conversation roles must alternate") get the
/// system text folded into the first user turn, as Mistral's own documentation does.
pub fn build_conversation(
    template: &ChatTemplate,
    schema_context: &str,
    history: &[Exchange],
    question: &str,
) -> Result<Prompt, CoreError> {
    let first = history.first().map_or(question, |e| e.question.as_str());
    let user = user_message(schema_context, QUESTION_SENTINEL);
    let answers: Vec<String> = history.iter().map(|e| answer_block(&e.answer)).collect();
    let mut turns: Vec<(&str, &str)> = Vec::with_capacity(2 * history.len() + 1);
    for (i, (e, a)) in history.iter().zip(&answers).enumerate() {
        if i > 0 {
            turns.push(("user", e.question.trim()));
        }
        turns.push(("assistant", a));
    }
    if !history.is_empty() {
        turns.push(("user", question.trim()));
    }
    let mut messages = vec![("system", SYSTEM_TEXT), ("user", user.as_str())];
    messages.extend_from_slice(&turns);
    let rendered = match template.render(&messages) {
        Ok(r) => r,
        Err(_) => {
            let merged = format!("{SYSTEM_TEXT}\n\n{user}");
            let mut folded = vec![("user", merged.as_str())];
            folded.extend_from_slice(&turns);
            template.render(&folded)?
        }
    };
    let mut parts = rendered.splitn(2, QUESTION_SENTINEL);
    let prefix = parts.next().unwrap_or_default().to_string();
    let rest =
        parts.next().ok_or_else(|| CoreError::Template("the chat template dropped the user's message".into()))?;
    if rest.contains(QUESTION_SENTINEL) {
        return Err(CoreError::Template("the chat template repeats the user's message".into()));
    }
    Ok(Prompt { prefix, suffix: format!("{}{}{}", first.trim(), rest, ASSISTANT_PRIMER) })
}

/// What the model is asked, after the question, to judge whether the schema can answer it (see
/// [`build_judge`]).
pub const JUDGE_TEXT: &str = "Before any SQL: can this question be answered with a query over only the tables and \
columns in the schema above? Reply with yes or no.";

/// The prompt that asks the model whether `question` can be answered from the schema: the same schema prefix as
/// the answer's (so the prefix cache serves both), the question with [`JUDGE_TEXT`], and the assistant's turn
/// opened without the SQL primer, so the next token is the model's yes or no.
pub fn build_judge(template: &ChatTemplate, schema_context: &str, question: &str) -> Result<Prompt, CoreError> {
    build_judge_with(template, schema_context, question, JUDGE_TEXT)
}

/// [`build_judge`] with another wording of the judge's question (for calibration experiments).
pub fn build_judge_with(
    template: &ChatTemplate,
    schema_context: &str,
    question: &str,
    judge_text: &str,
) -> Result<Prompt, CoreError> {
    let mut p = build_conversation(template, schema_context, &[], &format!("{}\n\n{judge_text}", question.trim()))?;
    p.suffix.truncate(p.suffix.len() - ASSISTANT_PRIMER.len());
    Ok(p)
}

/// The last user turn of a repair: what went wrong when PostgreSQL planned the previous answer (its own words:
/// message, DETAIL, HINT, the text near the error position), and what to do.
pub fn repair_message(error: &str) -> String {
    format!(
        "PostgreSQL cannot run that query:\n{}\nWrite a corrected query. Use only the tables and columns in the \
         schema above.",
        error.trim()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversation_keeps_the_prefix_and_puts_each_turn_in_order() {
        let t = ChatTemplate::chatml();
        let single = build_prompt(&t, "CREATE TABLE t (a integer);", "how many rows?").unwrap();
        let history = [Exchange { question: "how many rows?".into(), answer: "SELECT count(*) FROM tt;".into() }];
        let p = build_conversation(
            &t,
            "CREATE TABLE t (a integer);",
            &history,
            &repair_message("ERROR:  relation \"tt\" does not exist"),
        )
        .unwrap();
        assert_eq!(p.prefix, single.prefix, "the schema prefix (and its cache entry) is shared");
        assert_eq!(
            p.suffix,
            "how many rows?<|im_end|>\n<|im_start|>assistant\n```sql\nSELECT count(*) FROM tt;\n```<|im_end|>\n\
             <|im_start|>user\nPostgreSQL cannot run that query:\nERROR:  relation \"tt\" does not exist\nWrite a \
             corrected query. Use only the tables and columns in the schema above.<|im_end|>\n<|im_start|>assistant\n```sql\n"
        );
    }

    #[test]
    fn chatml_prompt_puts_question_last() {
        let p = build_prompt(&ChatTemplate::chatml(), "CREATE TABLE t (a integer);\n", "how many rows?").unwrap();
        assert!(p.prefix.starts_with("<|im_start|>system\n"));
        assert!(p.prefix.ends_with("Question: "));
        assert_eq!(p.suffix, "how many rows?<|im_end|>\n<|im_start|>assistant\n```sql\n");
        assert!(!p.prefix.contains("how many"));
    }

    #[test]
    fn prefix_is_independent_of_question() {
        let t = ChatTemplate::chatml();
        let a = build_prompt(&t, "CREATE TABLE t (a integer);", "q1").unwrap();
        let b = build_prompt(&t, "CREATE TABLE t (a integer);", "a different question").unwrap();
        assert_eq!(a.prefix, b.prefix);
        assert_ne!(a.suffix, b.suffix);
    }

    #[test]
    fn template_that_drops_user_turn_is_an_error() {
        let t = ChatTemplate::new(Some("{{ bos_token }}nothing".into()), "<s>", "</s>");
        assert!(matches!(build_prompt(&t, "x", "y"), Err(CoreError::Template(_))));
    }

    #[test]
    fn broken_template_is_an_error_not_a_panic() {
        let t = ChatTemplate::new(Some("{% for %}".into()), "<s>", "</s>");
        assert!(build_prompt(&t, "x", "y").is_err());
    }
}
