//! Fuzzes the V2 request path a server runs before any model sees the data: the JSON header
//! decoder and the binary tensor extension (header split, binary_data_size attachment, BYTES
//! length prefixes). Any panic, overflow or runaway allocation is a finding.
#![no_main]

use bytes::Bytes;
use kiln::protocol::v2::decode_request;
use kiln::serve::binary;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First two bytes choose the Inference-Header-Content-Length (0xffff = JSON only).
    let (header_len, body) = match data {
        [a, b, rest @ ..] => (u16::from_le_bytes([*a, *b]), rest),
        _ => return,
    };
    let header_len = (header_len != u16::MAX).then_some(header_len as usize);
    let Ok((json, rest)) = binary::split_body(Bytes::copy_from_slice(body), header_len) else { return };
    if let Ok(mut request) = decode_request(&json) {
        let _ = binary::attach(&mut request, rest);
        let _ = request.binary_data_output();
    }
});
