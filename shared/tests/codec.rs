//! The `¶` codec on the inputs a TCP stream really produces: frames split anywhere, several
//! frames in one read, oversized frames, and bad JSON. One test per case, after tokio-util's
//! codec tests.

use bytes::{BufMut, BytesMut};
use serde_json::{json, Value};
use shared::{
    codec::{encode_frame, CodecError, PacketCodec},
    Packet, RawParams,
};
use tokio_util::codec::{Decoder, Encoder};

fn request(key: u64, params: Value) -> Packet {
    Packet {
        key,
        ..Packet::request("GET", "/kv", params)
    }
}

fn decode_all(codec: &mut PacketCodec, buf: &mut BytesMut) -> Vec<Packet> {
    let mut packets = Vec::new();
    while let Some(packet) = codec.decode(buf).expect("valid input") {
        packets.push(packet);
    }
    packets
}

#[test]
fn a_frame_split_at_every_byte_position_decodes_once() {
    let packet = request(7, json!({"value": "héllo ¶ wörld"}));
    let frame = encode_frame(&packet).unwrap();
    for split in 0..=frame.len() {
        let mut codec = PacketCodec::new();
        let mut buf = BytesMut::from(&frame[..split]);
        let mut decoded = decode_all(&mut codec, &mut buf);
        buf.put_slice(&frame[split..]);
        decoded.extend(decode_all(&mut codec, &mut buf));
        assert_eq!(decoded, vec![packet.clone()], "split at byte {split}");
        assert!(buf.is_empty());
    }
}

#[test]
fn a_frame_fed_one_byte_at_a_time_decodes() {
    let packet = request(1, json!({"params": "a/b"}));
    let frame = encode_frame(&packet).unwrap();
    let mut codec = PacketCodec::new();
    let mut buf = BytesMut::new();
    let mut decoded = Vec::new();
    for byte in frame.iter() {
        buf.put_u8(*byte);
        decoded.extend(decode_all(&mut codec, &mut buf));
    }
    assert_eq!(decoded, vec![packet]);
}

#[test]
fn a_delimiter_split_between_its_two_bytes_is_found() {
    let mut codec = PacketCodec::<Packet>::new();
    let mut buf = BytesMut::from(&br#"{"uri":"/a","method":"GET","key":3}"#[..]);
    buf.put_u8(0xC2);
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
    buf.put_u8(0xB6);
    let packet = codec.decode(&mut buf).unwrap().expect("a complete frame");
    assert_eq!(packet.key, 3);
}

#[test]
fn glued_frames_decode_in_order() {
    let packets: Vec<Packet> = (1..=5).map(|key| request(key, json!(key))).collect();
    let mut buf = BytesMut::new();
    for packet in &packets {
        buf.put_slice(&encode_frame(packet).unwrap());
    }
    let mut codec = PacketCodec::new();
    assert_eq!(decode_all(&mut codec, &mut buf), packets);
}

#[test]
fn a_delimiter_inside_a_string_is_escaped_on_the_wire() {
    let packet = request(9, json!({"value": "a¶b", "¶key": "¶"}));
    let frame = encode_frame(&packet).unwrap();
    let body = &frame[..frame.len() - 2];
    assert!(
        !body.windows(2).any(|w| w == [0xC2, 0xB6]),
        "no raw ¶ before the delimiter"
    );
    assert!(std::str::from_utf8(body).unwrap().contains(r"a\u00b6b"));
    let mut codec = PacketCodec::new();
    let decoded = codec.decode(&mut BytesMut::from(&frame[..])).unwrap();
    assert_eq!(decoded, Some(packet));
}

#[test]
fn raw_params_holding_a_delimiter_are_escaped_on_the_wire() {
    let params = json!({"message": "a¶b", "¶": ["¶"]});
    let raw = RawParams::to_raw(&params).unwrap();
    assert!(raw.get().contains('¶'), "the raw text itself is unescaped");
    let frame = encode_frame(Packet::reply_to(&request(5, Value::Null), raw)).unwrap();
    let body = &frame[..frame.len() - 2];
    assert!(
        !body.windows(2).any(|w| w == [0xC2, 0xB6]),
        "no raw ¶ before the delimiter"
    );
    let decoded = PacketCodec::<Packet>::new()
        .decode(&mut BytesMut::from(&frame[..]))
        .unwrap()
        .expect("a complete frame");
    assert_eq!(decoded.key, 5);
    assert_eq!(decoded.params, params);
}

#[test]
fn raw_params_keep_the_senders_text_through_split_and_glued_frames() {
    // Whitespace and key order as the sender wrote them: raw params are passed on, not rebuilt.
    let wire = concat!(
        r#"{"uri":"/n","method":"GET","key":1,"params":{"b": 1,  "a": [true, null]}}¶"#,
        r#"{"uri":"/n","method":"GET","key":2}¶"#,
        r#"{"uri":"/n","method":"GET","key":3,"params":"h\u00e9"}¶"#,
    );
    let wire = wire.as_bytes();
    for split in 0..=wire.len() {
        let mut codec = PacketCodec::<Packet<RawParams>>::new();
        let mut buf = BytesMut::from(&wire[..split]);
        let mut decoded = Vec::new();
        while let Some(packet) = codec.decode(&mut buf).unwrap() {
            decoded.push(packet);
        }
        buf.put_slice(&wire[split..]);
        while let Some(packet) = codec.decode(&mut buf).unwrap() {
            decoded.push(packet);
        }
        let params: Vec<&str> = decoded.iter().map(|p| p.params.get()).collect();
        assert_eq!(
            params,
            [r#"{"b": 1,  "a": [true, null]}"#, "null", r#""h\u00e9""#],
            "split at byte {split}"
        );
    }
}

#[test]
fn raw_params_that_are_not_json_are_a_bad_frame() {
    let mut codec = PacketCodec::<Packet<RawParams>>::new();
    let mut buf = BytesMut::from(r#"{"key":6,"params":{"a":}}¶{"key":7}¶"#);
    let err = codec.decode(&mut buf).unwrap_err();
    assert!(matches!(err, CodecError::Json { key: None, .. }), "{err:?}");
    let next = codec.decode(&mut buf).unwrap().expect("the next frame");
    assert_eq!(next.key, 7);
    assert_eq!(next.params.get(), "null");
}

#[test]
fn a_raw_delimiter_inside_a_string_is_taken_as_a_delimiter() {
    let mut codec = PacketCodec::<Packet>::new();
    let mut buf = BytesMut::from(r#"{"uri":"/a","method":"GET","key":4,"params":"x¶y"}¶"#);
    let err = codec.decode(&mut buf).unwrap_err();
    assert!(matches!(err, CodecError::Json { .. }), "{err:?}");
    // What followed the raw ¶ is its own (broken) frame; decoding goes on after it.
    assert!(codec.decode(&mut buf).is_err());
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
}

#[test]
fn an_oversized_frame_is_rejected_then_decoding_recovers() {
    let mut codec = PacketCodec::<Packet>::with_max_frame_length(64);
    let big = request(1, json!({"value": "x".repeat(200)}));
    let small = request(2, json!("ok"));
    let mut buf = BytesMut::new();
    buf.put_slice(&encode_frame(&big).unwrap());
    buf.put_slice(&encode_frame(&small).unwrap());
    let err = codec.decode(&mut buf).unwrap_err();
    assert!(matches!(
        err,
        CodecError::MaxFrameLengthExceeded { max: 64 }
    ));
    assert_eq!(codec.decode(&mut buf).unwrap(), Some(small));
}

#[test]
fn an_oversized_frame_arriving_in_pieces_is_never_buffered_whole() {
    let mut codec = PacketCodec::<Packet>::with_max_frame_length(64);
    let mut buf = BytesMut::new();
    let mut errors = 0;
    for _ in 0..100 {
        buf.put_slice(&[b'x'; 50]);
        match codec.decode(&mut buf) {
            Err(CodecError::MaxFrameLengthExceeded { .. }) => errors += 1,
            Ok(None) => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(buf.len() <= 64 + 50, "buffer grew to {}", buf.len());
    }
    assert_eq!(errors, 1, "the oversized frame is reported once");
    buf.put_slice(&encode_frame(request(5, Value::Null)).unwrap());
    // The rest of the oversized frame ends at this delimiter: the next frame is whole again.
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
    buf.put_slice(&encode_frame(request(6, Value::Null)).unwrap());
    assert_eq!(codec.decode(&mut buf).unwrap().map(|p| p.key), Some(6));
}

#[test]
fn invalid_json_is_an_error_carrying_the_key_when_readable() {
    let mut codec = PacketCodec::<Packet>::new();
    let mut buf = BytesMut::from(r#"{"uri":5,"method":"GET","key":12}¶not json¶"#);
    match codec.decode(&mut buf) {
        Err(CodecError::Json { key: Some(12), .. }) => {}
        other => panic!("expected a JSON error with key 12, got {other:?}"),
    }
    match codec.decode(&mut buf) {
        Err(CodecError::Json { key: None, .. }) => {}
        other => panic!("expected a JSON error without key, got {other:?}"),
    }
    assert!(buf.is_empty());
}

#[test]
fn an_original_design_request_keeps_its_key_in_params() {
    let mut codec = PacketCodec::<Packet>::new();
    let mut buf = BytesMut::from(r#"{"uri":"/kv","method":"GET","params":{"key":"42"}}¶"#);
    let packet = codec.decode(&mut buf).unwrap().unwrap();
    assert_eq!(packet.key, 0);
    assert_eq!(
        shared::packet::key_in(&json!({"params": packet.params})),
        Some(42)
    );
}

#[test]
fn unknown_fields_are_ignored_and_optional_fields_omitted() {
    let mut codec = PacketCodec::<Packet>::new();
    let mut buf = BytesMut::from(r#"{"uri":"/a","method":"GET","key":1,"extra":[1,2]}¶"#);
    let packet = codec.decode(&mut buf).unwrap().unwrap();
    let frame = encode_frame(&packet).unwrap();
    assert_eq!(
        std::str::from_utf8(&frame).unwrap(),
        r#"{"uri":"/a","method":"GET","key":1,"params":null}¶"#
    );
}

#[test]
fn bytes_left_at_eof_are_an_error() {
    let mut codec = PacketCodec::<Packet>::new();
    let mut buf = BytesMut::from(r#"{"uri":"/a","method":"GET","key":1}¶{"uri":"#);
    assert!(codec.decode_eof(&mut buf).unwrap().is_some());
    let err = codec.decode_eof(&mut buf).unwrap_err();
    assert!(matches!(err, CodecError::Io(_)));
    assert!(!err.is_recoverable());
}

#[test]
fn whitespace_between_frames_is_ignored() {
    let mut codec = PacketCodec::<Packet>::new();
    let mut buf = BytesMut::from("\n{\"uri\":\"/a\",\"method\":\"GET\",\"key\":1}¶\n¶  ");
    assert_eq!(codec.decode(&mut buf).unwrap().map(|p| p.key), Some(1));
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
    assert_eq!(codec.decode_eof(&mut buf).unwrap(), None);
}

#[test]
fn the_encoder_appends_one_delimiter_per_item() {
    let mut codec = PacketCodec::<Packet>::new();
    let mut buf = BytesMut::new();
    codec.encode(request(1, Value::Null), &mut buf).unwrap();
    codec.encode(&json!({"any": "value"}), &mut buf).unwrap();
    let text = std::str::from_utf8(&buf).unwrap();
    assert_eq!(text.matches('¶').count(), 2);
    assert!(text.ends_with(r#"{"any":"value"}¶"#));
}
