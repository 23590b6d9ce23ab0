//! Bearer tokens, read from a file (a mounted Secret) and reloaded without a
//! restart: Kubernetes updates a Secret volume by swapping its `..data`
//! symlink, so the file's content is re-read every `--auth-reload-secs`, and at
//! most once a second when a request presents a token that does not match
//! (so a client that got the new token before the pod's next poll is served).
//! Comparison is constant-time per token. A token never reaches a log line:
//! `Debug` prints how many there are, and reload messages name only the file.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

/// Fewest seconds between two reloads triggered by unknown tokens.
const RELOAD_ON_MISS_EVERY: Duration = Duration::from_secs(1);

/// The accepted bearer tokens (empty and file-less: auth is off).
#[derive(Clone)]
pub struct AuthTokens {
    inner: Arc<Inner>,
}

struct Inner {
    file: Option<PathBuf>,
    tokens: RwLock<Arc<Vec<Vec<u8>>>>,
    last_load: Mutex<Instant>,
}

impl std::fmt::Debug for AuthTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthTokens")
            .field("file", &self.inner.file)
            .field("tokens", &self.current().len())
            .finish()
    }
}

/// Tokens in a file's text: one per line, blank lines and `#` comments skipped.
pub fn parse_tokens(text: &str) -> Vec<Vec<u8>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.as_bytes().to_vec())
        .collect()
}

fn load(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let tokens = parse_tokens(&text);
    if tokens.is_empty() {
        return Err("no token in file".to_owned());
    }
    Ok(tokens)
}

impl AuthTokens {
    fn build(file: Option<PathBuf>, tokens: Vec<Vec<u8>>) -> Self {
        Self {
            inner: Arc::new(Inner {
                file,
                tokens: RwLock::new(Arc::new(tokens)),
                last_load: Mutex::new(Instant::now()),
            }),
        }
    }

    /// No auth: every request is let in.
    pub fn disabled() -> Self {
        Self::build(None, Vec::new())
    }

    /// A fixed set of tokens (tests).
    pub fn fixed<S: AsRef<str>>(tokens: &[S]) -> Self {
        Self::build(
            None,
            tokens
                .iter()
                .map(|t| t.as_ref().as_bytes().to_vec())
                .collect(),
        )
    }

    /// Reads `path`; fails (with a reason that holds no token) when it is
    /// unreadable or holds no token.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        Ok(Self::build(Some(path.to_owned()), load(path)?))
    }

    /// Whether requests need a token.
    pub fn enabled(&self) -> bool {
        self.inner.file.is_some() || !self.current().is_empty()
    }

    fn current(&self) -> Arc<Vec<Vec<u8>>> {
        self.inner
            .tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether `presented` is one of the tokens, comparing against every one
    /// without stopping early.
    pub fn matches(&self, presented: &str) -> bool {
        let presented = presented.trim().as_bytes();
        let mut ok = subtle::Choice::from(0u8);
        for t in self.current().iter() {
            ok |= t.as_slice().ct_eq(presented);
        }
        !presented.is_empty() && bool::from(ok)
    }

    /// Re-reads the file; keeps the previous tokens when it is unreadable or
    /// empty (a Secret being swapped). Returns whether the tokens changed.
    pub fn reload(&self) -> bool {
        let Some(path) = &self.inner.file else {
            return false;
        };
        *self
            .inner
            .last_load
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Instant::now();
        match load(path) {
            Ok(tokens) => {
                let mut cur = self.inner.tokens.write().unwrap_or_else(|e| e.into_inner());
                if **cur == tokens {
                    return false;
                }
                let n = tokens.len();
                *cur = Arc::new(tokens);
                tracing::info!(file = %path.display(), tokens = n, "auth tokens reloaded");
                true
            }
            Err(reason) => {
                tracing::warn!(file = %path.display(), error = %reason, "could not reload auth tokens; keeping the previous ones");
                false
            }
        }
    }

    /// Whether the request's `Authorization` header value carries a valid
    /// bearer token. An unknown token re-reads the file first (at most once a
    /// second), so a rotated Secret is honoured as soon as it is on disk.
    pub async fn authorize(&self, header: Option<&str>) -> bool {
        if !self.enabled() {
            return true;
        }
        let Some(presented) = header.and_then(|v| v.strip_prefix("Bearer ")) else {
            return false;
        };
        if self.matches(presented) {
            return true;
        }
        let due = {
            let last = self
                .inner
                .last_load
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.inner.file.is_some() && last.elapsed() >= RELOAD_ON_MISS_EVERY
        };
        if !due {
            return false;
        }
        let me = self.clone();
        let changed = tokio::task::spawn_blocking(move || me.reload())
            .await
            .unwrap_or(false);
        changed && self.matches(presented)
    }

    /// Re-reads the file every `every` until dropped (a no-op without a file).
    pub async fn watch(self, every: Duration) {
        if self.inner.file.is_none() {
            return;
        }
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.reload()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn checks_missing_wrong_and_right_tokens() {
        let auth = AuthTokens::fixed(&["s3cret", "other"]);
        assert!(!auth.authorize(None).await);
        assert!(!auth.authorize(Some("s3cret")).await, "no Bearer prefix");
        assert!(!auth.authorize(Some("Bearer s3cre")).await);
        assert!(!auth.authorize(Some("Bearer s3cret2")).await);
        assert!(!auth.authorize(Some("Bearer ")).await);
        assert!(auth.authorize(Some("Bearer other")).await);
        assert!(auth.authorize(Some("Bearer s3cret")).await);
        assert!(AuthTokens::disabled().authorize(None).await);
    }

    #[tokio::test]
    async fn a_secret_swapped_by_symlink_is_picked_up_and_a_broken_one_keeps_the_old_tokens() {
        // The layout kubelet writes: tokens -> ..data/tokens, ..data -> ..v1.
        let dir = tempfile::tempdir().unwrap();
        let v1 = dir.path().join("..v1");
        std::fs::create_dir(&v1).unwrap();
        std::fs::write(v1.join("tokens"), "old-token\n").unwrap();
        std::os::unix::fs::symlink("..v1", dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/tokens", dir.path().join("tokens")).unwrap();
        let auth = AuthTokens::from_file(&dir.path().join("tokens")).unwrap();
        assert!(auth.authorize(Some("Bearer old-token")).await);
        assert!(!auth.authorize(Some("Bearer new-token")).await);

        let v2 = dir.path().join("..v2");
        std::fs::create_dir(&v2).unwrap();
        std::fs::write(v2.join("tokens"), "# rotated\nnew-token\n").unwrap();
        std::os::unix::fs::symlink("..v2", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        assert!(auth.reload(), "the swap changes the tokens");
        assert!(auth.authorize(Some("Bearer new-token")).await);
        assert!(!auth.authorize(Some("Bearer old-token")).await);

        // A file emptied or removed mid-swap keeps the last good tokens.
        std::fs::write(v2.join("tokens"), "\n").unwrap();
        assert!(!auth.reload());
        assert!(auth.authorize(Some("Bearer new-token")).await);
        std::fs::remove_file(v2.join("tokens")).unwrap();
        assert!(!auth.reload());
        assert!(auth.authorize(Some("Bearer new-token")).await);
    }

    #[tokio::test]
    async fn an_unknown_token_reloads_at_most_once_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "a\n").unwrap();
        let auth = AuthTokens::from_file(&path).unwrap();
        std::fs::write(&path, "b\n").unwrap();
        // Loaded just now: a miss does not re-read yet.
        assert!(!auth.authorize(Some("Bearer b")).await);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !auth.authorize(Some("Bearer b")).await {
            assert!(Instant::now() < deadline, "rotated token never accepted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!auth.authorize(Some("Bearer a")).await);
    }

    #[test]
    fn debug_never_shows_a_token() {
        let auth = AuthTokens::fixed(&["hunter2-very-secret"]);
        let shown = format!("{auth:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("tokens: 1"), "{shown}");
    }
}
