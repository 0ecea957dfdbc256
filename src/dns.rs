//! DNS-discovered servers: a server `addr` with a host name (a Kubernetes headless Service,
//! say) is resolved at start and every `resolve_interval`, and each address becomes a
//! server with the entry's weight. Changes are applied like a reload (the other servers keep
//! their state, in-flight requests finish); a failed resolution keeps the last good set.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::app::{Shared, reconcile_checkers};
use crate::config::Config;
use crate::resolve::{name_entries, resolve};
use crate::runtime::Runtime;

/// Re-resolves every name entry when its upstream's `resolve_interval` has passed, and
/// applies changed address sets. Ends at shutdown.
pub async fn run(shared: Arc<Shared>) {
    let mut last: HashMap<String, Instant> = HashMap::new();
    let mut tick = crate::timing::ticker(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let rt = shared.runtime.load_full();
        let now = Instant::now();
        let mut due = Vec::new();
        for (name, u) in &rt.config.upstreams {
            let fresh = last
                .get(name)
                .is_some_and(|t| now.duration_since(*t) < u.resolve_interval.0);
            if !fresh {
                last.insert(name.clone(), now);
                due.push(name.clone());
            }
        }
        let entries: Vec<_> = name_entries(&rt.config)
            .into_iter()
            .filter(|e| due.contains(&e.0))
            .collect();
        if entries.is_empty() {
            continue;
        }
        let cfg = Arc::clone(&rt.config);
        let results = tokio::task::spawn_blocking(move || {
            entries
                .into_iter()
                .map(|(upstream, addr, host, port)| {
                    let resolver = cfg.upstreams[&upstream].resolver.map(|a| a.0);
                    let r = resolve(&host, port, resolver);
                    (upstream, addr, r)
                })
                .collect::<Vec<_>>()
        })
        .await;
        let Ok(results) = results else { continue };
        let mut changed = false;
        {
            let mut cache = shared.dns.lock().unwrap_or_else(|e| e.into_inner());
            for (upstream, addr, r) in results {
                match r {
                    Ok(v) => {
                        shared.metrics.record_dns(&upstream, true);
                        let key = (upstream, addr);
                        if cache.get(&key) != Some(&v) {
                            tracing::info!(upstream = %key.0, server = %key.1, addresses = ?v, "resolved addresses changed");
                            cache.insert(key, v);
                            changed = true;
                        }
                    }
                    Err(e) => {
                        shared.metrics.record_dns(&upstream, false);
                        tracing::warn!(upstream = %upstream, server = %addr, error = %e, "resolution failed; keeping the last good addresses");
                    }
                }
            }
        }
        if changed {
            apply(&shared);
        }
    }
}

/// Rebuilds the current snapshot with the cached addresses (same config, same version).
fn apply(shared: &Arc<Shared>) {
    let _one_at_a_time = shared.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
    let old = shared.runtime.load_full();
    let resolved = shared.dns.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut files = old.files.clone();
    files.resolved = resolved;
    let mut rt = Runtime::build(
        Config::clone(&old.config),
        Some(&old),
        &shared.metrics,
        files,
    );
    rt.version = old.version;
    let rt = Arc::new(rt);
    old.forget_removed(&rt, &shared.metrics);
    shared.runtime.store(Arc::clone(&rt));
    reconcile_checkers(shared, &rt);
}
