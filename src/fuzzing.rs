//! Entry points for the fuzz targets (`fuzz/`, `make fuzz`) and for replaying their corpora and
//! crashers as ordinary tests (`tests/fuzz_corpus.rs`). Each takes arbitrary bytes and must never
//! panic; the few properties worth checking are asserted here, once, for both.

use std::io::Write;
use std::sync::OnceLock;

use envoy_types::pb::google::protobuf::{Any, Struct};
use prost::Message;

use crate::ecds::{env::take_hints, typed_struct::wasm_config, wasm_filter::classify};
use crate::wasm::store::Store;
use crate::wasm::unbox::{unbox as unbox_file, Boxing};

const FILTER_TYPES: &[&str] = &[
    crate::proto::type_url::HTTP_WASM,
    crate::proto::type_url::NETWORK_WASM,
    crate::proto::type_url::UDPA_TYPED_STRUCT,
    crate::proto::type_url::XDS_TYPED_STRUCT,
    crate::proto::type_url::HTTP_RBAC,
];

/// ECDS conversion's input side: the first byte picks the filter type, the rest is its value.
pub fn ecds_resource(data: &[u8]) {
    let Some((&pick, value)) = data.split_first() else {
        return;
    };
    let any = Any {
        type_url: FILTER_TYPES[usize::from(pick) % FILTER_TYPES.len()].into(),
        value: value.to_vec(),
    };
    if let Ok(Some(mut filter)) = classify(&any) {
        let _ = filter.fail_open();
        if let Some(vm) = filter.vm_config_mut() {
            let _ = take_hints(vm);
        }
        let _ = filter.encode();
    }
}

/// TypedStruct values (protobuf `Struct`, JSON-shaped) decoded strictly into a Wasm config.
pub fn typed_struct(data: &[u8]) {
    if let Ok(s) = Struct::decode(data) {
        let _ = wasm_config(&s);
    }
}

/// OCI manifest / index JSON and the selection made from it.
pub fn oci_manifest(data: &[u8]) {
    if let Ok(picked) = crate::wasm::oci::select_layer(data) {
        assert!(picked.len() <= 16, "more than 16 index entries tried");
    }
}

fn store() -> Option<&'static Store> {
    static S: OnceLock<Option<(tempfile::TempDir, Store)>> = OnceLock::new();
    S.get_or_init(|| {
        let dir = tempfile::tempdir().ok()?;
        let (store, _, _) = Store::open(dir.path()).ok()?;
        Some((dir, store))
    })
    .as_ref()
    .map(|(_, s)| s)
}

/// gzip / tar unboxing (file to file, 1 MiB cap) and streaming validation of what comes out.
pub fn unbox(data: &[u8]) {
    let Some(store) = store() else { return };
    for boxing in [Boxing::Detect, Boxing::TarGz, Boxing::Tar] {
        let Ok(mut raw) = store.temp("fuzz", 0o600) else {
            return;
        };
        if raw.file.write_all(data).is_err() {
            return;
        }
        if let Ok(out) = unbox_file(store, raw, boxing, 1 << 20) {
            let len = std::fs::metadata(&out.path).map(|m| m.len()).unwrap_or(0);
            assert!(len <= 1 << 20, "unboxed past the cap");
            let _ = crate::wasm::verify::validate_file(&out.path);
        }
    }
}

/// Docker config / pull-secret JSON for a few registries.
pub fn docker_config(data: &[u8]) {
    for registry in ["r.example:5000", "docker.io", "index.docker.io"] {
        let _ = crate::wasm::secret::source_for(data, registry);
    }
}

/// Module URL parsing and redaction: a redacted URL keeps no password.
pub fn url(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = crate::wasm::url::ModuleUrl::parse(s);
    let shown = crate::wasm::error::redact(s);
    if let Ok(u) = ::url::Url::parse(&shown) {
        assert!(u.password().is_none(), "{s:?} redacted to {shown:?}");
    }
}

/// Canonicalisation: a canonical URL is a fixed point (parsing it again gives itself), its
/// registry is canonical too, and two spellings never reach the cache as different names.
pub fn canonical(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = crate::wasm::url::canonical_registry(s);
    for url in [s.to_owned(), format!("oci://{s}"), format!("oci://{s}/r:1")] {
        let Ok(u) = crate::wasm::url::ModuleUrl::parse(&url) else {
            continue;
        };
        let c = u.canonical();
        let again = crate::wasm::url::ModuleUrl::parse(&c)
            .unwrap_or_else(|e| panic!("{url:?} → {c:?} does not parse: {e}"));
        assert_eq!(
            again.canonical(),
            c,
            "{url:?}: canonical form is not a fixed point"
        );
        assert_eq!(again.policy_name(), u.policy_name(), "{url:?}");
        if let crate::wasm::url::ModuleUrl::Oci(r) = &u {
            assert_eq!(
                crate::wasm::url::canonical_registry(&r.registry).as_deref(),
                Ok(r.registry.as_str()),
                "{url:?}"
            );
        }
    }
}

/// The streaming Wasm validator.
pub fn wasm_validate(data: &[u8]) {
    let _ = crate::wasm::verify::validate(data);
}

/// A fuzz target: arbitrary bytes in, no panic.
pub type Target = fn(&[u8]);

/// Every target by name (for the corpus replay).
pub const TARGETS: &[(&str, Target)] = &[
    ("ecds_resource", ecds_resource),
    ("typed_struct", typed_struct),
    ("oci_manifest", oci_manifest),
    ("unbox", unbox),
    ("docker_config", docker_config),
    ("url", url),
    ("canonical", canonical),
    ("wasm_validate", wasm_validate),
];
