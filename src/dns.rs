//! DNS-discovered servers: a server `addr` with a host name (a Kubernetes headless Service,
//! say) is resolved at start and every `resolve_interval`, and each address becomes a
//! server with the entry's weight. Changes are applied like a reload (the other servers keep
//! their state, in-flight requests finish); a failed resolution keeps the last good set.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::control::Control;
use crate::resolve::{name_entries, resolve};

/// Re-resolves every name entry when its upstream's `resolve_interval` has passed, and
/// applies changed address sets. Ends at shutdown.
pub async fn run(control: Arc<Control>) {
    let mut last: HashMap<String, Instant> = HashMap::new();
    let mut tick = crate::timing::ticker(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = control.ctx.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let rt = control.ctx.runtime.load_full();
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
        // Applying takes the control plane's lock, which a reload may hold while it reads
        // files: off the async workers.
        let c = Arc::clone(&control);
        let _ = tokio::task::spawn_blocking(move || c.update_resolved(results)).await;
    }
}
