//! Length-prefixed framing: a 4-byte big-endian length `N`, then `N` bytes of MessagePack.

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use serde::Serialize;

use crate::error::DecodeError;
use crate::frame::{Frame, MsgRef};

/// Bytes of the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Decodes and encodes [`Frame`]s, refusing any frame longer than `max_frame_bytes` in
/// either direction.
///
/// A payload that does not decode is consumed whole and yielded as an `Err` *item*: the
/// stream stays aligned on frame boundaries and the caller decides whether to close. Only
/// an oversized length is a stream error (the rest of the stream cannot be trusted), and
/// `tokio_util` ends a framed stream after a stream error.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame_bytes: usize,
}

impl FrameCodec {
    pub fn new(max_frame_bytes: usize) -> Self {
        Self { max_frame_bytes }
    }

    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }
}

/// An error of the framed stream: the transport or the bytes.
#[derive(Debug)]
pub enum CodecError {
    Io(std::io::Error),
    Decode(DecodeError),
}

impl From<std::io::Error> for CodecError {
    fn from(e: std::io::Error) -> Self {
        CodecError::Io(e)
    }
}

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CodecError::Io(e) => write!(f, "i/o: {e}"),
            CodecError::Decode(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for CodecError {}

impl Decoder for FrameCodec {
    type Item = Result<Frame, DecodeError>;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, CodecError> {
        if src.len() < LENGTH_PREFIX_BYTES {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_frame_bytes {
            return Err(CodecError::Decode(DecodeError::TooLarge {
                len,
                max: self.max_frame_bytes,
            }));
        }
        if src.len() < LENGTH_PREFIX_BYTES + len {
            src.reserve(LENGTH_PREFIX_BYTES + len - src.len());
            return Ok(None);
        }
        src.advance(LENGTH_PREFIX_BYTES);
        let payload = src.split_to(len);
        Ok(Some(Frame::decode(&payload)))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode_into(&frame, self.max_frame_bytes, dst)
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode_into(frame, self.max_frame_bytes, dst)
    }
}

impl Encoder<MsgRef<'_>> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, msg: MsgRef<'_>, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode_into(&msg, self.max_frame_bytes, dst)
    }
}

/// Appends `frame`'s length prefix and MessagePack map to `dst`, serialized in place (no
/// buffer of its own); a frame over `max` bytes leaves `dst` as it was.
fn encode_into<T: Serialize>(frame: &T, max: usize, dst: &mut BytesMut) -> Result<(), CodecError> {
    let start = dst.len();
    dst.put_u32(0);
    // Into memory, of plain types: cannot fail.
    rmp_serde::encode::write_named(&mut (&mut *dst).writer(), frame)
        .expect("frame serialization is infallible");
    let len = dst.len() - start - LENGTH_PREFIX_BYTES;
    if len > max {
        dst.truncate(start);
        return Err(CodecError::Decode(DecodeError::TooLarge { len, max }));
    }
    dst[start..start + LENGTH_PREFIX_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_bytes::ByteBuf;

    use super::*;

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let s = "[a-z0-9]{0,12}";
        prop_oneof![
            (s, s, any::<u32>()).prop_map(|(token, device, v)| Frame::Hello { token, device, v }),
            (
                any::<u64>(),
                s,
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..64),
                proptest::option::of(s)
            )
                .prop_map(|(seq, id, ts, body, from)| Frame::Msg {
                    seq,
                    id,
                    ts,
                    body: ByteBuf::from(body),
                    from
                }),
            any::<u64>().prop_map(|seq| Frame::Ack { seq }),
            (s, s, proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(id, to, body)| {
                Frame::Publish {
                    id,
                    to,
                    body: ByteBuf::from(body),
                }
            }),
            any::<u64>().prop_map(|n| Frame::Ping { n }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Arbitrary bytes never panic the decoder; it yields frames, waits, or errors.
        #[test]
        fn decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut codec = FrameCodec::new(256);
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..16 {
                match codec.decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }

        /// Valid frames survive any split of the byte stream into chunks.
        #[test]
        fn frames_round_trip_across_arbitrary_chunking(
            frames in proptest::collection::vec(arb_frame(), 1..8),
            cut in 1usize..64,
        ) {
            let mut codec = FrameCodec::new(1 << 20);
            let mut wire = BytesMut::new();
            for f in &frames {
                codec.encode(f, &mut wire).unwrap();
            }
            let mut out = Vec::new();
            let mut buf = BytesMut::new();
            for chunk in wire.chunks(cut) {
                buf.extend_from_slice(chunk);
                while let Some(f) = codec.decode(&mut buf).unwrap() {
                    out.push(f.unwrap());
                }
            }
            prop_assert_eq!(out, frames);
        }

        /// Bit flips in a valid frame give an error or some frame, never a panic.
        #[test]
        fn mutated_frames_never_panic(f in arb_frame(), pos in any::<usize>(), bit in 0u8..8) {
            let mut codec = FrameCodec::new(1 << 20);
            let mut wire = BytesMut::new();
            codec.encode(&f, &mut wire).unwrap();
            let i = LENGTH_PREFIX_BYTES + pos % (wire.len() - LENGTH_PREFIX_BYTES);
            wire[i] ^= 1 << bit;
            let _ = codec.decode(&mut wire);
        }
    }

    #[test]
    fn oversized_length_is_refused_before_reading_the_payload() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&[0u8, 0, 4, 1][..]); // 1025
        match codec.decode(&mut buf) {
            Err(CodecError::Decode(DecodeError::TooLarge {
                len: 1025,
                max: 1024,
            })) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn a_bad_payload_is_an_item_and_the_next_frame_still_decodes() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 2, 0xc1, 0xc1][..]);
        codec.encode(&Frame::Ping { n: 7 }, &mut buf).unwrap();
        assert!(matches!(
            codec.decode(&mut buf),
            Ok(Some(Err(DecodeError::Malformed(_))))
        ));
        assert_eq!(
            codec.decode(&mut buf).unwrap().unwrap().unwrap(),
            Frame::Ping { n: 7 }
        );
    }

    #[test]
    fn oversized_frames_are_not_encoded() {
        let mut codec = FrameCodec::new(1024);
        let big = Frame::Publish {
            id: "x".into(),
            to: "y".into(),
            body: ByteBuf::from(vec![0; 2000]),
        };
        // What was encoded before it stays, whole and alone.
        let mut dst = BytesMut::new();
        codec.encode(&Frame::Ack { seq: 7 }, &mut dst).unwrap();
        let before = dst.clone();
        assert!(codec.encode(&big, &mut dst).is_err());
        let body = vec![0; 2000];
        let msg = MsgRef::new(1, "x", 0, &body, None);
        assert!(codec.encode(msg, &mut dst).is_err());
        assert_eq!(dst, before);
        assert_eq!(
            codec.decode(&mut dst).unwrap(),
            Some(Ok(Frame::Ack { seq: 7 }))
        );
    }
}
