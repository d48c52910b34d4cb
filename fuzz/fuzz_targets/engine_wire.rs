//! The engine's pipe protocol: whatever bytes arrive, decoding a frame returns a message or an error — it never
//! panics, never allocates past the frame limit, and a decoded message re-encodes to something that decodes the same.
#![no_main]
use copilot_core::engine::serve::{wire, Command, Event};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = wire::read::<_, Command>(&mut &data[..]) {
        let mut buf = Vec::new();
        wire::write(&mut buf, &c).expect("a decoded command encodes");
        let again: Command = wire::read(&mut buf.as_slice()).expect("and decodes again");
        assert_eq!(format!("{again:?}"), format!("{c:?}"));
    }
    let _ = wire::read::<_, Event>(&mut &data[..]);
    let _ = wire::decode::<Command>(data);
    let _ = wire::decode::<Event>(data);
});
