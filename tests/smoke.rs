//! The shortest path through the proxy: one GET reaches the one upstream with its path and
//! query, and its answer comes back. If this fails, start here.
mod common;
use common::*;

#[tokio::test]
async fn forwards_to_the_upstream() {
    let a = TestUpstream::start("a").await;
    let p = TestProxy::start(&TestProxy::config(&[&a], "")).await;
    let r = get(&p.url("/hello?x=1")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.upstream(), "a");
    assert_eq!(r.json()["uri"], "/hello?x=1");
}
