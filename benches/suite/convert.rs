//! 2. ECDS conversion with a warm cache: the agent's converter over one resource and over a
//!    response of 100 resources, each naming a module that is already cached (in process: this
//!    is the agent's own code path from a decoded resource to the rewritten one).

use std::time::{Duration, Instant};

use ecds_agent::ecds::{Converter, FailureMode, Outcome};
use ecds_agent::wasm::http::HttpOptions;
use ecds_agent::wasm::tls::FetchTls;
use ecds_agent::wasm::{Cache, CacheConfig, GetOptions};

use crate::report::Sample;
use crate::support::res::{ecds_remote, Remote};
use crate::support::{ModuleServer, Route};
use crate::Mode;

async fn cache(dir: &std::path::Path) -> std::sync::Arc<Cache> {
    Cache::open(CacheConfig {
        dir: dir.to_owned(),
        expiry: Duration::from_secs(86400),
        purge_interval: Duration::from_secs(3600),
        max_module_bytes: 256 << 20,
        max_cache_bytes: 0,
        http: HttpOptions {
            request_timeout: Duration::from_secs(5),
            max_attempts: 3,
            max_bytes: 256 << 20,
            blocked: Default::default(),
        },
        tls: FetchTls::default(),
        docker_config: None,
        registries: Default::default(),
        verify: None,
        auth_ttl: Duration::from_secs(300),
    })
    .await
    .expect("cache")
}

fn sample(case: String, micros: f64, detail: String) -> Sample {
    Sample {
        section: "ECDS conversion",
        case,
        agent: format!("{micros:.1} µs per resource{detail}"),
        peer: "—".into(),
        ratio: None,
        goal: "< 50 µs".into(),
        met: Some(micros < 50.0),
        rss_mib: None,
    }
}

pub async fn run(mode: Mode) -> Vec<Sample> {
    let dir = crate::tempdir();
    let c = cache(dir.path()).await;
    let srv = ModuleServer::start().await;
    let n_mod = 100;
    let mut resources = vec![];
    for i in 0..n_mod {
        let body = crate::support::res::module(&format!("m{i}"));
        let sha = crate::support::registry::sha256_hex(&body);
        let path = format!("m{i}.wasm");
        srv.set(
            &path,
            Route {
                body,
                ..Default::default()
            },
        );
        let url = srv.url(&path);
        c.get(
            &url,
            GetOptions {
                sha256: Some(sha.clone()),
                timeout: Duration::from_secs(10),
                ..Default::default()
            },
        )
        .await
        .expect("warm the cache");
        resources.push(ecds_remote(
            &format!("extensions.istio.io/wasmplugin/bench.m{i}"),
            &url,
            &Remote {
                sha256: sha,
                ..Default::default()
            },
        ));
    }
    let conv = Converter::new(
        c.clone(),
        FailureMode::StandIn,
        ecds_agent::ecds::RetryPolicy {
            max_backoff: Duration::from_secs(60),
            permanent_recheck: Duration::from_secs(300),
        },
        Default::default(),
    );
    let iters = match mode {
        Mode::Full => 20_000,
        Mode::Smoke => 20,
    };
    let mut out = vec![];
    // The first conversion of each resource also records its pin and URL in the index.
    let t = Instant::now();
    for r in &resources {
        match conv.convert(r, ecds_agent::ecds::Load::Update).await {
            Outcome::Converted { .. } => {}
            _ => panic!("conversion failed"),
        }
    }
    let first = t.elapsed().as_secs_f64() * 1e6 / resources.len() as f64;
    out.push(sample(
        format!("warm cache, first conversion of each of {n_mod} resources"),
        first,
        String::new(),
    ));
    for per_response in [1usize, 100] {
        let t = Instant::now();
        let mut n = 0usize;
        while n < iters {
            for r in resources.iter().take(per_response) {
                match conv.convert(r, ecds_agent::ecds::Load::Update).await {
                    Outcome::Converted { .. } => n += 1,
                    _ => panic!("conversion failed"),
                }
            }
        }
        let per = t.elapsed().as_secs_f64() * 1e6 / n as f64;
        out.push(sample(
            format!("warm cache, {per_response} resource(s) per response"),
            per,
            format!(" ({n} converted)"),
        ));
    }
    let hits: usize = (0..n_mod).map(|i| srv.hits(&format!("m{i}.wasm"))).sum();
    assert_eq!(hits, n_mod, "cached conversions never touch the network");
    out
}
