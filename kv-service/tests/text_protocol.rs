//! The text protocol's codecs, without sockets: framing (glued, split at every byte), escapes,
//! every error and what follows it, the size limits, and the answers' encoding.

use bytes::BytesMut;
use kv_service::text_protocol::{
    escape, DecodeError, Frame, OwnedReply, Reply, ReplyCodec, Request, RequestCodec,
};
use tokio_util::codec::{Decoder, Encoder};

fn get(key: &str) -> Frame {
    Frame::Request(Request::Get { key: key.into() })
}

fn put(key: &str, value: &str) -> Frame {
    Frame::Request(Request::Put {
        key: key.into(),
        value: value.into(),
    })
}

fn del(key: &str) -> Frame {
    Frame::Request(Request::Del { key: key.into() })
}

fn malformed(frame: &Frame) -> &str {
    match frame {
        Frame::Malformed(reason) => reason,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Feeds `input` in pieces of the given sizes and collects every frame, then the end of input.
fn decode_in_pieces(codec: &mut RequestCodec, input: &[u8], pieces: &[usize]) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut buffer = BytesMut::new();
    let mut rest = input;
    for &size in pieces {
        let (piece, after) = rest.split_at(size.min(rest.len()));
        rest = after;
        buffer.extend_from_slice(piece);
        while let Some(frame) = codec.decode(&mut buffer).unwrap() {
            frames.push(frame);
        }
        assert!(
            buffer.is_empty(),
            "the decoder consumes everything it is given"
        );
    }
    buffer.extend_from_slice(rest);
    while let Some(frame) = codec.decode_eof(&mut buffer).unwrap() {
        frames.push(frame);
    }
    frames
}

fn decode_all(input: &[u8]) -> Vec<Frame> {
    decode_in_pieces(&mut RequestCodec::new(), input, &[input.len()])
}

#[test]
fn one_request_of_each_kind() {
    assert_eq!(decode_all(b"get<1>"), [get("1")]);
    assert_eq!(decode_all(b"put<1,hello>"), [put("1", "hello")]);
    assert_eq!(decode_all(b"del<1>"), [del("1")]);
}

#[test]
fn glued_requests_in_one_read() {
    assert_eq!(
        decode_all(b"get<1>put<1,hello>get<1>del<1>"),
        [get("1"), put("1", "hello"), get("1"), del("1")]
    );
}

#[test]
fn blanks_and_newlines_between_requests_are_ignored() {
    assert_eq!(
        decode_all(b"  get<1>\n\nput<1,a b>\r\n\tdel<1> \n"),
        [get("1"), put("1", "a b"), del("1")]
    );
}

#[test]
fn command_names_are_case_insensitive() {
    assert_eq!(
        decode_all(b"GET<a>Put<a,b>dEl<a>"),
        [get("a"), put("a", "b"), del("a")]
    );
}

/// Input mixing every feature, to be split at every position.
const MIXED: &[u8] = "get<1>put<k\\,ey,va\\>l,ue\\\\>\nbogus<x>get<é¶🦀>put<nocomma>\
    put<multi\nline,日本\n語>del<k\\<> get<> get\\<x>"
    .as_bytes();

fn mixed_frames() -> Vec<Frame> {
    vec![
        get("1"),
        put("k,ey", "va>l,ue\\"),
        Frame::Malformed("unknown command bogus".into()),
        get("é¶🦀"),
        Frame::Malformed("put needs a key and a value: put<key,value>".into()),
        put("multi\nline", "日本\n語"),
        del("k<"),
        Frame::Malformed("empty key".into()),
        Frame::Malformed("missing < after get".into()),
    ]
}

#[test]
fn the_mixed_input_decodes_as_expected_in_one_piece() {
    assert_eq!(decode_all(MIXED), mixed_frames());
}

#[test]
fn split_in_two_at_every_byte_position() {
    for split in 0..=MIXED.len() {
        let frames = decode_in_pieces(&mut RequestCodec::new(), MIXED, &[split, MIXED.len()]);
        assert_eq!(frames, mixed_frames(), "split at byte {split}");
    }
}

#[test]
fn one_byte_at_a_time() {
    let pieces = vec![1; MIXED.len()];
    assert_eq!(
        decode_in_pieces(&mut RequestCodec::new(), MIXED, &pieces),
        mixed_frames()
    );
}

#[test]
fn split_in_three_at_every_pair_of_positions() {
    let input = b"put<a\\,b,c\\\\d>get<a\\,b>";
    let expected = [put("a,b", "c\\d"), get("a,b")];
    for first in 0..=input.len() {
        for second in 0..=(input.len() - first) {
            let pieces = [first, second, input.len()];
            let frames = decode_in_pieces(&mut RequestCodec::new(), input, &pieces);
            assert_eq!(frames, expected, "pieces {pieces:?}");
        }
    }
}

#[test]
fn escapes_put_special_characters_in_keys_and_values() {
    assert_eq!(
        decode_all(b"put<\\<k\\>\\,\\\\,\\<v\\>\\,\\\\>"),
        [put("<k>,\\", "<v>,\\")]
    );
}

#[test]
fn the_first_unescaped_comma_splits_key_from_value() {
    assert_eq!(decode_all(b"put<k,v,w,,>"), [put("k", "v,w,,")]);
    assert_eq!(decode_all(b"put<k,>"), [put("k", "")]);
    assert_eq!(decode_all(b"put<k\\,x,>"), [put("k,x", "")]);
}

#[test]
fn a_comma_in_a_get_or_del_key_is_part_of_the_key() {
    assert_eq!(decode_all(b"get<a,b>del<c,d>"), [get("a,b"), del("c,d")]);
}

#[test]
fn any_utf8_and_pilcrows_pass_through() {
    let input = "put<¶\"'\u{0},\u{1F980}\r\n\t{\"json\":[1]}>".as_bytes();
    assert_eq!(
        decode_all(input),
        [put("¶\"'\u{0}", "\u{1F980}\r\n\t{\"json\":[1]}")]
    );
}

#[test]
fn error_unknown_command_then_the_next_request_works() {
    let frames = decode_all(b"set<a,b>get<a>");
    assert_eq!(malformed(&frames[0]), "unknown command set");
    assert_eq!(frames[1..], [get("a")]);
}

#[test]
fn error_unknown_command_skips_its_body_with_escapes() {
    let frames = decode_all(b"nope<a\\>b>get<a>");
    assert_eq!(malformed(&frames[0]), "unknown command nope");
    assert_eq!(frames[1..], [get("a")]);
}

#[test]
fn error_missing_angle_bracket_then_the_next_line_works() {
    let frames = decode_all(b"get 1\nget<1>");
    assert_eq!(malformed(&frames[0]), "missing < after get");
    assert_eq!(frames[1..], [get("1")]);

    let frames = decode_all(b"get\nget<2>");
    assert_eq!(malformed(&frames[0]), "missing < after get");
    assert_eq!(frames[1..], [get("2")]);

    // Without a newline, the junk ends at the next `>`.
    let frames = decode_all(b"get1>get<3>");
    assert_eq!(malformed(&frames[0]), "missing < after get");
    assert_eq!(frames[1..], [get("3")]);
}

#[test]
fn error_not_a_command_then_the_next_request_works() {
    let frames = decode_all(b"<a>get<1>");
    assert_eq!(
        malformed(&frames[0]),
        "expected a command (auth, get, put or del), got <"
    );
    assert_eq!(frames[1..], [get("1")]);

    let frames = decode_all(b"42\nget<1>");
    assert!(malformed(&frames[0]).starts_with("expected a command"));
    assert_eq!(frames[1..], [get("1")]);
}

#[test]
fn error_empty_key() {
    let frames = decode_all(b"get<>put<,v>del<>get<k>");
    assert_eq!(malformed(&frames[0]), "empty key");
    assert_eq!(malformed(&frames[1]), "empty key");
    assert_eq!(malformed(&frames[2]), "empty key");
    assert_eq!(frames[3..], [get("k")]);
}

#[test]
fn error_bad_escape() {
    let frames = decode_all(b"get<a\\nb>put<k,\\x>get<k>");
    assert_eq!(
        malformed(&frames[0]),
        "bad escape \\n (only \\<, \\>, \\, and \\\\ are escapes)"
    );
    assert!(malformed(&frames[1]).starts_with("bad escape \\x"));
    assert_eq!(frames[2..], [get("k")]);
}

#[test]
fn error_put_without_a_value() {
    let frames = decode_all(b"put<k>put<k\\,v>get<k>");
    assert_eq!(
        malformed(&frames[0]),
        "put needs a key and a value: put<key,value>"
    );
    assert_eq!(
        malformed(&frames[1]),
        "put needs a key and a value: put<key,value>"
    );
    assert_eq!(frames[2..], [get("k")]);
}

#[test]
fn error_unescaped_angle_bracket_inside_a_request() {
    // A forgotten `>`: the error comes at the next `>`, and decoding resumes after it.
    let frames = decode_all(b"get<1 put<1,2>get<3>");
    assert_eq!(
        malformed(&frames[0]),
        "unescaped < inside a request (escape it as \\<)"
    );
    assert_eq!(frames[1..], [get("3")]);
}

#[test]
fn error_invalid_utf8() {
    let frames = decode_all(b"get<\xff\xfe>put<k,\xc3>get<k>");
    assert_eq!(malformed(&frames[0]), "key is not valid UTF-8");
    assert_eq!(malformed(&frames[1]), "value is not valid UTF-8");
    assert_eq!(frames[2..], [get("k")]);
}

#[test]
fn error_incomplete_request_at_end_of_input() {
    let frames = decode_all(b"get<1>put<1,unfinished");
    assert_eq!(frames[0], get("1"));
    assert_eq!(malformed(&frames[1]), "incomplete request at end of input");
    assert_eq!(frames.len(), 2);
    assert_eq!(
        decode_all(b"get"),
        [Frame::Malformed(
            "incomplete request at end of input".into()
        )]
    );
    assert!(decode_all(b"  \n").is_empty());
}

#[test]
fn a_key_over_the_limit_is_fatal_without_buffering_it() {
    let mut codec = RequestCodec::with_limits(8, 32);
    let mut buffer = BytesMut::from(&b"get<12345678>"[..]);
    assert_eq!(codec.decode(&mut buffer).unwrap(), Some(get("12345678")));

    let mut buffer = BytesMut::from(&b"get<1234"[..]);
    assert_eq!(codec.decode(&mut buffer).unwrap(), None);
    assert!(buffer.is_empty());
    buffer.extend_from_slice(b"56789");
    match codec.decode(&mut buffer) {
        Err(DecodeError::TooLong(reason)) => assert_eq!(reason, "key too long (max 8 bytes)"),
        other => panic!("expected a fatal error, got {other:?}"),
    }
}

#[test]
fn a_value_over_the_limit_is_fatal() {
    let mut codec = RequestCodec::with_limits(8, 4);
    let mut buffer = BytesMut::from(&b"put<k,1234>put<k,12345>"[..]);
    assert_eq!(codec.decode(&mut buffer).unwrap(), Some(put("k", "1234")));
    match codec.decode(&mut buffer) {
        Err(DecodeError::TooLong(reason)) => assert_eq!(reason, "value too long (max 4 bytes)"),
        other => panic!("expected a fatal error, got {other:?}"),
    }
}

#[test]
fn limits_count_decoded_bytes_so_escapes_do_not_count_twice() {
    let mut codec = RequestCodec::with_limits(4, 4);
    let mut buffer = BytesMut::from(&b"put<\\<\\>\\,\\\\,\\<\\>\\,\\\\>"[..]);
    assert_eq!(
        codec.decode(&mut buffer).unwrap(),
        Some(put("<>,\\", "<>,\\"))
    );
}

#[test]
fn an_endless_unknown_command_body_is_fatal_too() {
    let mut codec = RequestCodec::with_limits(8, 8);
    let mut buffer = BytesMut::from(&b"what<"[..]);
    buffer.extend_from_slice(&[b'x'; 100]);
    assert!(matches!(
        codec.decode(&mut buffer),
        Err(DecodeError::TooLong(_))
    ));
}

#[test]
fn endless_junk_outside_requests_is_skipped_in_constant_memory() {
    let mut codec = RequestCodec::new();
    let mut buffer = BytesMut::from(&b"1"[..]);
    assert!(matches!(
        codec.decode(&mut buffer).unwrap(),
        Some(Frame::Malformed(_))
    ));
    for _ in 0..100 {
        buffer.extend_from_slice(&[b'y'; 10_000]);
        assert_eq!(codec.decode(&mut buffer).unwrap(), None);
        assert!(buffer.is_empty());
    }
    buffer.extend_from_slice(b"\nget<1>");
    assert_eq!(codec.decode(&mut buffer).unwrap(), Some(get("1")));
}

#[test]
fn a_long_command_word_is_reported_cut_short() {
    let mut input = vec![b'a'; 10_000];
    input.extend_from_slice(b"<x>get<1>");
    let frames = decode_all(&input);
    assert_eq!(
        malformed(&frames[0]),
        format!("unknown command {}", "a".repeat(16))
    );
    assert_eq!(frames[1..], [get("1")]);
}

fn encoded(reply: Reply<'_>) -> String {
    let mut out = BytesMut::new();
    RequestCodec::new().encode(reply, &mut out).unwrap();
    String::from_utf8(out.to_vec()).unwrap()
}

#[test]
fn answers_are_framed_and_escaped_like_requests() {
    assert_eq!(encoded(Reply::Value("hello")), "value<hello>\n");
    assert_eq!(encoded(Reply::None("k")), "none<k>\n");
    assert_eq!(encoded(Reply::Ok("k")), "ok<k>\n");
    assert_eq!(encoded(Reply::Err("bad")), "err<bad>\n");
    assert_eq!(encoded(Reply::Value("<a,b>\\")), "value<\\<a\\,b\\>\\\\>\n");
    assert_eq!(encoded(Reply::Value("")), "value<>\n");
    assert_eq!(escape("a<b>c,d\\e¶"), "a\\<b\\>c\\,d\\\\e¶");
}

#[test]
fn the_reply_codec_reads_what_the_server_writes() {
    let texts = ["plain", "<a,b>\\", "", "multi\nline ¶ 🦀"];
    let mut wire = BytesMut::new();
    let mut server = RequestCodec::new();
    for text in texts {
        server.encode(Reply::Value(text), &mut wire).unwrap();
        server.encode(Reply::Err(text), &mut wire).unwrap();
    }
    server.encode(Reply::None("k"), &mut wire).unwrap();
    server.encode(Reply::Ok("k"), &mut wire).unwrap();
    let wire = wire.to_vec();

    // Byte by byte, so the client decoder's own splitting is covered too.
    let mut client = ReplyCodec::new();
    let mut buffer = BytesMut::new();
    let mut replies = Vec::new();
    for byte in wire {
        buffer.extend_from_slice(&[byte]);
        while let Some(reply) = client.decode(&mut buffer).unwrap() {
            replies.push(reply);
        }
    }
    let mut expected = Vec::new();
    for text in texts {
        expected.push(OwnedReply::Value(text.into()));
        expected.push(OwnedReply::Err(text.into()));
    }
    expected.push(OwnedReply::None("k".into()));
    expected.push(OwnedReply::Ok("k".into()));
    assert_eq!(replies, expected);
}

#[test]
fn requests_encoded_by_the_client_decode_to_themselves() {
    let requests = [
        Request::Put {
            key: "<k,\\>".into(),
            value: ",v<>\\,".into(),
        },
        Request::Get {
            key: "é,¶".into()
        },
        Request::Del { key: "x>".into() },
    ];
    let mut wire = BytesMut::new();
    let mut client = ReplyCodec::new();
    for request in &requests {
        client.encode(request, &mut wire).unwrap();
    }
    let frames = decode_all(&wire);
    let expected: Vec<Frame> = requests.into_iter().map(Frame::Request).collect();
    assert_eq!(frames, expected);
}
