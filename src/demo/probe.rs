//! A stand-in for Envoy when none is installed: subscribes to one ECDS resource through the
//! agent, prints what arrives (the local file Envoy would load) and ACKs it.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{
    async_data_source, data_source, TypedExtensionConfig,
};
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm as HttpWasm;
use envoy_types::pb::envoy::extensions::wasm::v3::plugin_config;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Endpoint;

use crate::config::ListenAddr;
use crate::proto::type_url;

/// What an ECDS resource tells Envoy to load, in one line.
pub fn describe(resource: &Any) -> String {
    let Ok(tec) = TypedExtensionConfig::decode(resource.value.as_slice()) else {
        return "undecodable resource".into();
    };
    let Some(tc) = tec.typed_config else {
        return format!("{}: no typed_config", tec.name);
    };
    if tc.type_url != type_url::HTTP_WASM {
        return format!(
            "{}: {} (stand-in)",
            tec.name,
            tc.type_url.rsplit('/').next().unwrap_or("")
        );
    }
    let code = HttpWasm::decode(tc.value.as_slice())
        .ok()
        .and_then(|w| w.config)
        .and_then(|c| c.vm)
        .and_then(|plugin_config::Vm::VmConfig(vm)| vm.code)
        .and_then(|c| c.specifier);
    match code {
        Some(async_data_source::Specifier::Local(d)) => match d.specifier {
            Some(data_source::Specifier::Filename(f)) => {
                format!("{}: Wasm, local file {f}", tec.name)
            }
            _ => format!("{}: Wasm, inline code", tec.name),
        },
        Some(async_data_source::Specifier::Remote(r)) => {
            format!(
                "{}: Wasm, REMOTE {}",
                tec.name,
                r.http_uri.map(|h| h.uri).unwrap_or_default()
            )
        }
        None => format!("{}: Wasm without code", tec.name),
    }
}

pub async fn run(xds: &ListenAddr, resource: &str, wait: Duration) -> anyhow::Result<()> {
    let channel = match xds {
        ListenAddr::Tcp(a) => {
            Endpoint::from_shared(format!("http://{a}"))?
                .connect()
                .await?
        }
        ListenAddr::Unix(p) => {
            let p = p.clone();
            Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                    let p = p.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(p).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }))
                .await?
        }
    };
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(DiscoveryRequest {
        type_url: type_url::ECDS.into(),
        resource_names: vec![resource.into()],
        ..Default::default()
    })?;
    println!("[probe] → ECDS subscribe {resource}");
    let mut responses = client
        .stream_aggregated_resources(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = tokio::time::timeout(wait, responses.message())
        .await
        .map_err(|_| anyhow::anyhow!("no ECDS response within {wait:?}"))??
        .ok_or_else(|| anyhow::anyhow!("stream ended"))?;
    for r in &first.resources {
        println!("[probe] ← {}", describe(r));
    }
    tx.send(DiscoveryRequest {
        type_url: type_url::ECDS.into(),
        resource_names: vec![resource.into()],
        version_info: first.version_info.clone(),
        response_nonce: first.nonce.clone(),
        ..Default::default()
    })?;
    println!(
        "[probe] → ACK version {} nonce {}",
        first.version_info, first.nonce
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}
