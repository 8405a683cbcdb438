//! A WebSocket text frame from an agent (or the gateway): decoding never panics, and whatever
//! decodes encodes back to a frame that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stagely_api::protocol::Message;

fuzz_target!(|frame: &str| {
    let Ok(message) = serde_json::from_str::<Message>(frame) else { return };
    let _ = (message.type_name(), message.job_id());
    let again = serde_json::to_string(&message).expect("a decoded message encodes");
    let back: Message = serde_json::from_str(&again).expect("an encoded message decodes");
    assert_eq!(back, message);
});
