//! Bounded fuzzing of every parser a peer can reach before it is trusted: the `¶` codec, the
//! cluster handshake, and the bearer-token verifier. Inputs come from proptest: random bytes,
//! and valid frames or tokens mutated and cut at random points, and JSON nested 100,000 deep. The
//! properties: nothing panics, the decoder's buffer stays within its frame limit, a valid frame
//! still decodes after garbage, and a token is never accepted once any byte of it changed.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use proptest::prelude::*;
use serde_json::json;
use shared::{
    codec::{encode_frame, PacketCodec},
    token::{mint, TokenRequest, TokenVerifier},
    Packet,
};
use tokio_util::codec::Decoder;

const MAX_FRAME: usize = 4096;

fn valid_frame() -> Vec<u8> {
    encode_frame(&Packet {
        key: 9,
        ..Packet::request(
            "PUT",
            "/kv",
            json!({"value": "héllo ¶ wörld", "n": [1, 2, 3]}),
        )
    })
    .unwrap()
    .to_vec()
}

/// Feeds `input` in `chunks`, decoding after each; returns the packets decoded. Never panics
/// and never lets the buffer grow past one frame limit plus one chunk.
fn feed(codec: &mut PacketCodec, input: &[u8], chunk: usize) -> Vec<Packet> {
    let mut buf = BytesMut::new();
    let mut packets = Vec::new();
    for piece in input.chunks(chunk.max(1)) {
        buf.put_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(packet)) => packets.push(packet),
                Ok(None) => break,
                Err(err) if err.is_recoverable() => continue,
                Err(_) => return packets,
            }
        }
        assert!(
            buf.len() <= MAX_FRAME + chunk.max(1) + 2,
            "the buffer grew to {} bytes",
            buf.len()
        );
    }
    packets
}

fn mutated(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = base.len();
    proptest::collection::vec((0..len, any::<u8>()), 1..8).prop_map(move |edits| {
        let mut bytes = base.clone();
        for (at, byte) in edits {
            bytes[at] = byte;
        }
        bytes
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_the_codec(input in proptest::collection::vec(any::<u8>(), 0..8192),
                                          chunk in 1usize..512) {
        let mut codec = PacketCodec::with_max_frame_length(MAX_FRAME);
        feed(&mut codec, &input, chunk);
    }

    #[test]
    fn mutated_frames_never_panic_and_a_valid_frame_still_gets_through(
        garbage in mutated(valid_frame()),
        chunk in 1usize..64,
    ) {
        let mut codec = PacketCodec::with_max_frame_length(MAX_FRAME);
        // Garbage, a delimiter to end whatever it started, then a good frame.
        let mut input = garbage;
        input.extend_from_slice("¶".as_bytes());
        input.extend_from_slice(&valid_frame());
        let packets = feed(&mut codec, &input, chunk);
        prop_assert!(packets.iter().any(|packet| packet.key == 9 && packet.params["n"] == json!([1, 2, 3])));
    }

    #[test]
    fn oversized_input_is_refused_within_the_limit(size in MAX_FRAME..4 * MAX_FRAME, chunk in 64usize..2048) {
        let mut codec = PacketCodec::with_max_frame_length(MAX_FRAME);
        let mut input = vec![b'x'; size];
        input.extend_from_slice("¶".as_bytes());
        input.extend_from_slice(&valid_frame());
        let packets = feed(&mut codec, &input, chunk);
        prop_assert_eq!(packets.len(), 1);
    }
}

fn token() -> String {
    let scopes = ["kv:read".to_owned()];
    mint(
        b"fuzz-secret",
        &TokenRequest {
            subject: "alice",
            scopes: &scopes,
            ttl: Duration::from_secs(600),
            audience: None,
            issuer: None,
        },
    )
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn random_strings_are_never_tokens(text in "\\PC{0,400}") {
        prop_assert!(TokenVerifier::from_secret(b"fuzz-secret").verify(&text).is_err());
    }

    #[test]
    fn a_token_with_any_byte_changed_is_refused(token in mutated(token().into_bytes())) {
        let original = self::token();
        let verifier = TokenVerifier::from_secret(b"fuzz-secret");
        let Ok(text) = String::from_utf8(token) else { return Ok(()) };
        // A change that decodes to the same bytes (base64url's unused low bits of the last
        // character) is the same token; every other change must be refused.
        if let Ok(identity) = verifier.verify(&text) {
            prop_assert_eq!(identity.sub.as_deref(), Some("alice"));
            prop_assert!(same_token_bytes(&text, &original));
        }
    }

    #[test]
    fn cut_tokens_are_refused(cut in 0usize..200) {
        let token = token();
        let cut = cut.min(token.len() - 1);
        prop_assert!(TokenVerifier::from_secret(b"fuzz-secret").verify(&token[..cut]).is_err());
    }
}

/// True when two tokens carry the same bytes once each part is base64url-decoded.
fn same_token_bytes(a: &str, b: &str) -> bool {
    let parts =
        |token: &str| -> Option<Vec<Vec<u8>>> { token.split('.').map(base64url_decode).collect() };
    parts(a).is_some() && parts(a) == parts(b)
}

fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for c in text.bytes() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        } as u32;
        bits = (bits << 6) | value;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    Some(out)
}

#[test]
fn a_frame_nested_a_hundred_thousand_deep_is_an_error_not_a_crash() {
    let depth = 100_000;
    let mut input = format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes();
    input.extend_from_slice("¶".as_bytes());
    input.extend_from_slice(&valid_frame());
    let mut codec = PacketCodec::<Packet>::with_max_frame_length(4 * depth);
    let mut buf = BytesMut::from(&input[..]);
    assert!(codec.decode(&mut buf).is_err(), "too deep: an error");
    let next = codec.decode(&mut buf).expect("the next frame decodes");
    assert_eq!(next.map(|packet| packet.key), Some(9));
}
