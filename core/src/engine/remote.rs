//! A remote engine: any server that speaks OpenAI's chat completions API (vLLM, llama.cpp's `llama-server`,
//! Ollama, hosted APIs). The rest of the pipeline — the caller's catalog context, the gate, planning, repair, the
//! vote — is the extension's and stays the same; only the text generation moves.
//!
//! A request becomes the same conversation the local model sees (system text, the schema and question, earlier
//! turns), sent `candidates` times: the first at temperature 0, the others at the request's temperature with a
//! seed each (servers that honour `seed` then repeat themselves). The SQL is extracted from each reply. The
//! cannot-answer judge asks the same question the local model is asked, for one token with log-probabilities where
//! the server gives them (otherwise the reply's word).
//!
//! Failures are classified ([`RemoteFailure`]) so the extension can give each its SQLSTATE: no connection, 4xx (not
//! retried: the request, key or model name is wrong), 5xx (retried `retries` times), a reply that is not the
//! expected JSON, and no reply within `timeout`. The API key is sent as a bearer token and never appears in an
//! error message.

use crate::engine::backend::{Backend, Candidate, GenerateRequest, Generation, StopReason};
use crate::error::{CoreError, RemoteFailure};
use crate::sql::extract::extract_sql;
use crate::sql::prompt::{answer_block, user_message, JUDGE_TEXT, SYSTEM_TEXT};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Where and how to reach the server.
#[derive(Clone)]
pub struct RemoteConfig {
    /// The API's base URL, e.g. `http://127.0.0.1:8080/v1` (`/chat/completions` is appended).
    pub endpoint: String,
    pub model: String,
    pub api_key: Option<String>,
    /// Connect, and whole-reply, time limits.
    pub timeout: Duration,
    /// Tries after the first for a 5xx or a dropped connection.
    pub retries: usize,
}

impl std::fmt::Debug for RemoteConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("RemoteConfig")
            .field("endpoint", &self.endpoint)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "(set)"))
            .finish()
    }
}

/// The remote backend (see the module documentation).
pub struct OpenAi {
    cfg: RemoteConfig,
    agent: ureq::Agent,
}

fn fail(failure: RemoteFailure, message: impl Into<String>) -> CoreError {
    CoreError::Remote { failure, message: message.into() }
}

impl OpenAi {
    pub fn new(cfg: RemoteConfig) -> OpenAi {
        let agent = ureq::AgentBuilder::new().timeout_connect(cfg.timeout).timeout(cfg.timeout).build();
        OpenAi { cfg, agent }
    }

    /// The conversation as chat messages: the same turns the local model's template renders.
    pub fn messages(req: &GenerateRequest, last: &str) -> Vec<Value> {
        let first = req.history.first().map_or(last, |e| e.question.as_str());
        let mut m = vec![
            json!({"role": "system", "content": SYSTEM_TEXT}),
            json!({"role": "user", "content": user_message(&req.schema_context, first)}),
        ];
        for (i, e) in req.history.iter().enumerate() {
            if i > 0 {
                m.push(json!({"role": "user", "content": e.question}));
            }
            m.push(json!({"role": "assistant", "content": answer_block(&e.answer)}));
        }
        if !req.history.is_empty() {
            m.push(json!({"role": "user", "content": last}));
        }
        m
    }

    /// POST one chat completion, with retries for 5xx and dropped connections.
    fn complete(&self, body: &Value) -> Result<Value, CoreError> {
        let url = format!("{}/chat/completions", self.cfg.endpoint.trim_end_matches('/'));
        let mut tries = 0;
        loop {
            let mut r = self.agent.post(&url).set("Content-Type", "application/json");
            if let Some(k) = &self.cfg.api_key {
                r = r.set("Authorization", &format!("Bearer {k}"));
            }
            let outcome = r.send_string(&body.to_string());
            let retry = match outcome {
                Ok(resp) => {
                    let text = resp
                        .into_string()
                        .map_err(|e| fail(RemoteFailure::Malformed, format!("unreadable reply from {url}: {e}")))?;
                    return serde_json::from_str(&text).map_err(|e| {
                        fail(
                            RemoteFailure::Malformed,
                            format!("the reply from {url} is not JSON ({e}): {}", snippet(&text)),
                        )
                    });
                }
                Err(ureq::Error::Status(code, resp)) => {
                    let text = resp.into_string().unwrap_or_default();
                    let why = format!("{url} answered HTTP {code}: {}", snippet(&text));
                    if code < 500 {
                        return Err(fail(RemoteFailure::Rejected, why));
                    }
                    fail(RemoteFailure::ServerError, why)
                }
                Err(ureq::Error::Transport(t)) => {
                    let timed_out =
                        t.kind() == ureq::ErrorKind::Io && t.to_string().to_lowercase().contains("timed out");
                    if timed_out {
                        return Err(fail(
                            RemoteFailure::Timeout,
                            format!("{url} did not answer within {} s", self.cfg.timeout.as_secs_f64()),
                        ));
                    }
                    match t.kind() {
                        ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::Dns | ureq::ErrorKind::InvalidUrl => {
                            return Err(fail(RemoteFailure::Unreachable, format!("cannot reach {url}: {t}")))
                        }
                        _ => fail(RemoteFailure::ServerError, format!("{url} dropped the request: {t}")),
                    }
                }
            };
            tries += 1;
            if tries > self.cfg.retries {
                return Err(retry);
            }
            std::thread::sleep(Duration::from_millis(200 * tries as u64));
        }
    }

    /// The text of the first choice of a chat completion.
    fn content(reply: &Value) -> Result<String, CoreError> {
        reply["choices"][0]["message"]["content"].as_str().map(str::to_string).ok_or_else(|| {
            fail(RemoteFailure::Malformed, format!("no choices[0].message.content in {}", snippet(&reply.to_string())))
        })
    }

    /// The server's probability that the schema cannot answer the question (see the module documentation).
    fn judge(&self, req: &GenerateRequest) -> Result<f32, CoreError> {
        let q = format!("{}\n\n{JUDGE_TEXT}", req.question.trim());
        let body = json!({
            "model": self.cfg.model, "messages": OpenAi::messages(req, &q), "max_tokens": 1, "temperature": 0.0,
            "logprobs": true, "top_logprobs": 10,
        });
        let reply = self.complete(&body)?;
        let (mut yes, mut no) = (0f64, 0f64);
        for t in reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"].as_array().into_iter().flatten() {
            let (tok, lp) = (
                t["token"].as_str().unwrap_or("").trim().to_lowercase(),
                t["logprob"].as_f64().unwrap_or(f64::NEG_INFINITY),
            );
            match tok.as_str() {
                "yes" => yes += lp.exp(),
                "no" => no += lp.exp(),
                _ => {}
            }
        }
        if yes + no > 0.0 {
            return Ok((no / (yes + no)) as f32);
        }
        let word = OpenAi::content(&reply)?.trim().to_lowercase();
        Ok(if word.starts_with("no") { 1.0 } else { 0.0 })
    }
}

/// The start of a long text, for error messages.
fn snippet(s: &str) -> String {
    let t: String = s.chars().take(200).collect();
    if t.len() < s.len() {
        format!("{t}…")
    } else {
        t
    }
}

impl Backend for OpenAi {
    fn generate(&mut self, req: &GenerateRequest, cancel: &dyn Fn() -> bool) -> Result<Generation, CoreError> {
        if req.rank_tables {
            // No sentence encoder here: the tables are chosen by their words.
            return Ok(Generation::ranked(Vec::new()));
        }
        if req.sampling.rows().is_empty() {
            return Err(CoreError::Inference("skip_greedy needs at least two candidates".into()));
        }
        let t0 = Instant::now();
        let p_unanswerable = if req.judge { Some(self.judge(req)?) } else { None };
        let messages = OpenAi::messages(req, &req.question);
        let seed = crate::engine::sample::prompt_seed(&req.question.bytes().map(u32::from).collect::<Vec<_>>());
        let mut cands = Vec::new();
        for i in req.sampling.rows() {
            if cancel() {
                return Err(CoreError::Cancelled);
            }
            let temperature = if i == 0 { 0.0 } else { req.sampling.temperature };
            let body = json!({
                "model": self.cfg.model, "messages": messages, "max_tokens": req.max_new_tokens,
                "temperature": temperature, "seed": seed.wrapping_add(i as u64) % (1 << 31),
            });
            let reply = self.complete(&body)?;
            let text = OpenAi::content(&reply)?;
            // The reply may or may not open a ```sql block; extraction takes the first statement either way.
            let sql = extract_sql(&text).or_else(|| extract_sql(&format!("```sql\n{text}")));
            let generated_tokens = reply["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
            cands.push(Candidate { text, sql, generated_tokens, min_p: None });
        }
        let greedy = cands.remove(0);
        let elapsed = t0.elapsed().as_secs_f64();
        Ok(Generation {
            text: greedy.text,
            sql: greedy.sql,
            prompt_tokens: 0,
            generated_tokens: greedy.generated_tokens,
            min_p: None,
            prefill_s: 0.0,
            decode_s: elapsed,
            stop: StopReason::Eos,
            prefix_tokens: 0,
            prefix_cache_hit: false,
            decoded_rows: greedy.generated_tokens + cands.iter().map(|c| c.generated_tokens).sum::<usize>(),
            twin_rows: 0,
            samples: cands,
            p_unanswerable,
            closeness: None,
            draft: Default::default(),
            table_closeness: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::backend::Exchange;

    #[test]
    fn the_conversation_is_the_one_the_local_model_sees() {
        let req = GenerateRequest {
            schema_context: "CREATE TABLE t (a integer);".into(),
            history: vec![Exchange { question: "how many?".into(), answer: "SELECT count(*) FROM tt".into() }],
            question: "ERROR: relation tt".into(),
            ..Default::default()
        };
        let m = OpenAi::messages(&req, &req.question);
        let roles: Vec<&str> = m.iter().map(|x| x["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert!(m[1]["content"].as_str().unwrap().ends_with("Question: how many?"));
        assert_eq!(m[2]["content"], "```sql\nSELECT count(*) FROM tt;\n```");
    }

    #[test]
    fn an_unreachable_server_is_classified_and_the_key_is_never_shown() {
        // A port nothing listens on (bound then released).
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut o = OpenAi::new(RemoteConfig {
            endpoint: format!("http://127.0.0.1:{port}/v1"),
            model: "m".into(),
            api_key: Some("sk-secret-123".into()),
            timeout: Duration::from_secs(2),
            retries: 0,
        });
        let e = o.generate(&GenerateRequest { question: "q".into(), ..Default::default() }, &|| false).unwrap_err();
        assert!(matches!(e, CoreError::Remote { failure: RemoteFailure::Unreachable, .. }), "{e}");
        assert!(!e.to_string().contains("sk-secret"));
        assert!(!format!("{:?}", o.cfg).contains("sk-secret"));
    }
}
