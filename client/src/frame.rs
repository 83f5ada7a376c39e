//! Device-protocol frames. Each frame is a MessagePack map whose key `"t"` names its type.
//! Variant and field names are on the wire: renaming one is a protocol change.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::error::DecodeError;

/// The protocol version a client sends in `hello.v`.
pub const PROTOCOL_VERSION: u32 = 1;

/// One frame of the device protocol, in either direction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
pub enum Frame {
    /// Client → server, first frame: authenticate as the token's subject.
    Hello {
        token: String,
        device: String,
        v: u32,
    },
    /// Server → client: accepted; `acked` is this device's durable cursor.
    Welcome {
        user: String,
        device: String,
        node: String,
        acked: u64,
    },
    /// Server → client: one message, in increasing `seq`.
    Msg {
        seq: u64,
        id: String,
        ts: u64,
        body: ByteBuf,
        from: Option<String>,
    },
    /// Client → server: every message with `seq` ≤ this was received.
    Ack {
        seq: u64,
    },
    /// Client → server: publish `body` to user `to` with the publisher-chosen `id`.
    Publish {
        id: String,
        to: String,
        body: ByteBuf,
    },
    /// Server → client: the publish is durable.
    Published {
        id: String,
        to: String,
        seq: u64,
    },
    Ping {
        n: u64,
    },
    Pong {
        n: u64,
    },
    /// Server → client: a refused request, or why the connection closes.
    Error {
        code: String,
        message: String,
        id: Option<String>,
    },
    /// Server → client: the node is draining; reconnect elsewhere after `retry_ms`.
    Bye {
        reason: String,
        retry_ms: u64,
    },
}

/// The frame types a server or client knows, for telling "unknown type" from "bad fields".
const KNOWN_TYPES: &[&str] = &[
    "hello",
    "welcome",
    "msg",
    "ack",
    "publish",
    "published",
    "ping",
    "pong",
    "error",
    "bye",
];

/// Error codes carried in `error.code`. Stable strings: clients match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    MalformedFrame,
    FrameTooLarge,
    UnknownType,
    BadRequest,
    Unauthorized,
    Forbidden,
    BodyTooLarge,
    HelloRequired,
    Unavailable,
    Replaced,
    Overloaded,
    /// The connection sent nothing for `limits.idle_timeout_ms`, not even a `pong`.
    IdleTimeout,
    /// The token's subject publishes faster than the node allows; resend after a moment.
    RateLimited,
    /// The node's disk is below its free-space watermark; resend later or elsewhere.
    StorageFull,
    /// The recipient holds as many unacknowledged messages as retention keeps.
    MailboxFull,
    /// Messages this device had not acknowledged were removed by age retention before they
    /// could be delivered; the message names the seqs. The connection stays open.
    MessagesExpired,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::HelloRequired => "hello_required",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Replaced => "replaced",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::StorageFull => "storage_full",
            ErrorCode::MailboxFull => "mailbox_full",
            ErrorCode::MessagesExpired => "messages_expired",
            ErrorCode::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Frame {
    /// Builds an `error` frame.
    pub fn error(code: ErrorCode, message: impl Into<String>, id: Option<String>) -> Frame {
        Frame::Error {
            code: code.as_str().to_string(),
            message: message.into(),
            id,
        }
    }

    /// The frame's `"t"` value.
    pub fn type_name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "hello",
            Frame::Welcome { .. } => "welcome",
            Frame::Msg { .. } => "msg",
            Frame::Ack { .. } => "ack",
            Frame::Publish { .. } => "publish",
            Frame::Published { .. } => "published",
            Frame::Ping { .. } => "ping",
            Frame::Pong { .. } => "pong",
            Frame::Error { .. } => "error",
            Frame::Bye { .. } => "bye",
        }
    }

    /// Encodes as a MessagePack map (field names kept).
    pub fn encode(&self) -> Vec<u8> {
        // Serializing these plain types into a Vec cannot fail.
        rmp_serde::to_vec_named(self).expect("frame serialization is infallible")
    }

    /// Decodes one MessagePack value (without the length prefix).
    pub fn decode(bytes: &[u8]) -> Result<Frame, DecodeError> {
        match rmp_serde::from_slice::<Frame>(bytes) {
            Ok(frame) => Ok(frame),
            Err(err) => Err(classify(bytes, err)),
        }
    }
}

/// A `msg` frame made of borrowed parts: a node writes a stored message to each of the
/// user's devices without copying its id, body and sender into a [`Frame`] first. Its
/// bytes are those of the same [`Frame::Msg`] (a test holds the two together).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MsgRef<'a> {
    t: &'static str,
    pub seq: u64,
    pub id: &'a str,
    pub ts: u64,
    pub body: &'a serde_bytes::Bytes,
    pub from: Option<&'a str>,
}

impl<'a> MsgRef<'a> {
    pub fn new(seq: u64, id: &'a str, ts: u64, body: &'a [u8], from: Option<&'a str>) -> Self {
        MsgRef {
            t: "msg",
            seq,
            id,
            ts,
            body: serde_bytes::Bytes::new(body),
            from,
        }
    }
}

/// The JSON form of frames, for WebSocket text messages: the same maps, with `body` as a
/// UTF-8 string, or `body_b64` (standard base64) when the bytes are not UTF-8.
impl Frame {
    /// Encodes as one JSON object (`body` a string when it is UTF-8, else `body_b64`).
    pub fn encode_json(&self) -> String {
        let mut v = serde_json::to_value(self).expect("frame serialization is infallible");
        let body = match self {
            Frame::Msg { body, .. } | Frame::Publish { body, .. } => Some(body),
            _ => None,
        };
        if let (Some(body), Some(map)) = (body, v.as_object_mut()) {
            match std::str::from_utf8(body) {
                Ok(text) => {
                    map.insert("body".into(), serde_json::Value::String(text.to_string()));
                }
                Err(_) => {
                    use base64::Engine;
                    map.remove("body");
                    let b64 = base64::engine::general_purpose::STANDARD.encode(body);
                    map.insert("body_b64".into(), serde_json::Value::String(b64));
                }
            }
        }
        v.to_string()
    }

    /// Decodes one JSON object (see [`Frame::encode_json`]).
    pub fn decode_json(text: &str) -> Result<Frame, DecodeError> {
        let mut v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| DecodeError::Malformed(format!("not JSON: {e}")))?;
        let Some(map) = v.as_object_mut() else {
            return Err(DecodeError::Malformed(
                "a JSON frame must be an object".into(),
            ));
        };
        let t = match map.get("t") {
            Some(serde_json::Value::String(t)) => t.clone(),
            _ => {
                return Err(DecodeError::Malformed(
                    "the object has no string \"t\"".into(),
                ))
            }
        };
        if !KNOWN_TYPES.contains(&t.as_str()) {
            return Err(DecodeError::UnknownType(t.chars().take(64).collect()));
        }
        let bad = |message: String| DecodeError::BadFields {
            t: t.clone(),
            message,
        };
        if let Some(b64) = map.remove("body_b64") {
            use base64::Engine;
            if map.contains_key("body") {
                return Err(bad("give either body or body_b64, not both".into()));
            }
            let serde_json::Value::String(b64) = b64 else {
                return Err(bad("body_b64 must be a base64 string".into()));
            };
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| bad(format!("body_b64 is not standard base64: {e}")))?;
            map.insert("body".into(), serde_json::Value::from(bytes));
        }
        serde_json::from_value(v).map_err(|e| bad(e.to_string()))
    }
}

/// Tells apart a frame that is not a `{"t": ...}` map, an unknown type, and bad fields.
fn classify(bytes: &[u8], err: rmp_serde::decode::Error) -> DecodeError {
    #[derive(Deserialize)]
    struct Probe {
        t: String,
    }
    match rmp_serde::from_slice::<Probe>(bytes) {
        Ok(Probe { t }) if KNOWN_TYPES.contains(&t.as_str()) => DecodeError::BadFields {
            t,
            message: err.to_string(),
        },
        Ok(Probe { t }) => DecodeError::UnknownType(t.chars().take(64).collect()),
        Err(probe_err) => DecodeError::Malformed(probe_err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Hello {
                token: "tok".into(),
                device: "phone".into(),
                v: 1,
            },
            Frame::Welcome {
                user: "u".into(),
                device: "d".into(),
                node: "n".into(),
                acked: 7,
            },
            Frame::Msg {
                seq: 1,
                id: "m1".into(),
                ts: 1_700_000_000_000,
                body: ByteBuf::from(vec![0, 1, 255]),
                from: None,
            },
            Frame::Ack { seq: u64::MAX },
            Frame::Publish {
                id: "p".into(),
                to: "bob".into(),
                body: ByteBuf::from(b"hi".to_vec()),
            },
            Frame::Published {
                id: "p".into(),
                to: "bob".into(),
                seq: 3,
            },
            Frame::Ping { n: 1 },
            Frame::Pong { n: 1 },
            Frame::error(ErrorCode::Forbidden, "no", Some("x".into())),
            Frame::Bye {
                reason: "draining".into(),
                retry_ms: 500,
            },
        ]
    }

    #[test]
    fn every_frame_round_trips_as_json_with_text_or_base64_bodies() {
        for f in all_frames() {
            let text = f.encode_json();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["t"], f.type_name(), "{text}");
            assert_eq!(Frame::decode_json(&text).unwrap(), f, "{text}");
        }
        // UTF-8 bodies travel as strings, other bytes as base64.
        let publish = Frame::Publish {
            id: "p".into(),
            to: "bob".into(),
            body: ByteBuf::from("héllo".as_bytes().to_vec()),
        };
        let v: serde_json::Value = serde_json::from_str(&publish.encode_json()).unwrap();
        assert_eq!(v["body"], "héllo");
        assert!(v.get("body_b64").is_none());
        let msg = &all_frames()[2];
        let v: serde_json::Value = serde_json::from_str(&msg.encode_json()).unwrap();
        assert_eq!(v["body_b64"], "AAH/");
        assert!(v.get("body").is_none());
        // What a browser writes by hand.
        let hand = r#"{"t":"publish","id":"x","to":"bob","body_b64":"aGk="}"#;
        assert_eq!(
            Frame::decode_json(hand).unwrap(),
            Frame::Publish {
                id: "x".into(),
                to: "bob".into(),
                body: ByteBuf::from(b"hi".to_vec()),
            }
        );
    }

    #[test]
    fn bad_json_frames_say_what_is_wrong() {
        let err = |s: &str| Frame::decode_json(s).unwrap_err();
        assert!(matches!(err("{nope"), DecodeError::Malformed(m) if m.contains("not JSON")));
        assert!(matches!(err("[1,2]"), DecodeError::Malformed(m) if m.contains("object")));
        assert!(matches!(err(r#"{"seq":1}"#), DecodeError::Malformed(m) if m.contains("\"t\"")));
        assert!(matches!(err(r#"{"t":"nope"}"#), DecodeError::UnknownType(t) if t == "nope"));
        assert!(matches!(err(r#"{"t":"ack"}"#), DecodeError::BadFields { t, .. } if t == "ack"));
        let both = r#"{"t":"publish","id":"x","to":"b","body":"a","body_b64":"YQ=="}"#;
        assert!(
            matches!(err(both), DecodeError::BadFields { message, .. } if message.contains("not both"))
        );
        let b64 = r#"{"t":"publish","id":"x","to":"b","body_b64":"%%%"}"#;
        assert!(
            matches!(err(b64), DecodeError::BadFields { message, .. } if message.contains("base64"))
        );
    }

    #[test]
    fn every_frame_round_trips_and_is_a_map_with_t() {
        for f in all_frames() {
            let bytes = f.encode();
            // 0x80..=0x8f fixmap, 0xde map16: the frame is a map, not an array.
            assert!(
                bytes[0] & 0xf0 == 0x80 || bytes[0] == 0xde,
                "{f:?} is not a map"
            );
            assert_eq!(Frame::decode(&bytes).unwrap(), f);
            let t: std::collections::BTreeMap<String, rmpv_like::Any> =
                rmp_serde::from_slice(&bytes).unwrap();
            assert_eq!(t.get("t").unwrap().0.as_deref(), Some(f.type_name()));
        }
    }

    /// A tiny "any value" for inspecting maps without another dependency.
    mod rmpv_like {
        use serde::de::{Deserializer, IgnoredAny, Visitor};
        pub struct Any(pub Option<String>);
        impl<'de> serde::Deserialize<'de> for Any {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = Any;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("any")
                    }
                    fn visit_str<E>(self, v: &str) -> Result<Any, E> {
                        Ok(Any(Some(v.to_string())))
                    }
                    fn visit_u64<E>(self, _: u64) -> Result<Any, E> {
                        Ok(Any(None))
                    }
                    fn visit_bytes<E>(self, _: &[u8]) -> Result<Any, E> {
                        Ok(Any(None))
                    }
                    fn visit_unit<E>(self) -> Result<Any, E> {
                        Ok(Any(None))
                    }
                    fn visit_none<E>(self) -> Result<Any, E> {
                        Ok(Any(None))
                    }
                    fn visit_seq<A: serde::de::SeqAccess<'de>>(
                        self,
                        mut a: A,
                    ) -> Result<Any, A::Error> {
                        while a.next_element::<IgnoredAny>()?.is_some() {}
                        Ok(Any(None))
                    }
                }
                d.deserialize_any(V)
            }
        }
    }

    #[test]
    fn unknown_fields_are_ignored() {
        #[derive(Serialize)]
        struct AckPlus {
            t: &'static str,
            seq: u64,
            extra: &'static str,
        }
        let bytes = rmp_serde::to_vec_named(&AckPlus {
            t: "ack",
            seq: 9,
            extra: "x",
        })
        .unwrap();
        assert_eq!(Frame::decode(&bytes).unwrap(), Frame::Ack { seq: 9 });
    }

    #[test]
    fn a_body_sent_as_a_string_is_accepted() {
        #[derive(Serialize)]
        struct Pub {
            t: &'static str,
            id: &'static str,
            to: &'static str,
            body: &'static str,
        }
        let bytes = rmp_serde::to_vec_named(&Pub {
            t: "publish",
            id: "1",
            to: "u",
            body: "hey",
        })
        .unwrap();
        let Frame::Publish { body, .. } = Frame::decode(&bytes).unwrap() else {
            panic!()
        };
        assert_eq!(&body[..], b"hey");
    }

    #[test]
    fn a_borrowed_msg_encodes_as_the_msg_frame() {
        for from in [None, Some("alice")] {
            let frame = Frame::Msg {
                seq: 42,
                id: "m-1".into(),
                ts: 1_700_000_000_123,
                body: ByteBuf::from(vec![0u8, 1, 2, 255]),
                from: from.map(String::from),
            };
            let borrowed = MsgRef::new(42, "m-1", 1_700_000_000_123, &[0, 1, 2, 255], from);
            let bytes = rmp_serde::to_vec_named(&borrowed).unwrap();
            assert_eq!(bytes, frame.encode());
            assert_eq!(Frame::decode(&bytes).unwrap(), frame);
        }
    }

    #[test]
    fn decode_errors_are_classified() {
        #[derive(Serialize)]
        struct T {
            t: &'static str,
        }
        let unknown = rmp_serde::to_vec_named(&T { t: "launch" }).unwrap();
        assert_eq!(
            Frame::decode(&unknown),
            Err(DecodeError::UnknownType("launch".into()))
        );
        let bad = rmp_serde::to_vec_named(&T { t: "ack" }).unwrap();
        assert!(matches!(
            Frame::decode(&bad),
            Err(DecodeError::BadFields { .. })
        ));
        assert!(matches!(
            Frame::decode(b"\xc1garbage"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            Frame::decode(&[0x93, 1, 2, 3]),
            Err(DecodeError::Malformed(_))
        ));
    }
}
