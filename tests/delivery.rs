//! Acceptance: ordered, gap-free delivery over TCP, TLS and WebSocket; resume after a
//! reconnect; independent device cursors; idempotent publish; mailbox restart from storage.

mod common;

use std::time::Duration;

use common::{recv_n, token, Node};
use futures::{SinkExt, StreamExt};
use warbler_client::{ConnectOptions, Connection, Frame, TlsOptions};

#[tokio::test]
async fn device_receives_http_publishes_in_order_and_resumes_after_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let mut phone = node.device("alice", "phone").await;
    assert_eq!(phone.acked, 0);
    for i in 1..=50u64 {
        assert_eq!(
            node.publish("alice", &format!("m{i}"), &format!("hello {i}"))
                .await,
            i
        );
    }
    let got = recv_n(&mut phone, 50).await;
    let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
    assert_eq!(got[6].body, b"hello 7");
    assert_eq!(got[6].id, "m7");
    phone.ack(30).await.unwrap();
    // Give the ack a moment to reach the mailbox, then disconnect mid-stream.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(phone);
    for i in 51..=60u64 {
        node.publish("alice", &format!("m{i}"), "later").await;
    }
    let mut phone = node.device("alice", "phone").await;
    assert_eq!(phone.acked, 30, "welcome carries the durable cursor");
    let rest = recv_n(&mut phone, 30).await;
    assert_eq!(
        rest.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (31..=60).collect::<Vec<_>>()
    );
    // Exactly the rest: nothing more arrives.
    let extra = tokio::time::timeout(Duration::from_millis(300), phone.recv_msg()).await;
    assert!(extra.is_err(), "unexpected extra delivery: {extra:?}");
}

#[tokio::test]
async fn two_devices_of_one_user_have_independent_cursors() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let mut phone = node.device("bob", "phone").await;
    let mut desk = node.device("bob", "desk").await;
    for i in 1..=20 {
        node.publish("bob", &format!("b{i}"), "x").await;
    }
    let p = recv_n(&mut phone, 20).await;
    let d = recv_n(&mut desk, 20).await;
    assert_eq!(
        p.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>()
    );
    assert_eq!(
        d.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>()
    );
    phone.ack(20).await.unwrap();
    desk.ack(5).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, v) = node
        .http(
            "GET",
            "/v1/users/bob/devices",
            Some(&token("bob", "device")),
            "",
        )
        .await;
    let devices = v["devices"].as_array().unwrap();
    let cursor = |name: &str| {
        devices.iter().find(|d| d["device"] == name).unwrap()["acked"]
            .as_u64()
            .unwrap()
    };
    assert_eq!((cursor("phone"), cursor("desk")), (20, 5));
    drop(phone);
    drop(desk);
    let desk = node.device("bob", "desk").await;
    assert_eq!(desk.acked, 5, "the phone's acks did not advance the desk");
    let mut desk = desk;
    assert_eq!(recv_n(&mut desk, 1).await[0].seq, 6);
    let phone = node.device("bob", "phone").await;
    assert_eq!(phone.acked, 20);
}

#[tokio::test]
async fn the_same_message_id_twice_gets_the_same_seq_and_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let a = node.publish("carol", "order-1", "first").await;
    let b = node.publish("carol", "order-2", "second").await;
    let again = node.publish("carol", "order-1", "first (retry)").await;
    assert_eq!((a, b, again), (1, 2, 1));
    // Over the device protocol too, concurrently with itself.
    let mut publisher = node.publisher().await;
    for _ in 0..3 {
        publisher
            .publish("order-3", "carol", b"third")
            .await
            .unwrap();
    }
    let mut seqs = Vec::new();
    while seqs.len() < 3 {
        if let Frame::Published { seq, .. } = publisher.recv().await.unwrap() {
            seqs.push(seq);
        }
    }
    assert_eq!(seqs, vec![3, 3, 3]);
    let history = node.history("carol").await;
    let ids: Vec<&str> = history.iter().map(|(_, id, _)| id.as_str()).collect();
    assert_eq!(ids, vec!["order-1", "order-2", "order-3"]);
    assert_eq!(
        history[0].2, "first",
        "the retry did not overwrite the original"
    );
}

#[tokio::test]
async fn idle_mailboxes_stop_and_restart_from_storage() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(
        dir.path(),
        &[("WARBLER_MAILBOX_IDLE_TIMEOUT_MS", "50")],
        &[],
    );
    assert_eq!(node.publish("dave", "d1", "x").await, 1);
    assert_eq!(node.publish("dave", "d2", "x").await, 2);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let cluster = node.status().await.expect("the node answers /v1/cluster");
    assert_eq!(
        cluster.mailboxes_active, 0,
        "the idle mailbox stopped: {cluster:?}"
    );
    assert_eq!(
        node.publish("dave", "d3", "x").await,
        3,
        "seq continues from storage"
    );
    assert_eq!(
        node.publish("dave", "d1", "x").await,
        1,
        "dedup survives the restart"
    );
}

#[tokio::test]
async fn websocket_devices_get_the_same_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", node.http))
        .await
        .unwrap();
    use tokio_tungstenite::tungstenite::Message;
    let hello = Frame::Hello {
        token: token("erin", "device"),
        device: "browser".into(),
        v: 1,
    };
    ws.send(Message::Binary(hello.encode().into()))
        .await
        .unwrap();
    assert!(matches!(
        next_frame(&mut ws).await,
        Frame::Welcome { acked: 0, .. }
    ));
    for i in 1..=5 {
        node.publish("erin", &format!("e{i}"), "via ws").await;
    }
    for i in 1..=5u64 {
        match next_frame(&mut ws).await {
            Frame::Msg { seq, body, .. } => assert_eq!((seq, &body[..]), (i, &b"via ws"[..])),
            other => panic!("expected msg, got {other:?}"),
        }
    }
    ws.send(Message::Binary(Frame::Ack { seq: 5 }.encode().into()))
        .await
        .unwrap();
    ws.send(Message::Text("not a frame".into())).await.unwrap();
    let err = next_frame(&mut ws).await;
    assert!(
        matches!(&err, Frame::Error { code, .. } if code == "malformed_frame"),
        "{err:?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(node.device("erin", "browser").await.acked, 5);
}

/// The next text message of a WebSocket, as JSON.
async fn next_json(ws: &mut Ws) -> serde_json::Value {
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Binary(b) => panic!("a JSON client got a binary message: {b:?}"),
            _ => continue,
        }
    }
}

/// A browser speaks JSON in text messages and is answered in JSON: UTF-8 bodies as strings,
/// other bytes as `body_b64`; order, acks and the cursor are the same as in MessagePack; a
/// malformed JSON frame gets an `error` in JSON and the connection closes.
#[tokio::test]
async fn websocket_json_clients_get_the_same_protocol_in_text_frames() {
    use serde_json::json;
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let url = format!("ws://{}/v1/ws", node.http);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let send = |v: serde_json::Value| Message::Text(v.to_string().into());
    let hello =
        json!({"t": "hello", "token": token("jo", "device,publish"), "device": "tab", "v": 1});
    ws.send(send(hello.clone())).await.unwrap();
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["t"], "welcome", "{welcome}");
    assert_eq!(welcome["acked"], 0);
    node.publish("jo", "j1", "héllo").await;
    ws.send(send(
        json!({"t": "publish", "id": "j2", "to": "jo", "body_b64": "AAH/"}),
    ))
    .await
    .unwrap();
    let (mut seen, mut published) = (Vec::new(), false);
    while seen.len() < 2 || !published {
        let f = next_json(&mut ws).await;
        match f["t"].as_str().unwrap() {
            "msg" => seen.push(f),
            "published" => {
                assert_eq!((f["id"].clone(), f["seq"].clone()), (json!("j2"), json!(2)));
                published = true;
            }
            other => panic!("unexpected {other}: {f}"),
        }
    }
    assert_eq!(
        (seen[0]["seq"].clone(), seen[0]["body"].clone()),
        (json!(1), json!("héllo"))
    );
    assert_eq!(
        (seen[1]["seq"].clone(), seen[1]["body_b64"].clone()),
        (json!(2), json!("AAH/"))
    );
    assert!(seen[1].get("body").is_none(), "{}", seen[1]);
    ws.send(send(json!({"t": "ack", "seq": 2}))).await.unwrap();
    ws.send(Message::Text("{not json".into())).await.unwrap();
    let err = next_json(&mut ws).await;
    assert_eq!(err["t"], "error");
    assert_eq!(err["code"], "malformed_frame", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("not JSON"),
        "{err}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(node.device("jo", "tab").await.acked, 2);
    // Reconnected, it resumes after its cursor.
    let (mut again, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    again.send(send(hello)).await.unwrap();
    assert_eq!(next_json(&mut again).await["acked"], 2);
}

#[tokio::test]
async fn tls_devices_connect_and_receive() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let node = Node::start_with(
        &dir.path().join("node"),
        &[],
        &[
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-key-file",
            key.to_str().unwrap(),
        ],
    );
    let tls = TlsOptions {
        server_name: "localhost".into(),
        ca_pem: ck.cert.pem().into_bytes(),
    };
    let opts = ConnectOptions::new(&node.client, token("frank", "device"), "phone").with_tls(tls);
    let mut conn = Connection::connect(opts).await.expect("TLS connect");
    node.publish("frank", "f1", "secret").await;
    let m = recv_n(&mut conn, 1).await;
    assert_eq!((m[0].seq, &m[0].body[..]), (1, &b"secret"[..]));
    // A plain-TCP client gets no service on the TLS port.
    let plain = tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(ConnectOptions::new(
            &node.client,
            token("frank", "device"),
            "plain",
        )),
    )
    .await
    .expect("the TLS port answers a plain client promptly");
    assert!(plain.is_err());
}

#[tokio::test]
async fn a_second_connection_of_the_same_device_replaces_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let mut first = node.device("gina", "phone").await;
    let mut second = node.device("gina", "phone").await;
    match tokio::time::timeout(Duration::from_secs(5), first.recv())
        .await
        .unwrap()
    {
        Err(warbler_client::ClientError::Server { code, .. }) => assert_eq!(code, "replaced"),
        other => panic!("expected a replaced error, got {other:?}"),
    }
    node.publish("gina", "g1", "x").await;
    assert_eq!(recv_n(&mut second, 1).await[0].seq, 1);
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_frame(ws: &mut Ws) -> Frame {
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Binary(b) => return Frame::decode(&b).unwrap(),
            _ => continue,
        }
    }
}

#[tokio::test]
async fn a_device_that_does_not_ack_gets_at_most_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(dir.path(), &[("WARBLER_INFLIGHT_MAX", "8")], &[]);
    let mut slow = node.device("hank", "phone").await;
    let mut publisher = node.publisher().await;
    for i in 1..=20 {
        publisher
            .publish_wait(&format!("h{i}"), "hank", b"x")
            .await
            .unwrap();
    }
    let first = recv_n(&mut slow, 8).await;
    assert_eq!(first.last().unwrap().seq, 8);
    let more = tokio::time::timeout(Duration::from_millis(300), slow.recv_msg()).await;
    assert!(more.is_err(), "the window of 8 was exceeded: {more:?}");
    slow.ack(5).await.unwrap();
    let next = common::recv_n_acking(&mut slow, 12).await;
    assert_eq!(
        next.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (9..=20).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn fanout_publishes_to_every_recipient_idempotently() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    node.publish("ivy", "earlier", "x").await;
    let body = r#"{"to": ["ivy", "jack", "kim"], "id": "news-1", "body": "hello all"}"#;
    let tok = token("backend", "publish");
    let (status, v) = node.http("POST", "/v1/messages", Some(&tok), body).await;
    assert_eq!(status, 200, "{v}");
    let seqs: Vec<(String, u64)> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["user"].as_str().unwrap().to_string(),
                r["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seqs,
        vec![("ivy".into(), 2), ("jack".into(), 1), ("kim".into(), 1)]
    );
    let (_, again) = node.http("POST", "/v1/messages", Some(&tok), body).await;
    assert_eq!(
        again["results"], v["results"],
        "a retried fan-out maps to the same seqs"
    );
    assert_eq!(
        node.history("kim").await,
        vec![(1, "news-1".to_string(), "hello all".to_string())]
    );
    let (status, _) = node
        .http(
            "POST",
            "/v1/messages",
            Some(&tok),
            r#"{"to": [], "id": "x", "body": "y"}"#,
        )
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn history_pages_by_after_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    for i in 1..=7 {
        node.publish("lena", &format!("l{i}"), &format!("{i}"))
            .await;
    }
    let admin = token("ops", "admin");
    let (status, v) = node
        .http(
            "GET",
            "/v1/users/lena/messages?after=2&limit=3",
            Some(&admin),
            "",
        )
        .await;
    assert_eq!(status, 200);
    let seqs: Vec<u64> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![3, 4, 5]);
    assert_eq!(v["last_seq"], 7);
    assert_eq!(v["messages"][0]["body_b64"], "Mw==");
    let (status, v) = node
        .http(
            "GET",
            "/v1/users/lena/messages?limit=5000",
            Some(&admin),
            "",
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("1..=1000"));
}

#[tokio::test]
async fn sigterm_says_bye_to_devices_and_readyz_reflects_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(dir.path(), &[("WARBLER_LAME_DUCK_MS", "1000")], &[]);
    let (status, _) = node.http("GET", "/readyz", None, "").await;
    assert_eq!(status, 200);
    let mut phone = node.device("mia", "phone").await;
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &node.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    match tokio::time::timeout(Duration::from_secs(5), phone.recv())
        .await
        .expect("bye within 5 s")
    {
        Err(warbler_client::ClientError::Bye { retry_ms, .. }) => assert!(retry_ms > 0),
        other => panic!("expected bye, got {other:?}"),
    }
}

/// Publishes pipelined on one connection keep their order per user: the k-th publish to a
/// user gets the k-th seq, also while the mailbox starts and while other users' publishes
/// are in flight beside them.
#[tokio::test]
async fn pipelined_publishes_to_one_user_keep_the_order_they_were_sent_in() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let (mut tx, mut rx) = node.publisher().await.split();
    let (users, per_user) = (8usize, 150usize);
    for k in 0..per_user {
        for u in 0..users {
            let frame = Frame::Publish {
                id: format!("u{u}-{k}"),
                to: format!("fifo-{u}"),
                body: serde_bytes::ByteBuf::from(format!("{k}").into_bytes()),
            };
            tx.send(frame).await.unwrap();
        }
    }
    let mut seq_of = std::collections::HashMap::new();
    while seq_of.len() < users * per_user {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Ok(Frame::Published { id, seq, .. })) => {
                seq_of.insert(id, seq);
            }
            other => panic!("expected published, got {other:?}"),
        }
    }
    for u in 0..users {
        let seqs: Vec<u64> = (0..per_user)
            .map(|k| seq_of[&format!("u{u}-{k}")])
            .collect();
        assert_eq!(
            seqs,
            (1..=per_user as u64).collect::<Vec<_>>(),
            "user fifo-{u}"
        );
    }
}

/// The names of a process's threads (Linux).
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

/// The client port's connections run on `limits.io_threads` threads of their own, handed
/// out in turn: connections on every one of them deliver, take acks and publish, while the
/// mailboxes live on the node's other threads.
#[tokio::test]
async fn device_connections_are_served_on_the_configured_io_threads() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(dir.path(), &[("WARBLER_IO_THREADS", "3")], &[]);
    // Six connections: two on each thread.
    let mut phones = Vec::new();
    for u in 0..6 {
        phones.push(node.device(&format!("io-user-{u}"), "phone").await);
    }
    // A thread names itself once it runs: by now each has served a connection.
    let io: Vec<String> = thread_names(node.pid())
        .into_iter()
        .filter(|n| {
            n.strip_prefix("warbler-io-")
                .is_some_and(|i| i.parse::<usize>().is_ok())
        })
        .collect();
    assert_eq!(io.len(), 3, "IO threads: {io:?}");
    for (u, phone) in phones.iter_mut().enumerate() {
        let user = format!("io-user-{u}");
        for i in 1..=20u64 {
            assert_eq!(node.publish(&user, &format!("{user}-{i}"), "hi").await, i);
        }
        let got = recv_n(phone, 20).await;
        assert_eq!(
            got.iter().map(|m| m.seq).collect::<Vec<_>>(),
            (1..=20).collect::<Vec<_>>(),
            "{user}"
        );
        phone.ack(20).await.unwrap();
    }
    // Publishing connections, one on each thread.
    for (p, phone) in phones.iter_mut().enumerate() {
        let mut publisher = node.publisher().await;
        let user = format!("io-user-{p}");
        let seq = publisher
            .publish_wait(&format!("{user}-by-{p}"), &user, b"again")
            .await
            .unwrap();
        assert_eq!(seq, 21, "{user}");
        let got = recv_n(phone, 1).await;
        assert_eq!((got[0].seq, got[0].body.as_slice()), (21, &b"again"[..]));
    }
}

/// `warbler_connection_moves_total{to="<to>"}` on `node`.
async fn connection_moves(node: &Node, to: &str) -> u64 {
    metric(
        node,
        &format!("warbler_connection_moves_total{{to=\"{to}\"}}"),
    )
    .await as u64
}

/// The value of the series `series` (name and labels) in `node`'s `/metrics`; 0 when it
/// is not there yet.
async fn metric(node: &Node, series: &str) -> f64 {
    let (_, text) = node
        .http("GET", "/metrics", Some(&token("prometheus", "ops")), "")
        .await;
    let prefix = format!("{series} ");
    text.as_str()
        .unwrap_or("")
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// `warbler_delivery_written_seconds` times each write of live messages to a device's
/// socket from when its oldest message was accepted: one count per write that carried a
/// message, so at least one and never more than the messages written.
#[tokio::test]
async fn writes_of_live_messages_are_timed_from_acceptance() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let count = "warbler_delivery_written_seconds_count";
    let sum = "warbler_delivery_written_seconds_sum";
    assert_eq!(metric(&node, count).await, 0.0, "no message written yet");
    let mut phone = node.device("walt", "phone").await;
    for i in 1..=5u64 {
        assert_eq!(node.publish("walt", &format!("w{i}"), "hi").await, i);
    }
    let got = recv_n(&mut phone, 5).await;
    assert_eq!(got.len(), 5);
    // Counted right after the write returns: the device may read first.
    let mut written = metric(&node, count).await;
    for _ in 0..20 {
        if written > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        written = metric(&node, count).await;
    }
    assert!(
        (1.0..=5.0).contains(&written),
        "{written} timed writes for 5 messages"
    );
    // Within the figures' 10 s window, and not negative.
    let seconds = metric(&node, sum).await;
    assert!((0.0..10.0 * written).contains(&seconds), "sum {seconds}");
}

/// Sends a ping and waits for its pong.
async fn ping(conn: &mut Connection, n: u64) {
    conn.send(Frame::Ping { n }).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), conn.recv())
        .await
        .unwrap_or_else(|_| panic!("ping {n} was never answered"));
    match answer.unwrap() {
        Frame::Pong { n: got } => assert_eq!(got, n),
        other => panic!("expected pong {n}, got {other:?}"),
    }
}

/// A connection whose token may only publish (a backend) has no messages to wait for: it
/// starts on its IO thread, so its first publish is read at once instead of at the quiet
/// watcher's next look (up to 50 ms later, for every backend that connects).
#[tokio::test]
async fn a_publish_only_connection_is_not_quiet_when_it_connects() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let busy_before = connection_moves(&node, "busy").await;
    let mut backend = Connection::connect(ConnectOptions::new(
        &node.client,
        token("backend", "publish"),
        "backend-1",
    ))
    .await
    .unwrap();
    for n in 1..=3u64 {
        let seq = tokio::time::timeout(
            Duration::from_secs(10),
            backend.publish_wait(&format!("b-{n}"), "busy-user", b"x"),
        )
        .await
        .expect("a publish is answered")
        .unwrap();
        assert_eq!(seq, n);
    }
    assert_eq!(
        connection_moves(&node, "busy").await - busy_before,
        0,
        "the publisher's socket started with the quiet watcher and had to move back"
    );
}

/// A connection that says only pings is quiet: its socket is watched by the thread that
/// looks at the quiet ones every 50 ms (`gateway::io`). A delivery, or any other frame,
/// moves it back to its IO thread. Through twenty moves each way, every message reaches
/// the device once and in order, and a publish the device sends in a quiet spell is read
/// and answered.
#[tokio::test]
async fn quiet_connections_move_between_watchers_without_losing_a_frame() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let mut phone = Connection::connect(ConnectOptions::new(
        &node.client,
        token("quiet-user", "device publish"),
        "phone",
    ))
    .await
    .unwrap();
    let quiet_before = connection_moves(&node, "quiet").await;
    let busy_before = connection_moves(&node, "busy").await;
    for round in 1..=10u64 {
        // Quiet: a delivery is written at once, and the socket moves back.
        ping(&mut phone, round).await;
        assert_eq!(
            node.publish("quiet-user", &format!("q-{round}"), "hi")
                .await,
            round
        );
        let got = tokio::time::timeout(Duration::from_secs(10), recv_n(&mut phone, 1))
            .await
            .unwrap_or_else(|_| panic!("round {round}: the delivery to a quiet device never came"));
        assert_eq!(
            (got[0].seq, got[0].id.as_str()),
            (round, format!("q-{round}").as_str())
        );
        phone.ack(round).await.unwrap();
        // Quiet again: the device's own publish is read from the quiet watcher.
        ping(&mut phone, 100 + round).await;
        let seq = tokio::time::timeout(
            Duration::from_secs(10),
            phone.publish_wait(&format!("from-quiet-{round}"), "quiet-peer", b"x"),
        )
        .await
        .unwrap_or_else(|_| {
            panic!("round {round}: a publish sent in a quiet spell was never answered")
        })
        .unwrap();
        assert_eq!(seq, round);
    }
    let to_quiet = connection_moves(&node, "quiet").await - quiet_before;
    let to_busy = connection_moves(&node, "busy").await - busy_before;
    // Each round moves it back twice (the delivery, the publish) and to the quiet watcher
    // twice (the pings), except the first ping: a new connection is quiet from the start.
    assert!(
        to_quiet >= 19 && to_busy >= 20,
        "the socket moved {to_quiet} times to the quiet watcher and {to_busy} back; expected at least 19 and 20"
    );
    let ids: Vec<String> = node
        .history("quiet-user")
        .await
        .into_iter()
        .map(|(_, id, _)| id)
        .collect();
    assert_eq!(ids, (1..=10).map(|r| format!("q-{r}")).collect::<Vec<_>>());
}
