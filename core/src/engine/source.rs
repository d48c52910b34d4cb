//! Model references: a local path, or `hf:<owner>/<repo>/<file>` on the Hugging Face Hub.
//!
//! `hf:` references go through hf-hub: first its local cache (`$HF_HOME/hub`, the layout `huggingface-cli` and
//! every hf-hub client share), then — only when the caller allows it — a download. The extension never downloads
//! (a server must not fetch gigabytes from inside a background worker); `scripts/fetch-model` and the trainer do.
//! Every path that accepts `hf:` also accepts a plain file, so everything runs offline.

use crate::error::CoreError;
use std::path::{Path, PathBuf};

/// A parsed model reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    Local(PathBuf),
    Hub { repo: String, file: String, revision: Option<String> },
}

impl ModelRef {
    /// `hf:owner/repo/file.gguf`, `hf:owner/repo@rev/file.gguf`, or a filesystem path.
    pub fn parse(spec: &str) -> Result<ModelRef, CoreError> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Err(CoreError::Source("no model configured".into()));
        }
        let Some(rest) = spec.strip_prefix("hf:") else {
            return Ok(ModelRef::Local(PathBuf::from(spec)));
        };
        let mut parts = rest.splitn(3, '/');
        let (owner, repo, file) = (parts.next(), parts.next(), parts.next());
        match (owner, repo, file) {
            (Some(o), Some(r), Some(f)) if !o.is_empty() && !r.is_empty() && !f.is_empty() => {
                let (r, revision) = match r.split_once('@') {
                    Some((r, rev)) => (r, Some(rev.to_string())),
                    None => (r, None),
                };
                Ok(ModelRef::Hub { repo: format!("{o}/{r}"), file: f.to_string(), revision })
            }
            _ => {
                Err(CoreError::Source(format!("{spec:?} is not a Hub reference of the form hf:<owner>/<repo>/<file>")))
            }
        }
    }
}

/// Resolve a model reference to a readable local file. `allow_download` permits a Hub download on a cache miss.
pub fn resolve(spec: &str, allow_download: bool) -> Result<PathBuf, CoreError> {
    match ModelRef::parse(spec)? {
        ModelRef::Local(p) => check_file(&p),
        ModelRef::Hub { repo, file, revision } => resolve_hub(&repo, &file, revision, allow_download),
    }
}

fn check_file(p: &Path) -> Result<PathBuf, CoreError> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => Ok(p.to_path_buf()),
        Ok(_) => Err(CoreError::Source(format!("{} is not a file", p.display()))),
        Err(e) => Err(CoreError::Source(format!("cannot open {}: {e}", p.display()))),
    }
}

/// The Hugging Face cache directory, as every Hub client finds it: `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> Option<PathBuf> {
    match std::env::var_os("HF_HOME") {
        Some(home) => Some(PathBuf::from(home).join("hub")),
        None => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub")),
    }
}

/// `file` of `repo` at `revision` (default `main`) in the cache at `dir`, laid out as hf-hub and huggingface-cli
/// lay it out: `models--<owner>--<repo>/refs/<revision>` holds a commit, whose files are under
/// `snapshots/<commit>/`. A revision that is itself a commit is looked up under `snapshots/` directly. Read here
/// without hf-hub so a build without the `hub` feature (the extension) resolves cached models too.
pub fn hub_cached(dir: &Path, repo: &str, file: &str, revision: Option<&str>) -> Option<PathBuf> {
    let root = dir.join(format!("models--{}", repo.replace('/', "--")));
    let rev = revision.unwrap_or("main");
    let commit = match std::fs::read_to_string(root.join("refs").join(rev)) {
        Ok(c) => c.trim().to_string(),
        Err(_) => rev.to_string(),
    };
    if commit.is_empty() || commit.contains('/') || commit == ".." {
        return None;
    }
    let p = root.join("snapshots").join(commit).join(file);
    p.is_file().then_some(p)
}

fn resolve_hub(repo: &str, file: &str, revision: Option<String>, allow_download: bool) -> Result<PathBuf, CoreError> {
    let dir = hub_cache_dir();
    if let Some(p) = dir.as_deref().and_then(|d| hub_cached(d, repo, file, revision.as_deref())) {
        return check_file(&p);
    }
    if !allow_download {
        let at = dir.map(|d| d.display().to_string()).unwrap_or_else(|| "(no HOME or HF_HOME)".into());
        return Err(CoreError::Source(format!(
            "hf:{repo}/{file} is not in the Hugging Face cache at {at}; download it first, or name the file by its path"
        )));
    }
    download(repo, file, revision)
}

#[cfg(feature = "hub")]
fn download(repo: &str, file: &str, revision: Option<String>) -> Result<PathBuf, CoreError> {
    use hf_hub::{Repo, RepoType};
    let hub_repo = match revision {
        Some(rev) => Repo::with_revision(repo.to_string(), RepoType::Model, rev),
        None => Repo::model(repo.to_string()),
    };
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .with_retries(1)
        .build()
        .map_err(|e| CoreError::Source(format!("cannot start the Hub client: {e}")))?;
    api.repo(hub_repo)
        .get(file)
        .map_err(|e| CoreError::Source(format!("the Hugging Face Hub is unreachable or refused hf:{repo}/{file}: {e}")))
}

#[cfg(not(feature = "hub"))]
fn download(repo: &str, file: &str, _revision: Option<String>) -> Result<PathBuf, CoreError> {
    Err(CoreError::Source(format!("hf:{repo}/{file}: this build cannot download from the Hub (feature \"hub\")")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_references() {
        assert_eq!(ModelRef::parse("/m/a.gguf").unwrap(), ModelRef::Local("/m/a.gguf".into()));
        assert_eq!(
            ModelRef::parse("hf:Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
                .unwrap(),
            ModelRef::Hub {
                repo: "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF".into(),
                file: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf".into(),
                revision: None
            }
        );
        assert_eq!(
            ModelRef::parse("hf:o/r@main/sub/x.gguf").unwrap(),
            ModelRef::Hub { repo: "o/r".into(), file: "sub/x.gguf".into(), revision: Some("main".into()) }
        );
        assert!(ModelRef::parse("hf:onlyowner").is_err());
        assert!(ModelRef::parse("hf:o//f").is_err());
        assert!(ModelRef::parse("  ").is_err());
    }

    #[test]
    fn missing_local_file_says_so() {
        let e = resolve("/nonexistent/model.gguf", false).unwrap_err().to_string();
        assert!(e.contains("cannot open /nonexistent/model.gguf"), "{e}");
    }

    #[test]
    fn hub_reference_resolves_from_a_local_cache_without_network() {
        // Lay out a cache the way hf-hub does: models--o--r/{refs/main, snapshots/<commit>/<file>}.
        let dir = std::env::temp_dir().join(format!("copilot-hf-{}", std::process::id()));
        let snap = dir.join("models--o--r/snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(dir.join("models--o--r/refs")).unwrap();
        std::fs::write(dir.join("models--o--r/refs/main"), "abc123").unwrap();
        std::fs::write(snap.join("m.gguf"), b"GGUF").unwrap();
        assert_eq!(hub_cached(&dir, "o/r", "m.gguf", None), Some(snap.join("m.gguf")));
        // A commit as the revision, and misses: another file, another branch, a path-like revision.
        assert_eq!(hub_cached(&dir, "o/r", "m.gguf", Some("abc123")), Some(snap.join("m.gguf")));
        assert_eq!(hub_cached(&dir, "o/r", "other.gguf", None), None);
        assert_eq!(hub_cached(&dir, "o/r", "m.gguf", Some("dev")), None);
        assert_eq!(hub_cached(&dir, "o/r", "m.gguf", Some("..")), None);
        // hf-hub's own reader finds the same file.
        #[cfg(feature = "hub")]
        {
            let cache = hf_hub::Cache::new(dir.clone());
            let got = cache.repo(hf_hub::Repo::model("o/r".into())).get("m.gguf");
            assert_eq!(got, Some(snap.join("m.gguf")));
        }
        // A ref written with a trailing newline (by hand, or another client) still resolves.
        std::fs::write(dir.join("models--o--r/refs/main"), "abc123\n").unwrap();
        assert_eq!(hub_cached(&dir, "o/r", "m.gguf", None), Some(snap.join("m.gguf")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_cache_miss_without_download_permission_is_a_clear_error() {
        let e = resolve("hf:copilot-test/none/missing.gguf", false).unwrap_err().to_string();
        assert!(e.contains("not in the Hugging Face cache"), "{e}");
    }
}

/// The sha256 of a file, as lower-case hex. Reads in 4 MiB blocks.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod sha_tests {
    #[test]
    fn sha256_of_known_content() {
        let p = std::env::temp_dir().join(format!("copilot-sha-{}", std::process::id()));
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(super::sha256_file(&p).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        std::fs::remove_file(&p).unwrap();
    }
}
