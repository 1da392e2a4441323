//! Arbitrary bytes, split arbitrarily, through the control protocol's frame
//! decoder and request parser: no panic, no frame over the cap, no
//! unbounded buffering.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfio_intx::daemon::protocol::{decode, FrameDecoder, Request, HEADER, MAX_FRAME};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let mut decoder = FrameDecoder::new();
    for chunk in rest.chunks(usize::from(split).max(1)) {
        decoder.push(chunk);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= MAX_FRAME);
                    let _ = decode::<Request>(&frame);
                }
                Ok(None) => break,
                // The daemon closes the connection here.
                Err(_) => return,
            }
        }
        assert!(decoder.buffered() <= HEADER + MAX_FRAME + rest.len());
    }
});
