//! The deployment files the docs point to are valid YAML, their probes use the agent's health
//! endpoints, and every file the README and docs/istio.md link exists.

use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn deploy_files_are_valid_yaml_with_health_probes() {
    for name in [
        "deploy/sidecar.yaml",
        "deploy/istio-chained.yaml",
        "deploy/istiod-direct.yaml",
    ] {
        let text = std::fs::read_to_string(root().join(name)).unwrap();
        let mut docs = 0;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
            if !v.is_null() {
                docs += 1;
            }
        }
        assert!(docs > 0, "{name} holds no document");
        assert!(
            text.contains("path: /healthz/ready"),
            "{name}: no readiness probe"
        );
        assert!(text.contains("ecds-agent"), "{name}");
    }
}

#[test]
fn linked_files_exist() {
    for (doc, links) in [
        (
            "README.md",
            vec![
                "docs/istio.md",
                "deploy/sidecar.yaml",
                "deploy/istio-chained.yaml",
                "vendor/README.md",
                "Containerfile",
            ],
        ),
        (
            "docs/istio.md",
            vec!["deploy/istio-chained.yaml", "deploy/istiod-direct.yaml"],
        ),
    ] {
        let text = std::fs::read_to_string(root().join(doc)).unwrap();
        for l in links {
            assert!(text.contains(l), "{doc} does not mention {l}");
            assert!(root().join(l).exists(), "{doc} links {l}, which is missing");
        }
    }
}

use serde::Deserialize;
