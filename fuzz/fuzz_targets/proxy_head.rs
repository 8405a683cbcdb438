//! The edge proxy's fast path on untrusted bytes: a client's request head, an app's response
//! head and chunked body. The first byte picks which, and the flags or split point to use.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stagely_edge_proxy::fast::fuzz;

fuzz_target!(|input: &[u8]| {
    let Some((&pick, bytes)) = input.split_first() else { return };
    match pick % 3 {
        0 => fuzz::request_head(bytes),
        1 => fuzz::response_head(bytes, pick & 4 != 0, pick & 8 != 0),
        _ => fuzz::chunks(bytes, usize::from(pick)),
    }
});
