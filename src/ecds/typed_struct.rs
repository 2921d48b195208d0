//! Proto3-JSON decoding of a Wasm filter carried as a `google.protobuf.Struct` (the value of a
//! TypedStruct). Covers every field of `envoy.extensions.filters.{http,network}.wasm.v3.Wasm`
//! that a Wasm plugin config uses; field names may be snake_case or lowerCamelCase, and an
//! unknown field is an error (a typo must not silently change meaning).

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{
    async_data_source, data_source, http_uri, AsyncDataSource, DataSource, HttpUri,
    RemoteDataSource, RetryPolicy,
};
use envoy_types::pb::envoy::extensions::wasm::v3::{
    plugin_config, EnvironmentVariables, FailurePolicy, PluginConfig, VmConfig,
};
use envoy_types::pb::google::protobuf::{value::Kind, Any, Duration, Struct, Value};
use prost::Message;

type Obj<'a> = &'a HashMap<String, Value>;

/// `lowerCamelCase` → `snake_case`.
fn snake(k: &str) -> String {
    let mut s = String::with_capacity(k.len() + 4);
    for c in k.chars() {
        if c.is_ascii_uppercase() {
            s.push('_');
            s.push(c.to_ascii_lowercase());
        } else {
            s.push(c);
        }
    }
    s
}

/// Iterates fields as (snake_case name, value), rejecting names not in `known`.
fn fields<'a>(o: Obj<'a>, what: &str, known: &[&str]) -> Result<Vec<(String, &'a Value)>, String> {
    let mut out = Vec::new();
    for (k, v) in o {
        let name = snake(k);
        if !known.contains(&name.as_str()) {
            return Err(format!("unknown field {k:?} in {what}"));
        }
        out.push((name, v));
    }
    Ok(out)
}

fn string(v: &Value, f: &str) -> Result<String, String> {
    match &v.kind {
        Some(Kind::StringValue(s)) => Ok(s.clone()),
        _ => Err(format!("{f}: expected a string")),
    }
}

fn boolean(v: &Value, f: &str) -> Result<bool, String> {
    match &v.kind {
        Some(Kind::BoolValue(b)) => Ok(*b),
        _ => Err(format!("{f}: expected a bool")),
    }
}

fn object<'a>(v: &'a Value, f: &str) -> Result<Obj<'a>, String> {
    match &v.kind {
        Some(Kind::StructValue(s)) => Ok(&s.fields),
        _ => Err(format!("{f}: expected an object")),
    }
}

fn duration(v: &Value, f: &str) -> Result<Duration, String> {
    let s = string(v, f)?;
    let secs = s
        .strip_suffix('s')
        .and_then(|n| n.parse::<f64>().ok())
        .filter(|n| n.is_finite() && *n >= 0.0)
        .ok_or_else(|| format!("{f}: {s:?} is not a duration like \"30s\""))?;
    Ok(Duration {
        seconds: secs.trunc() as i64,
        nanos: ((secs.fract()) * 1e9).round() as i32,
    })
}

/// `Wasm` (the object holding `config`) → its `PluginConfig`.
pub fn wasm_config(s: &Struct) -> Result<PluginConfig, String> {
    let mut config = None;
    for (k, v) in fields(&s.fields, "Wasm", &["config"])? {
        if k == "config" {
            config = Some(plugin(object(v, "config")?)?);
        }
    }
    Ok(config.unwrap_or_default())
}

fn plugin(o: Obj) -> Result<PluginConfig, String> {
    let mut p = PluginConfig::default();
    let known = [
        "name",
        "root_id",
        "vm_config",
        "configuration",
        "fail_open",
        "failure_policy",
    ];
    for (k, v) in fields(o, "PluginConfig", &known)? {
        match k.as_str() {
            "name" => p.name = string(v, "name")?,
            "root_id" => p.root_id = string(v, "root_id")?,
            "vm_config" => {
                p.vm = Some(plugin_config::Vm::VmConfig(vm_config(object(
                    v,
                    "vm_config",
                )?)?))
            }
            "configuration" => p.configuration = Some(any(v, "configuration")?),
            #[allow(deprecated)] // still sent by Istio ≤ 1.28; read for compatibility
            "fail_open" => p.fail_open = boolean(v, "fail_open")?,
            "failure_policy" => {
                let s = string(v, "failure_policy")?;
                p.failure_policy = FailurePolicy::from_str_name(&s)
                    .ok_or_else(|| format!("failure_policy: unknown value {s:?}"))?
                    as i32;
            }
            _ => {}
        }
    }
    Ok(p)
}

fn vm_config(o: Obj) -> Result<VmConfig, String> {
    let mut vm = VmConfig::default();
    let known = [
        "vm_id",
        "runtime",
        "code",
        "configuration",
        "allow_precompiled",
        "nack_on_code_cache_miss",
        "environment_variables",
    ];
    for (k, v) in fields(o, "VmConfig", &known)? {
        match k.as_str() {
            "vm_id" => vm.vm_id = string(v, "vm_id")?,
            "runtime" => vm.runtime = string(v, "runtime")?,
            "code" => vm.code = Some(code(object(v, "code")?)?),
            "configuration" => vm.configuration = Some(any(v, "vm_config.configuration")?),
            "allow_precompiled" => vm.allow_precompiled = boolean(v, "allow_precompiled")?,
            "nack_on_code_cache_miss" => {
                vm.nack_on_code_cache_miss = boolean(v, "nack_on_code_cache_miss")?
            }
            "environment_variables" => {
                vm.environment_variables = Some(env(object(v, "environment_variables")?)?)
            }
            _ => {}
        }
    }
    Ok(vm)
}

fn env(o: Obj) -> Result<EnvironmentVariables, String> {
    let mut e = EnvironmentVariables::default();
    for (k, v) in fields(o, "EnvironmentVariables", &["host_env_keys", "key_values"])? {
        match k.as_str() {
            "host_env_keys" => match &v.kind {
                Some(Kind::ListValue(l)) => {
                    for item in &l.values {
                        e.host_env_keys.push(string(item, "host_env_keys[]")?);
                    }
                }
                _ => return Err("host_env_keys: expected a list".into()),
            },
            "key_values" => {
                for (kk, vv) in object(v, "key_values")? {
                    e.key_values.insert(kk.clone(), string(vv, "key_values")?);
                }
            }
            _ => {}
        }
    }
    Ok(e)
}

fn code(o: Obj) -> Result<AsyncDataSource, String> {
    let mut out = AsyncDataSource::default();
    for (k, v) in fields(o, "AsyncDataSource", &["local", "remote"])? {
        let o = object(v, &k)?;
        out.specifier = Some(if k == "local" {
            async_data_source::Specifier::Local(local(o)?)
        } else {
            async_data_source::Specifier::Remote(remote(o)?)
        });
    }
    Ok(out)
}

fn local(o: Obj) -> Result<DataSource, String> {
    use base64::Engine;
    let mut d = DataSource::default();
    let known = [
        "filename",
        "inline_bytes",
        "inline_string",
        "environment_variable",
    ];
    for (k, v) in fields(o, "DataSource", &known)? {
        let s = string(v, &k)?;
        d.specifier = Some(match k.as_str() {
            "filename" => data_source::Specifier::Filename(s),
            "inline_bytes" => data_source::Specifier::InlineBytes(
                base64::engine::general_purpose::STANDARD
                    .decode(s.as_bytes())
                    .map_err(|e| format!("inline_bytes: {e}"))?,
            ),
            "inline_string" => data_source::Specifier::InlineString(s),
            _ => data_source::Specifier::EnvironmentVariable(s),
        });
    }
    Ok(d)
}

fn remote(o: Obj) -> Result<RemoteDataSource, String> {
    let mut r = RemoteDataSource::default();
    for (k, v) in fields(
        o,
        "RemoteDataSource",
        &["http_uri", "sha256", "retry_policy"],
    )? {
        match k.as_str() {
            "http_uri" => {
                let mut h = HttpUri::default();
                for (hk, hv) in fields(
                    object(v, "http_uri")?,
                    "HttpUri",
                    &["uri", "cluster", "timeout"],
                )? {
                    match hk.as_str() {
                        "uri" => h.uri = string(hv, "uri")?,
                        "cluster" => {
                            h.http_upstream_type =
                                Some(http_uri::HttpUpstreamType::Cluster(string(hv, "cluster")?))
                        }
                        _ => h.timeout = Some(duration(hv, "timeout")?),
                    }
                }
                r.http_uri = Some(h);
            }
            "sha256" => r.sha256 = string(v, "sha256")?,
            _ => {
                // Envoy's own retry policy is irrelevant once the code is local.
                object(v, "retry_policy")?;
                r.retry_policy = Some(RetryPolicy::default());
            }
        }
    }
    Ok(r)
}

/// A JSON `Any`: `{"@type": URL, "value": …}` for wrapper types, or the message's fields.
fn any(v: &Value, f: &str) -> Result<Any, String> {
    use envoy_types::pb::google::protobuf::{BytesValue, StringValue};
    let o = object(v, f)?;
    let t = o
        .get("@type")
        .map(|t| string(t, "@type"))
        .transpose()?
        .ok_or_else(|| format!("{f}: an Any needs \"@type\""))?;
    let value = o.get("value");
    let encoded = match t.rsplit('/').next().unwrap_or("") {
        "google.protobuf.StringValue" => StringValue {
            value: value
                .map(|v| string(v, "value"))
                .transpose()?
                .unwrap_or_default(),
        }
        .encode_to_vec(),
        "google.protobuf.BytesValue" => {
            use base64::Engine;
            let s = value
                .map(|v| string(v, "value"))
                .transpose()?
                .unwrap_or_default();
            BytesValue {
                value: base64::engine::general_purpose::STANDARD
                    .decode(s.as_bytes())
                    .map_err(|e| format!("{f}: {e}"))?,
            }
            .encode_to_vec()
        }
        "google.protobuf.Struct" => Struct {
            fields: match value {
                Some(v) => object(v, "value")?.clone(),
                None => HashMap::new(),
            },
        }
        .encode_to_vec(),
        "google.protobuf.Empty" => Vec::new(),
        other => {
            return Err(format!(
                "{f}: Any of type {other:?} is not supported inside a TypedStruct"
            ))
        }
    };
    Ok(Any {
        type_url: t,
        value: encoded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(j: serde_json::Value) -> Value {
        use serde_json::Value as J;
        let kind = match j {
            J::Null => Kind::NullValue(0),
            J::Bool(b) => Kind::BoolValue(b),
            J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
            J::String(s) => Kind::StringValue(s),
            J::Array(a) => Kind::ListValue(envoy_types::pb::google::protobuf::ListValue {
                values: a.into_iter().map(v).collect(),
            }),
            J::Object(o) => Kind::StructValue(Struct {
                fields: o.into_iter().map(|(k, x)| (k, v(x))).collect(),
            }),
        };
        Value { kind: Some(kind) }
    }

    fn st(j: serde_json::Value) -> Struct {
        match v(j).kind {
            Some(Kind::StructValue(s)) => s,
            _ => unreachable!(),
        }
    }

    #[test]
    fn decodes_camel_and_snake() {
        let s = st(serde_json::json!({"config": {
            "name": "p", "rootId": "r", "failurePolicy": "FAIL_OPEN",
            "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "{}"},
            "vm_config": {"runtime": "envoy.wasm.runtime.v8",
                "code": {"remote": {"http_uri": {"uri": "https://x/y.wasm", "timeout": "30s", "cluster": "_"}, "sha256": "ab"}},
                "environmentVariables": {"key_values": {"A": "1"}}}}}));
        let p = wasm_config(&s).unwrap();
        assert_eq!(p.root_id, "r");
        assert_eq!(p.failure_policy, FailurePolicy::FailOpen as i32);
        let Some(plugin_config::Vm::VmConfig(vm)) = p.vm else {
            panic!()
        };
        let Some(async_data_source::Specifier::Remote(r)) = vm.code.unwrap().specifier else {
            panic!()
        };
        assert_eq!(r.http_uri.unwrap().timeout.unwrap().seconds, 30);
        assert_eq!(vm.environment_variables.unwrap().key_values["A"], "1");
    }

    #[test]
    fn rejects_unknown_fields() {
        assert!(wasm_config(&st(serde_json::json!({"wrong": "value"}))).is_err());
        assert!(wasm_config(&st(
            serde_json::json!({"config": {"vm_config": {"cod": {}}}})
        ))
        .is_err());
    }
}
