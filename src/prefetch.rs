//! What `ecds-agent prefetch` fetches: the modules WasmPlugin / TrafficExtension YAML names
//! (one or many documents), or a plain list of URLs. Pure parsing; the CLI fetches.

/// One module to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub url: String,
    pub sha256: Option<String>,
    /// `IfNotPresent` / `Always` when the plugin says.
    pub pull_policy: Option<String>,
}

/// The modules `text` names: YAML documents of kind WasmPlugin (`spec.url`) or TrafficExtension
/// (`spec.wasm.url`); a text that is not such YAML is read as one URL per line. A URL without a
/// scheme is `oci://` (as istiod reads it).
pub fn wanted(text: &str) -> Result<Vec<Wanted>, String> {
    use serde::Deserialize;
    let mut out = Vec::new();
    let mut yaml = false;
    for doc in serde_yaml::Deserializer::from_str(text) {
        let Ok(v) = serde_yaml::Value::deserialize(doc) else {
            yaml = false;
            out.clear();
            break;
        };
        let kind = v.get("kind").and_then(|k| k.as_str());
        let spec = match kind {
            Some("WasmPlugin") => v.get("spec"),
            Some("TrafficExtension") => v.get("spec").and_then(|s| s.get("wasm")),
            _ => continue,
        };
        yaml = true;
        let field = |k: &str| {
            spec.and_then(|s| s.get(k))
                .and_then(|x| x.as_str())
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(str::to_owned)
        };
        let url = field("url").ok_or_else(|| {
            let name = v
                .get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(|n| n.as_str())
                .unwrap_or("?");
            format!("{} {name} has no url", kind.unwrap_or("?"))
        })?;
        out.push(Wanted {
            url: with_scheme(&url),
            sha256: field("sha256"),
            pull_policy: field("imagePullPolicy"),
        });
    }
    if yaml {
        return Ok(out);
    }
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| Wanted {
            url: with_scheme(l),
            sha256: None,
            pull_policy: None,
        })
        .collect())
}

fn with_scheme(url: &str) -> String {
    if url.contains("://") {
        url.to_owned()
    } else {
        format!("oci://{url}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_documents_and_url_lists() {
        let yaml = "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: a}\nspec:\n  url: ghcr.io/x/a:1\n  sha256: abc\n  imagePullPolicy: Always\n---\nkind: TrafficExtension\nmetadata: {name: b}\nspec:\n  wasm: {url: 'https://h/b.wasm'}\n---\nkind: Gateway\nmetadata: {name: g}\n";
        let w = wanted(yaml).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].url, "oci://ghcr.io/x/a:1");
        assert_eq!(w[0].sha256.as_deref(), Some("abc"));
        assert_eq!(w[0].pull_policy.as_deref(), Some("Always"));
        assert_eq!(w[1].url, "https://h/b.wasm");
        let list = wanted("# modules\noci://r/a:1\n\nhttps://h/b.wasm\n").unwrap();
        assert_eq!(
            list.iter().map(|w| w.url.as_str()).collect::<Vec<_>>(),
            ["oci://r/a:1", "https://h/b.wasm"]
        );
        assert!(wanted("kind: WasmPlugin\nmetadata: {name: x}\nspec: {}\n")
            .unwrap_err()
            .contains("x has no url"));
    }
}
