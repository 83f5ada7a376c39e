//! The pages a node serves: the demo chat only where the demo is on (it mints tokens for
//! anyone), its token endpoint, the console and its per-node figures behind an ops token.
//! What a person sees in a browser is tested by the browser tests; this checks what the
//! node serves and refuses.

mod common;

use common::{http_raw, token, Node};
use warbler_client::{ConnectOptions, Connection};

#[tokio::test]
async fn the_demo_is_off_unless_asked_for_and_the_console_needs_an_ops_token() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    for (method, path) in [
        ("GET", "/demo/"),
        ("GET", "/demo/warbler.js"),
        ("POST", "/demo/token"),
    ] {
        let (status, body) = http_raw(&node.http, method, path, None, br#"{"user":"x"}"#).await;
        assert_eq!(status, 404, "{method} {path}: {body}");
        assert!(body.contains("warbler dev"), "{body}");
    }
    let (status, page) = http_raw(&node.http, "GET", "/console/", None, b"").await;
    assert_eq!(status, 200);
    assert!(page.contains("<title>Warbler console</title>"), "{page}");
    let (status, js) = http_raw(&node.http, "GET", "/console/console.js", None, b"").await;
    assert_eq!(status, 200);
    assert!(js.contains("export function partitionFlag"));
    // Its data: refused without a token and with a device token.
    let (status, _) = http_raw(&node.http, "GET", "/console/stats", None, b"").await;
    assert_eq!(status, 401);
    let device = token("amy", "device");
    let (status, _) = http_raw(&node.http, "GET", "/console/stats", Some(&device), b"").await;
    assert_eq!(status, 403);
    let ops = token("op", "ops");
    let (status, body) = http_raw(&node.http, "GET", "/console/stats", Some(&ops), b"").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v.is_object(), "{v}");
}

#[tokio::test]
async fn the_demo_serves_its_page_and_sdk_and_mints_working_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(dir.path(), &[("WARBLER_DEMO", "true")], &[]);
    let (status, page) = http_raw(&node.http, "GET", "/demo/", None, b"").await;
    assert_eq!(status, 200);
    assert!(page.contains("<title>Warbler demo chat</title>"), "{page}");
    let (status, sdk) = http_raw(&node.http, "GET", "/demo/warbler.js", None, b"").await;
    assert_eq!(status, 200);
    assert_eq!(
        sdk,
        include_str!("../sdk/js/warbler.js"),
        "the SDK file itself"
    );
    for bad in [r#"{"user":""}"#, r#"{"user":"a b"}"#, "nope"] {
        let (status, body) =
            http_raw(&node.http, "POST", "/demo/token", None, bad.as_bytes()).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (status, body) = http_raw(
        &node.http,
        "POST",
        "/demo/token",
        None,
        br#"{"user":"amy"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let minted = v["token"].as_str().unwrap().to_string();
    // The token works for amy's devices and for publishing.
    let mut conn = Connection::connect(ConnectOptions::new(
        node.client.clone(),
        minted,
        "tab".to_string(),
    ))
    .await
    .expect("the demo token is accepted");
    assert_eq!(conn.user, "amy");
    let seq = conn.publish_wait("d1", "bob", b"hi bob").await.unwrap();
    assert_eq!(seq, 1);
}
