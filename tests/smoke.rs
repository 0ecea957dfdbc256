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
