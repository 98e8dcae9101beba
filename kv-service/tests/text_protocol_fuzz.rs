//! Bounded fuzzing of the text protocol's codecs with proptest: random bytes, and valid request
//! streams (auth among them) with a few bytes mutated, fed in pieces split at random points.
//! Whatever arrives, the decoders never panic, consume all they are given, yield only requests
//! within the limits, and every answer they lead to stays short; unmutated streams decode to
//! exactly the requests that were encoded, however they are split.

use bytes::BytesMut;
use kv_service::text_protocol::{
    DecodeError, Frame, Reply, ReplyCodec, Request, RequestCodec, Token, MAX_TOKEN_BYTES,
};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

/// Small limits, so that random input crosses them often.
const MAX_KEY: usize = 24;
const MAX_VALUE: usize = 64;

/// The longest error message a malformed request may earn: a reason names at most a 16-byte
/// command word or one byte, never the request's body.
const MAX_REASON: usize = 120;

/// What decoding a whole input in pieces gave: the frames, and the fatal error that ended it.
struct Decoded {
    frames: Vec<Frame>,
    fatal: Option<String>,
}

/// Feeds `input` to a fresh codec in pieces ending at `cuts` (sorted, deduplicated), as a server
/// reads it, then the end of input. Stops at the first fatal error, as the server does.
fn decode_split(input: &[u8], cuts: &[usize]) -> Decoded {
    let mut codec = RequestCodec::with_limits(MAX_KEY, MAX_VALUE);
    let mut buffer = BytesMut::new();
    let mut frames = Vec::new();
    let mut start = 0;
    let ends = cuts
        .iter()
        .copied()
        .filter(|&cut| cut < input.len())
        .chain([input.len()]);
    for end in ends {
        if end < start {
            continue;
        }
        buffer.extend_from_slice(&input[start..end]);
        start = end;
        loop {
            match codec.decode(&mut buffer) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(DecodeError::TooLong(reason)) => {
                    return Decoded {
                        frames,
                        fatal: Some(reason),
                    }
                }
                Err(DecodeError::Io(err)) => panic!("no I/O here: {err}"),
            }
        }
        assert!(buffer.is_empty(), "the decoder consumes all it is given");
    }
    loop {
        match codec.decode_eof(&mut buffer) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => break,
            Err(DecodeError::TooLong(reason)) => {
                return Decoded {
                    frames,
                    fatal: Some(reason),
                }
            }
            Err(DecodeError::Io(err)) => panic!("no I/O here: {err}"),
        }
    }
    Decoded {
        frames,
        fatal: None,
    }
}

/// The invariants every decoding must keep, whatever the input.
fn check_bounded(input: &[u8], decoded: &Decoded) {
    // Each frame ends at a distinct byte (or the end of input).
    assert!(decoded.frames.len() <= input.len() + 1);
    for frame in &decoded.frames {
        match frame {
            Frame::Request(Request::Get { key } | Request::Del { key }) => {
                assert!(!key.is_empty() && key.len() <= MAX_KEY);
            }
            Frame::Request(Request::Put { key, value }) => {
                assert!(!key.is_empty() && key.len() <= MAX_KEY);
                assert!(value.len() <= MAX_VALUE);
            }
            Frame::Request(Request::Auth { token }) => {
                assert!(!token.expose().is_empty() && token.expose().len() <= MAX_TOKEN_BYTES);
            }
            Frame::Malformed(reason) => {
                assert!(
                    !reason.is_empty() && reason.len() <= MAX_REASON,
                    "{reason:?}"
                );
                // The answer to it is short too.
                let mut answer = BytesMut::new();
                RequestCodec::new()
                    .encode(Reply::Err(reason), &mut answer)
                    .unwrap();
                assert!(answer.len() <= 2 * MAX_REASON + 8);
            }
        }
    }
    if let Some(reason) = &decoded.fatal {
        assert!(reason.len() <= MAX_REASON, "{reason:?}");
    }
}

fn text(max: usize) -> impl Strategy<Value = String> {
    // Mostly the protocol's special characters and plain letters, some of anything.
    prop::collection::vec(
        prop_oneof![
            4 => prop::sample::select(vec!['a', 'b', 'z', '0', '<', '>', ',', '\\', '\n', ' ']),
            1 => any::<char>(),
        ],
        0..max,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

fn key() -> impl Strategy<Value = String> {
    text(MAX_KEY / 4).prop_filter("keys are not empty", |key| !key.is_empty())
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        key().prop_map(|key| Request::Get { key }),
        key().prop_map(|key| Request::Del { key }),
        (key(), text(MAX_VALUE / 4)).prop_map(|(key, value)| Request::Put { key, value }),
        "[A-Za-z0-9_.-]{1,40}".prop_map(|token| Request::Auth {
            token: Token::new(token)
        }),
    ]
    .prop_filter("within the byte limits", |request| match request {
        Request::Get { key } | Request::Del { key } => key.len() <= MAX_KEY,
        Request::Put { key, value } => key.len() <= MAX_KEY && value.len() <= MAX_VALUE,
        Request::Auth { .. } => true,
    })
}

fn encode_all(requests: &[Request]) -> Vec<u8> {
    let mut out = BytesMut::new();
    let mut codec = ReplyCodec::new();
    for request in requests {
        codec.encode(request, &mut out).unwrap();
        out.extend_from_slice(b"\n");
    }
    out.to_vec()
}

/// One change to a byte string.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, to: u8 },
    Insert { at: usize, byte: u8 },
    Delete { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, to)| Mutation::Flip { at, to }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        any::<usize>().prop_map(|at| Mutation::Delete { at }),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for mutation in mutations {
        let len = bytes.len();
        match *mutation {
            Mutation::Flip { at, to } if len > 0 => bytes[at % len] = to,
            Mutation::Insert { at, byte } => bytes.insert(at % (len + 1), byte),
            Mutation::Delete { at } if len > 0 => {
                bytes.remove(at % len);
            }
            _ => {}
        }
    }
    bytes
}

fn cuts() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0usize..600, 0..12).prop_map(|mut cuts| {
        cuts.sort_unstable();
        cuts.dedup();
        cuts
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_bytes_decode_without_panics_and_within_bounds(
        input in prop::collection::vec(any::<u8>(), 0..600),
        cuts in cuts(),
    ) {
        let decoded = decode_split(&input, &cuts);
        check_bounded(&input, &decoded);
    }

    #[test]
    fn random_protocol_like_text_decodes_within_bounds(
        input in text(300),
        cuts in cuts(),
    ) {
        let decoded = decode_split(input.as_bytes(), &cuts);
        check_bounded(input.as_bytes(), &decoded);
    }

    #[test]
    fn valid_requests_decode_to_themselves_however_split(
        requests in prop::collection::vec(request(), 0..8),
        cuts in cuts(),
    ) {
        let input = encode_all(&requests);
        let decoded = decode_split(&input, &cuts);
        prop_assert_eq!(decoded.fatal, None);
        let expected: Vec<Frame> = requests.into_iter().map(Frame::Request).collect();
        prop_assert_eq!(decoded.frames, expected);
    }

    #[test]
    fn mutated_requests_decode_without_panics_and_within_bounds(
        requests in prop::collection::vec(request(), 1..8),
        mutations in prop::collection::vec(mutation(), 1..4),
        cuts in cuts(),
    ) {
        let input = mutate(encode_all(&requests), &mutations);
        let decoded = decode_split(&input, &cuts);
        check_bounded(&input, &decoded);
    }

    #[test]
    fn the_answer_decoder_survives_random_bytes(
        input in prop::collection::vec(any::<u8>(), 0..600),
        cuts in cuts(),
    ) {
        let mut codec = ReplyCodec::new();
        let mut buffer = BytesMut::new();
        let mut start = 0;
        for end in cuts.iter().copied().filter(|&cut| cut < input.len()).chain([input.len()]) {
            if end < start {
                continue;
            }
            buffer.extend_from_slice(&input[start..end]);
            start = end;
            // A client stops at its first malformed answer.
            loop {
                match codec.decode(&mut buffer) {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => return Ok(()),
                }
            }
        }
    }
}

#[test]
fn an_oversized_token_is_fatal_and_its_message_does_not_echo_it() {
    let mut input = b"auth<".to_vec();
    input.extend(std::iter::repeat_n(b'q', MAX_TOKEN_BYTES + 1));
    input.push(b'>');
    let decoded = decode_split(&input, &[7, 100, 5000]);
    assert!(decoded.frames.is_empty());
    let fatal = decoded.fatal.expect("over the limit");
    assert_eq!(
        fatal,
        format!("token too long (max {MAX_TOKEN_BYTES} bytes)")
    );
}

#[test]
fn a_token_at_the_limit_is_accepted() {
    let token = "t".repeat(MAX_TOKEN_BYTES);
    let input = format!("auth<{token}>get<k>");
    let decoded = decode_split(input.as_bytes(), &[3, 4096, 8200]);
    assert_eq!(decoded.fatal, None);
    assert_eq!(
        decoded.frames,
        [
            Frame::Request(Request::Auth {
                token: Token::new(token)
            }),
            Frame::Request(Request::Get { key: "k".into() }),
        ]
    );
}

#[test]
fn a_token_never_shows_in_debug_output() {
    let request = Request::Auth {
        token: Token::new("eyJhbGciOiJIUzI1NiJ9.secret-claims.signature"),
    };
    let shown = format!("{request:?}");
    assert!(!shown.contains("secret-claims"), "{shown}");
    assert!(!shown.contains("signature"), "{shown}");
}
