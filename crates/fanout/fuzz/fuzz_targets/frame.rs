//! Any bytes as a WebSocket text frame, both ways: the hub's decoder of
//! client frames and the client's decoder of server frames. Neither may
//! panic; whatever the hub accepts must name a valid channel, and an
//! accepted frame must survive a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use statehouse_fanout::check_channel;
use statehouse_fanout::protocol::{
    ClientFrame, ServerFrame, decode_client_frame, decode_server_frame, message_payload,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return; // the hub never sees these: binary and non-UTF-8 frames are refused earlier
    };
    if let Ok(frame) = decode_client_frame(text) {
        match &frame {
            ClientFrame::Sub { ch, .. } | ClientFrame::Unsub { ch } | ClientFrame::Presence { ch } => {
                assert!(check_channel(ch).is_ok());
            }
            ClientFrame::Hello { .. } | ClientFrame::Ping => {}
        }
        let again = serde_json_round_trip(&frame);
        assert_eq!(decode_client_frame(&again).ok(), Some(frame));
    }
    if let Ok(ServerFrame::Msg { data, b64, .. }) = decode_server_frame(text) {
        let _ = message_payload(data, b64);
    }
});

fn serde_json_round_trip(frame: &ClientFrame) -> String {
    // ClientFrame serializes with the same tags it is read with.
    statehouse_fanout::protocol::encode_client_frame(frame)
}
