//! Pull secrets: the raw `.dockerconfigjson` bytes istiod puts in
//! `ISTIO_META_WASM_IMAGE_PULL_SECRET`, turned into credentials for one registry.
//! Secrets are never logged; errors describe the JSON's shape, never its values.

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;
use std::collections::HashMap;

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, Entry>,
    /// Registry host → credential helper name.
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    /// The helper for every registry without its own.
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

/// Where a registry's credentials come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// Given in the config itself.
    Auth(RegistryAuth),
    /// From `docker-credential-<name>` (see `credhelper`).
    Helper(String),
}

#[derive(Deserialize, Default)]
struct Entry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
    registrytoken: Option<String>,
}

const DOCKER_HUB: &[&str] = &["docker.io", "index.docker.io", "registry-1.docker.io"];

/// `https://index.docker.io/v1/` → `index.docker.io`.
fn key_host(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

fn same_registry(key: &str, registry: &str) -> bool {
    let h = key_host(key);
    let canonical = super::url::canonical_registry(h);
    canonical.as_deref() == Ok(registry)
        || h == registry
        || (DOCKER_HUB.contains(&h) && DOCKER_HUB.contains(&registry))
}

/// Where `registry`'s credentials come from, in docker's order: its `credHelpers` entry, else
/// `credsStore`, else its `auths` entry.
pub fn source_for(secret: &[u8], registry: &str) -> Result<Source, String> {
    let cfg = parse(secret)?;
    if let Some(name) = cfg
        .cred_helpers
        .iter()
        .find(|(k, _)| same_registry(k, registry))
        .map(|(_, n)| n)
    {
        return Ok(Source::Helper(name.clone()));
    }
    if let Some(store) = cfg.creds_store.as_ref().filter(|s| !s.is_empty()) {
        return Ok(Source::Helper(store.clone()));
    }
    auth_from(&cfg, registry).map(Source::Auth)
}

fn parse(secret: &[u8]) -> Result<DockerConfig, String> {
    let text = std::str::from_utf8(secret).map_err(|_| "not UTF-8".to_owned())?;
    if text.trim() == "null" || text.trim().is_empty() {
        return Err("empty (the referenced Secret is missing or not of type kubernetes.io/dockerconfigjson)".into());
    }
    serde_json::from_str(text).map_err(|e| {
        format!(
            "not docker config JSON (line {}, column {})",
            e.line(),
            e.column()
        )
    })
}

/// Credentials for `registry` (`host[:port]`) from a docker config JSON's `auths`. No matching
/// entry means anonymous access, as with Docker.
pub fn auth_for(secret: &[u8], registry: &str) -> Result<RegistryAuth, String> {
    auth_from(&parse(secret)?, registry)
}

fn auth_from(cfg: &DockerConfig, registry: &str) -> Result<RegistryAuth, String> {
    let Some(entry) = cfg
        .auths
        .iter()
        .find(|(k, _)| key_host(k) == registry)
        .or_else(|| cfg.auths.iter().find(|(k, _)| same_registry(k, registry)))
        .map(|(_, e)| e)
    else {
        return Ok(RegistryAuth::Anonymous);
    };
    if let Some(token) = entry.registrytoken.as_ref().filter(|t| !t.is_empty()) {
        return Ok(RegistryAuth::Bearer(token.clone()));
    }
    if let Some(token) = entry.identitytoken.as_ref().filter(|t| !t.is_empty()) {
        // An identity token is presented to the registry's token service as the password.
        let user = entry
            .username
            .clone()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "<token>".into());
        return Ok(RegistryAuth::Basic(user, token.clone()));
    }
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        if !u.is_empty() {
            return Ok(RegistryAuth::Basic(u.clone(), p.clone()));
        }
    }
    if let Some(auth) = entry.auth.as_ref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| format!("the auth field for {registry} is not base64"))?;
        let decoded = String::from_utf8(decoded)
            .map_err(|_| format!("the auth field for {registry} is not UTF-8"))?;
        let (u, p) = decoded
            .split_once(':')
            .ok_or_else(|| format!("the auth field for {registry} is not user:password"))?;
        return Ok(RegistryAuth::Basic(u.to_owned(), p.to_owned()));
    }
    Ok(RegistryAuth::Anonymous)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(a: RegistryAuth) -> (String, String) {
        match a {
            RegistryAuth::Basic(u, p) => (u, p),
            other => panic!("expected basic, got {other:?}"),
        }
    }

    #[test]
    fn forms() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("foo:bar");
        let s = format!(r#"{{"auths":{{"test.io":{{"auth":"{b64}"}}}}}}"#);
        assert_eq!(
            basic(auth_for(s.as_bytes(), "test.io").unwrap()),
            ("foo".into(), "bar".into())
        );
        let s = r#"{"auths":{"https://r:5443/v2/":{"username":"u","password":"p"}}}"#;
        assert_eq!(
            basic(auth_for(s.as_bytes(), "r:5443").unwrap()),
            ("u".into(), "p".into())
        );
        let s = r#"{"auths":{"https://index.docker.io/v1/":{"username":"u","password":"p"}}}"#;
        assert_eq!(basic(auth_for(s.as_bytes(), "docker.io").unwrap()).0, "u");
        let s = r#"{"auths":{"r":{"identitytoken":"tok"}}}"#;
        assert_eq!(basic(auth_for(s.as_bytes(), "r").unwrap()).1, "tok");
        let s = r#"{"auths":{"other":{"username":"u","password":"p"}}}"#;
        assert!(matches!(
            auth_for(s.as_bytes(), "r").unwrap(),
            RegistryAuth::Anonymous
        ));
    }

    #[test]
    fn errors_hide_values() {
        let e = auth_for(b"{\"auths\": {\"r\": {\"auth\": \"s3cr3t!!\"}}}", "r").unwrap_err();
        assert!(!e.contains("s3cr3t"), "{e}");
        assert!(auth_for(b"null", "r").is_err());
        assert!(auth_for(b"not json", "r").is_err());
    }
}
