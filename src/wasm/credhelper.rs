//! Docker credential helpers: `credHelpers` / `credsStore` in a docker config (a pull secret or
//! `--docker-config`) name a program `docker-credential-<name>` that prints credentials for a
//! registry. It runs off the async threads' way (tokio process), with the registry host on
//! stdin, a 5 s deadline and a 64 KiB cap on what it prints; answers are cached for 60 s (at
//! most 256 of them).
//! Nothing it prints is ever logged or put in an error: errors name the helper, its exit status
//! and the shape of what was wrong.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use oci_client::secrets::RegistryAuth;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEADLINE: Duration = Duration::from_secs(5);
const CACHE_FOR: Duration = Duration::from_secs(60);
const MAX_OUTPUT: u64 = 64 << 10;
/// Answers remembered at most (helper × registry); expired ones go first, then the oldest.
const MAX_CACHED: usize = 256;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Answer {
    #[serde(default)]
    username: String,
    secret: String,
}

/// Runs helpers and remembers their answers briefly.
#[derive(Default)]
pub struct CredHelpers {
    cache: Mutex<HashMap<(String, String), (Instant, RegistryAuth)>>,
}

/// Whether `name` may be part of a program name (a pull secret comes from the control plane).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl CredHelpers {
    /// Credentials for `registry` from `docker-credential-<name> get`.
    pub async fn get(&self, name: &str, registry: &str) -> Result<RegistryAuth, String> {
        if !valid_name(name) {
            return Err(format!(
                "credential helper name {name:?} is not a plain program name"
            ));
        }
        let key = (name.to_owned(), registry.to_owned());
        if let Some((at, auth)) = self.lock().get(&key) {
            if at.elapsed() < CACHE_FOR {
                return Ok(auth.clone());
            }
        }
        let auth = run(name, registry).await?;
        let mut cache = self.lock();
        if !cache.contains_key(&key) && cache.len() >= MAX_CACHED {
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_FOR);
            if cache.len() >= MAX_CACHED {
                if let Some(oldest) = cache
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(k, _)| k.clone())
                {
                    cache.remove(&oldest);
                }
            }
        }
        cache.insert(key, (Instant::now(), auth.clone()));
        Ok(auth)
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(String, String), (Instant, RegistryAuth)>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn run(name: &str, registry: &str) -> Result<RegistryAuth, String> {
    let program = format!("docker-credential-{name}");
    let mut child = tokio::process::Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run credential helper {program}: {e}"))?;
    let talk = async {
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(registry.as_bytes()).await.ok();
        }
        let mut out = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            stdout
                .take(MAX_OUTPUT + 1)
                .read_to_end(&mut out)
                .await
                .map_err(|e| format!("credential helper {program}: {e}"))?;
        }
        let status = child
            .wait()
            .await
            .map_err(|e| format!("credential helper {program}: {e}"))?;
        Ok::<_, String>((status, out))
    };
    let (status, out) = tokio::time::timeout(DEADLINE, talk)
        .await
        .map_err(|_| format!("credential helper {program} did not answer within {DEADLINE:?}"))??;
    if !status.success() {
        return Err(format!(
            "credential helper {program} failed for {registry} ({status})"
        ));
    }
    if out.len() as u64 > MAX_OUTPUT {
        return Err(format!(
            "credential helper {program} printed more than {MAX_OUTPUT} bytes"
        ));
    }
    let answer: Answer = serde_json::from_slice(&out).map_err(|_| {
        format!(
            "credential helper {program} printed no credentials JSON ({{\"Username\", \"Secret\"}}; {} bytes)",
            out.len()
        )
    })?;
    if answer.secret.is_empty() {
        return Err(format!(
            "credential helper {program} returned an empty secret for {registry}"
        ));
    }
    // "<token>" as the user name means the secret is an identity token; it goes to the
    // registry's token service as the password, as docker does.
    Ok(RegistryAuth::Basic(
        if answer.username.is_empty() {
            "<token>".into()
        } else {
            answer.username
        },
        answer.secret,
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_plain() {
        assert!(super::valid_name("ecr-login") && super::valid_name("gcloud"));
        for bad in ["", "../../bin/sh", "a b", "x;rm"] {
            assert!(!super::valid_name(bad), "{bad}");
        }
    }
}
